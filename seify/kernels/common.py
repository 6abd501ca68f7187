"""What the SE kernels share: tile sizes, the accumulator's precision, the strides they index by, the grid."""
from __future__ import annotations

import torch

BLOCK_C = 32  # channels a program handles
BLOCK_HW = 64  # positions (H x W flattened) a program handles


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 maps; float64 stays float64 (so that gradcheck can run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def hw_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, hw) strides of an NCHW or channels_last tensor, whose H and W flatten into one index."""
    if t.stride(2) != t.shape[3] * t.stride(3):
        raise ValueError("SE kernels take NCHW or channels_last tensors")
    return t.stride(0), t.stride(1), t.stride(3)


def dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when its H and W flatten into one index (NCHW, channels_last), else an NCHW copy."""
    return t if t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """An (N, C) accumulator-precision tensor for ``x``: the squeeze, the gate's gradient, the tie counts."""
    return x.new_empty(x.shape[:2], dtype=accumulator(x.dtype))


def grid(x: torch.Tensor, tiles_hw: bool = False) -> tuple[int, ...]:
    """Programs over (sample, channel tile) and, for element-wise passes, position tiles."""
    n, c, h, w = x.shape
    blocks = (n, -(-c // BLOCK_C))
    return (*blocks, -(-(h * w) // BLOCK_HW)) if tiles_hw else blocks
