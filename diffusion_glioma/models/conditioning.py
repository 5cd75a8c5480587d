"""The mask as network input, shared by every model kind."""

from __future__ import annotations

import torch


def one_hot(labels: torch.Tensor, num_labels: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, x, y, z) integer labels -> (b, num_labels, x, y, z) one-hot in `dtype`, written straight
    into place (F.one_hot would build an int64 tensor 8x the size first)."""
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(f"labels must lie in 0..{num_labels - 1}, got {int(labels.min())}..{int(labels.max())}")
    out = torch.zeros((labels.shape[0], num_labels, *labels.shape[1:]), dtype=dtype, device=labels.device)
    return out.scatter_(1, labels[:, None].long(), 1)
