"""x's gradient in one pass: g * s plus the squeeze's share of dz, dz / HW everywhere (avg) or dz / ties at the
maxima (max)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import guarded
from .common import BLOCK_C, BLOCK_HW, grid, hw_strides
from .index import offsets


@triton.jit
def input_grad_kernel(g_ptr, x_ptr, s_ptr, dz_ptr, z_ptr, count_ptr, dx_ptr, C, HW, sgn, sgc, sghw, sxn, sxc, sxhw,
                      sdn, sdc, sdhw, MAX: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
    acc_t = s_ptr.dtype.element_ty
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    hw = tl.program_id(2) * BHW + tl.arange(0, BHW)
    c_ok = c < C
    ok = c_ok[:, None] & (hw < HW)[None, :]
    s = tl.load(s_ptr + n * C + c, mask=c_ok, other=0.0)
    dz = tl.load(dz_ptr + n * C + c, mask=c_ok, other=0.0)
    g = tl.load(g_ptr + offsets(n, c, hw, sgn, sgc, sghw), mask=ok, other=0.0).to(acc_t)
    dx = g * s[:, None]
    if MAX:
        z = tl.load(z_ptr + n * C + c, mask=c_ok, other=0.0)
        ties = tl.load(count_ptr + n * C + c, mask=c_ok, other=1.0)
        x = tl.load(x_ptr + offsets(n, c, hw, sxn, sxc, sxhw), mask=ok, other=0.0).to(acc_t)
        dx += tl.where(x == z[:, None], (dz / ties)[:, None], 0.0)
    else:
        dx += (dz / HW)[:, None]
    tl.store(dx_ptr + offsets(n, c, hw, sdn, sdc, sdhw), dx.to(dx_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("seify::se_input_grad", mutates_args=())
def se_input_grad(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, dz: torch.Tensor, z: torch.Tensor,
                  ties: torch.Tensor, use_max: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    dx = torch.empty_like(x)
    with guarded(x.device):  # kernels launch on the current device, which may be another
        input_grad_kernel[grid(x, True)](grad, x, s, dz, z, ties, dx, c, h * w, *hw_strides(grad), *hw_strides(x),
                                         *hw_strides(dx), MAX=use_max, BC=BLOCK_C, BHW=BLOCK_HW)
    return dx


se_input_grad.register_fake(lambda grad, x, s, dz, z, ties, use_max: torch.empty_like(x))
