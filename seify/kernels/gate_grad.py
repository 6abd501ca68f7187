"""The gate's gradient: ds[n, c] = sum over H x W of g * x; for a max squeeze also how many positions hold the
maximum (they share its gradient)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import guarded
from .common import BLOCK_C, BLOCK_HW, grid, hw_strides, per_channel
from .index import offsets


@triton.jit
def gate_grad_kernel(g_ptr, x_ptr, z_ptr, ds_ptr, count_ptr, C, HW, sgn, sgc, sghw, sxn, sxc, sxhw,
                     MAX: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
    acc_t = ds_ptr.dtype.element_ty
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    acc = tl.zeros((BC,), acc_t)
    ties = tl.zeros((BC,), acc_t)
    if MAX:
        z = tl.load(z_ptr + n * C + c, mask=c_ok, other=0.0)
    for start in range(0, HW, BHW):
        hw = start + tl.arange(0, BHW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        g = tl.load(g_ptr + offsets(n, c, hw, sgn, sgc, sghw), mask=ok, other=0.0).to(acc_t)
        x = tl.load(x_ptr + offsets(n, c, hw, sxn, sxc, sxhw), mask=ok, other=0.0).to(acc_t)
        acc += tl.sum(g * x, axis=1)
        if MAX:
            ties += tl.sum(tl.where(ok & (x == z[:, None]), 1.0, 0.0), axis=1)
    tl.store(ds_ptr + n * C + c, acc, mask=c_ok)
    if MAX:
        tl.store(count_ptr + n * C + c, ties, mask=c_ok)


@torch.library.custom_op("seify::se_gate_grad", mutates_args=())
def se_gate_grad(grad: torch.Tensor, x: torch.Tensor, z: torch.Tensor, use_max: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    ds, ties = per_channel(x), per_channel(x)
    with guarded(x.device):  # kernels launch on the current device, which may be another
        gate_grad_kernel[grid(x)](grad, x, z, ds, ties, c, h * w, *hw_strides(grad), *hw_strides(x), MAX=use_max,
                                  BC=BLOCK_C, BHW=BLOCK_HW)
    return ds, ties


se_gate_grad.register_fake(lambda grad, x, z, use_max: (per_channel(x), per_channel(x)))
