"""The squeeze: the per-(n, c) mean (or max) of a feature map, accumulated in fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import guarded
from .common import BLOCK_C, BLOCK_HW, grid, hw_strides, per_channel
from .index import offsets


@triton.jit
def squeeze_kernel(x_ptr, z_ptr, C, HW, sxn, sxc, sxhw, MAX: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
    acc_t = z_ptr.dtype.element_ty
    n = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    if MAX:
        acc = tl.full((BC,), float("-inf"), acc_t)
    else:
        acc = tl.zeros((BC,), acc_t)
    for start in range(0, HW, BHW):
        hw = start + tl.arange(0, BHW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        ptrs = x_ptr + offsets(n, c, hw, sxn, sxc, sxhw)
        if MAX:
            v = tl.load(ptrs, mask=ok, other=float("-inf")).to(acc_t)
            acc = tl.maximum(acc, tl.max(v, axis=1))
        else:
            v = tl.load(ptrs, mask=ok, other=0.0).to(acc_t)
            acc += tl.sum(v, axis=1)
    if not MAX:
        acc = acc / HW
    tl.store(z_ptr + n * C + c, acc, mask=c_ok)


@torch.library.custom_op("seify::se_squeeze", mutates_args=())
def se_squeeze(x: torch.Tensor, use_max: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    z = per_channel(x)
    with guarded(x.device):  # kernels launch on the current device, which may be another
        squeeze_kernel[grid(x)](x, z, c, h * w, *hw_strides(x), MAX=use_max, BC=BLOCK_C, BHW=BLOCK_HW)
    return z


se_squeeze.register_fake(lambda x, use_max: per_channel(x))  # what compile and export see
