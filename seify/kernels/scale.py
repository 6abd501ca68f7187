"""The scale: ``shortcut + x * s`` (or ``x * s``) in one pass, s per (n, c) in the accumulator's precision."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import guarded
from .common import BLOCK_C, BLOCK_HW, grid, hw_strides
from .index import offsets


@triton.jit
def scale_kernel(x_ptr, s_ptr, sc_ptr, out_ptr, C, HW, sxn, sxc, sxhw, ssn, ssc, sshw, son, soc, sohw,
                 HAS_SC: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
    acc_t = s_ptr.dtype.element_ty
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    hw = tl.program_id(2) * BHW + tl.arange(0, BHW)
    ok = (c < C)[:, None] & (hw < HW)[None, :]
    s = tl.load(s_ptr + n * C + c, mask=c < C, other=0.0)
    x = tl.load(x_ptr + offsets(n, c, hw, sxn, sxc, sxhw), mask=ok, other=0.0).to(acc_t)
    y = x * s[:, None]
    if HAS_SC:
        y += tl.load(sc_ptr + offsets(n, c, hw, ssn, ssc, sshw), mask=ok, other=0.0).to(acc_t)
    tl.store(out_ptr + offsets(n, c, hw, son, soc, sohw), y.to(out_ptr.dtype.element_ty), mask=ok)


def _output(x: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x, dtype=x.dtype if shortcut is None else torch.promote_types(x.dtype, shortcut.dtype))


@torch.library.custom_op("seify::se_scale", mutates_args=())
def se_scale(x: torch.Tensor, s: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = x.shape
    out = _output(x, shortcut)
    sc = x if shortcut is None else shortcut
    with guarded(x.device):  # kernels launch on the current device, which may be another
        scale_kernel[grid(x, True)](x, s, sc, out, c, h * w, *hw_strides(x), *hw_strides(sc), *hw_strides(out),
                                    HAS_SC=shortcut is not None, BC=BLOCK_C, BHW=BLOCK_HW)
    return out


se_scale.register_fake(lambda x, s, shortcut: _output(x, shortcut))
