"""Does a mask-conditioned generator sample, or regress to the mean? Pure functions of volumes that
share one mask, compared inside the head on one grid (the model's).

- `two_draw_ratio`: how much two draws of one mask differ, against how much a draw differs from the
  real case, on volumes z-scored inside the head. A true conditional sampler scores about 1 (the
  real case is one more draw from the same distribution), a mask-to-mean regressor or a copy 0.
- `spread_ratio`: the voxelwise standard deviation of K >= 2 draws of one mask inside the head, as a
  ratio to the truth's own same-mask spread (the phantom's truth draws): 1 right, 0 collapse, above
  1 noisier than the truth.
- `correlation_with_real`: a draw's Pearson correlation with the real case inside the head (a
  sample must look like the anatomy its mask came from, clearly above what noise scores).

Arrays are (modality, x, y, z) or (draw, modality, x, y, z); `head` is a boolean (x, y, z) mask.
"""

from __future__ import annotations

import numpy as np


def zscore_in_head(volume: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Each modality to mean 0, sd 1 over the head's voxels: (modality, n_head_voxels)."""
    values = volume[:, head].astype(np.float64)
    return (values - values.mean(axis=1, keepdims=True)) / np.maximum(values.std(axis=1, keepdims=True), 1e-8)


def two_draw_ratio(first: np.ndarray, second: np.ndarray, real: np.ndarray, head: np.ndarray) -> float:
    """mean |a - b|^2 / mean of |a - real|^2 and |b - real|^2, z-scored in the head."""
    a, b, r = (zscore_in_head(v, head) for v in (first, second, real))
    between = np.mean((a - b) ** 2)
    to_real = 0.5 * (np.mean((a - r) ** 2) + np.mean((b - r) ** 2))
    return float(between / max(to_real, 1e-12))


def voxelwise_spread(draws: np.ndarray, head: np.ndarray) -> float:
    """Mean over modalities and head voxels of the standard deviation across draws (ddof 1)."""
    if len(draws) < 2:
        raise ValueError("the spread of draws needs at least two draws of one mask")
    return float(draws[:, :, head].std(axis=0, ddof=1).mean())


def spread_ratio(draws: np.ndarray, truth_draws: np.ndarray, head: np.ndarray) -> float:
    """The generator's same-mask spread over the truth's (both on one grid and intensity scale)."""
    return voxelwise_spread(draws, head) / max(voxelwise_spread(truth_draws, head), 1e-12)


def correlation_with_real(draw: np.ndarray, real: np.ndarray, head: np.ndarray) -> float:
    """Pearson correlation inside the head, pooled over modalities after z-scoring each."""
    a, r = zscore_in_head(draw, head), zscore_in_head(real, head)
    return float(np.mean(a * r))
