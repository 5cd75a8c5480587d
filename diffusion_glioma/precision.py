"""Which number format to compute in, where a command offers a choice (`--precision`)."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 is native on the device: CUDA GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX
    (5-12x faster than fp32 on this project's development CPU, docs/benchmarks.md)."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """"auto" is bf16 where the hardware has it, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
