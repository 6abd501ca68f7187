"""Fused Triton kernels for the SE block, opt-in with ``SEIFY_KERNELS=triton`` or ``seify.kernels.use(True)``.

SE adds well under 1% of a ResNet's multiply-adds, yet in eager PyTorch the squeeze, the broadcast scale, the
residual sum and their backward each take a full pass over the feature map. Here an SE site costs three passes
more than the plain residual sum:

- forward: the squeeze (per-(n, c) mean or max, fp32 accumulation), the excitation's two small matrix products in
  PyTorch, then one pass for ``relu?(shortcut + x * s * drop_path_factor)`` in place of the sum;
- backward: one pass reads the incoming gradient and x for the gate's gradient, one writes x's gradient
  including the squeeze's share (dz / HW for avg); the shortcut's gradient is the incoming one, aliased when no
  ReLU is fused.

The kernels are ``torch.library`` custom ops with fake implementations, so ``torch.compile`` keeps each as one
node of one graph. They run on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the test suite checks
them). Elsewhere, or while off, SE keeps its PyTorch path; state_dicts are the same either way.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

BLOCK_C = 32
BLOCK_HW = 64
_ACTIVE = False
_INTERPRETED = False


def use(active: bool = True) -> bool:
    """Turn the Triton path on or off for this process; returns whether it is on (Triton may be missing).

    Kernels are defined on the first ``use(True)``, in Triton's CPU interpreter if ``TRITON_INTERPRET=1`` is set
    then (Triton reads it when a kernel is decorated). Importing seify does this when ``SEIFY_KERNELS=triton``.
    """
    global _ACTIVE
    _ACTIVE = active and _define_ops()
    return _ACTIVE


def usable_for(x: torch.Tensor) -> bool:
    """Whether this SE input takes the Triton path: on, and a CUDA tensor (or any tensor when interpreted).

    Only module globals are read here, so that torch.compile traces it without a graph break.
    """
    if not _ACTIVE or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    return x.is_cuda or _INTERPRETED


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 maps; float64 stays float64 (so that gradcheck can run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hw_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, hw) strides of an NCHW or channels_last tensor, whose H and W flatten into one index."""
    if t.stride(2) != t.shape[3] * t.stride(3):
        raise ValueError("SE kernels take NCHW or channels_last tensors")
    return t.stride(0), t.stride(1), t.stride(3)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when its H and W flatten into one index (NCHW, channels_last), else an NCHW copy."""
    return t if t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    """An (N, C) accumulator-precision tensor for ``x``: the squeeze, the gate's gradient, the tie counts."""
    return x.new_empty(x.shape[:2], dtype=accumulator(x.dtype))


def _scaled_output(x: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x, dtype=x.dtype if shortcut is None else torch.promote_types(x.dtype, shortcut.dtype))


def _gate_grad_outputs(grad: torch.Tensor, x: torch.Tensor, relu: bool):
    """(gradient behind the fused ReLU, gate gradient, tie counts). Without a ReLU the first is empty: a custom op
    may not return one of its inputs, and the caller uses the incoming gradient itself."""
    return (torch.empty_like(grad) if relu else x.new_empty(0)), _per_channel(x), _per_channel(x)


@functools.cache
def _define_ops() -> bool:
    """Define the kernels and register them as ``torch.ops.seify.*``, once; False where Triton is missing."""
    global _INTERPRETED
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False
    _INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def squeeze_kernel(x_ptr, z_ptr, C, HW, sxn, sxc, sxhw, MAX: tl.constexpr, BC: tl.constexpr,
                       BHW: tl.constexpr):
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
            ptrs = x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw
            if MAX:
                v = tl.load(ptrs, mask=ok, other=float("-inf")).to(acc_t)
                acc = tl.maximum(acc, tl.max(v, axis=1))
            else:
                v = tl.load(ptrs, mask=ok, other=0.0).to(acc_t)
                acc += tl.sum(v, axis=1)
        if not MAX:
            acc = acc / HW
        tl.store(z_ptr + n * C + c, acc, mask=c_ok)

    @triton.jit
    def scale_kernel(x_ptr, s_ptr, sc_ptr, out_ptr, C, HW, sxn, sxc, sxhw, ssn, ssc, sshw, son, soc, sohw,
                     HAS_SC: tl.constexpr, RELU: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
        acc_t = s_ptr.dtype.element_ty
        n = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        hw = tl.program_id(2) * BHW + tl.arange(0, BHW)
        ok = (c < C)[:, None] & (hw < HW)[None, :]
        s = tl.load(s_ptr + n * C + c, mask=c < C, other=0.0)
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=ok, other=0.0).to(acc_t)
        y = x * s[:, None]
        if HAS_SC:
            y += tl.load(sc_ptr + n * ssn + c[:, None] * ssc + hw[None, :] * sshw, mask=ok, other=0.0).to(acc_t)
        if RELU:
            y = tl.maximum(y, 0.0)
        out = out_ptr + n * son + c[:, None] * soc + hw[None, :] * sohw
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def gate_grad_kernel(g_ptr, x_ptr, y_ptr, z_ptr, gp_ptr, ds_ptr, count_ptr, C, HW, sgn, sgc, sghw, sxn, sxc,
                         sxhw, syn, syc, syhw, spn, spc, sphw, RELU: tl.constexpr, MAX: tl.constexpr,
                         BC: tl.constexpr, BHW: tl.constexpr):
        # ds[n, c] = sum over HW of g' * x, where g' is the gradient behind the fused ReLU (written out for the
        # shortcut); for max squeeze also how many positions hold the maximum, which share its gradient.
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
            g = tl.load(g_ptr + n * sgn + c[:, None] * sgc + hw[None, :] * sghw, mask=ok, other=0.0)
            if RELU:
                y = tl.load(y_ptr + n * syn + c[:, None] * syc + hw[None, :] * syhw, mask=ok, other=0.0)
                g = tl.where(y > 0, g, 0.0).to(gp_ptr.dtype.element_ty)
                tl.store(gp_ptr + n * spn + c[:, None] * spc + hw[None, :] * sphw, g, mask=ok)
            x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=ok, other=0.0).to(acc_t)
            acc += tl.sum(g.to(acc_t) * x, axis=1)
            if MAX:
                ties += tl.sum(tl.where(ok & (x == z[:, None]), 1.0, 0.0), axis=1)
        tl.store(ds_ptr + n * C + c, acc, mask=c_ok)
        if MAX:
            tl.store(count_ptr + n * C + c, ties, mask=c_ok)

    @triton.jit
    def input_grad_kernel(gp_ptr, x_ptr, s_ptr, dz_ptr, z_ptr, count_ptr, dx_ptr, C, HW, spn, spc, sphw, sxn, sxc,
                          sxhw, sdn, sdc, sdhw, MAX: tl.constexpr, BC: tl.constexpr, BHW: tl.constexpr):
        # dx = g' * s plus the squeeze's share of dz: dz / HW everywhere (avg), or dz / ties at the maxima (max).
        acc_t = s_ptr.dtype.element_ty
        n = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        hw = tl.program_id(2) * BHW + tl.arange(0, BHW)
        c_ok = c < C
        ok = c_ok[:, None] & (hw < HW)[None, :]
        s = tl.load(s_ptr + n * C + c, mask=c_ok, other=0.0)
        dz = tl.load(dz_ptr + n * C + c, mask=c_ok, other=0.0)
        g = tl.load(gp_ptr + n * spn + c[:, None] * spc + hw[None, :] * sphw, mask=ok, other=0.0).to(acc_t)
        dx = g * s[:, None]
        if MAX:
            z = tl.load(z_ptr + n * C + c, mask=c_ok, other=0.0)
            ties = tl.load(count_ptr + n * C + c, mask=c_ok, other=1.0)
            x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=ok, other=0.0).to(acc_t)
            dx += tl.where(x == z[:, None], (dz / ties)[:, None], 0.0)
        else:
            dx += (dz / HW)[:, None]
        tl.store(dx_ptr + n * sdn + c[:, None] * sdc + hw[None, :] * sdhw, dx.to(dx_ptr.dtype.element_ty), mask=ok)

    def grid(x: torch.Tensor, tiles_hw: bool = False) -> tuple[int, ...]:
        n, c, h, w = x.shape
        blocks = (n, triton.cdiv(c, BLOCK_C))
        return (*blocks, triton.cdiv(h * w, BLOCK_HW)) if tiles_hw else blocks

    @torch.library.custom_op("seify::se_squeeze", mutates_args=())
    def se_squeeze(x: torch.Tensor, use_max: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        z = _per_channel(x)
        squeeze_kernel[grid(x)](x, z, c, h * w, *_hw_strides(x), MAX=use_max, BC=BLOCK_C, BHW=BLOCK_HW)
        return z

    @torch.library.custom_op("seify::se_scale", mutates_args=())
    def se_scale(x: torch.Tensor, s: torch.Tensor, shortcut: torch.Tensor | None, relu: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        out = _scaled_output(x, shortcut)
        sc = x if shortcut is None else shortcut
        scale_kernel[grid(x, True)](
            x, s, sc, out, c, h * w, *_hw_strides(x), *_hw_strides(sc), *_hw_strides(out),
            HAS_SC=shortcut is not None, RELU=relu, BC=BLOCK_C, BHW=BLOCK_HW)
        return out

    @torch.library.custom_op("seify::se_gate_grad", mutates_args=())
    def se_gate_grad(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, z: torch.Tensor, relu: bool,
                     use_max: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        grad_behind_relu, ds, ties = _gate_grad_outputs(grad, x, relu)
        written = grad_behind_relu if relu else grad  # the kernel writes it only behind a ReLU
        gate_grad_kernel[grid(x)](
            grad, x, out, z, written, ds, ties, c, h * w, *_hw_strides(grad), *_hw_strides(x), *_hw_strides(out),
            *_hw_strides(written), RELU=relu, MAX=use_max, BC=BLOCK_C, BHW=BLOCK_HW)
        return grad_behind_relu, ds, ties

    @torch.library.custom_op("seify::se_input_grad", mutates_args=())
    def se_input_grad(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, dz: torch.Tensor, z: torch.Tensor,
                      ties: torch.Tensor, use_max: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        dx = torch.empty_like(x)
        input_grad_kernel[grid(x, True)](
            grad, x, s, dz, z, ties, dx, c, h * w, *_hw_strides(grad), *_hw_strides(x), *_hw_strides(dx),
            MAX=use_max, BC=BLOCK_C, BHW=BLOCK_HW)
        return dx

    # What compile and export see: the same allocations, without running a kernel.
    se_squeeze.register_fake(lambda x, use_max: _per_channel(x))
    se_scale.register_fake(lambda x, s, shortcut, relu: _scaled_output(x, shortcut))
    se_gate_grad.register_fake(lambda grad, x, out, z, relu, use_max: _gate_grad_outputs(grad, x, relu))
    se_input_grad.register_fake(lambda grad, x, s, dz, z, ties, use_max: torch.empty_like(x))
    return True


def _gate_and_derivative(pre: torch.Tensor, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if hard:
        inside = (pre > -3) & (pre < 3)
        return F.hardsigmoid(pre), inside.to(pre.dtype) / 6
    gate = torch.sigmoid(pre)
    return gate, gate * (1 - gate)


class _SEFunction(torch.autograd.Function):
    """relu?(shortcut + x * s * factor) with s = scale * gate(fc2(relu(fc1(squeeze(x))))), on the Triton ops.

    The excitation's backward is written out (it is four small matrix products) so that the gradient reaching
    the squeeze joins x's gradient in the same pass that applies the gate.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, shortcut, factor, scale, use_max, hard, relu):
        ops = torch.ops.seify
        x = _dense(x)
        shortcut = None if shortcut is None else _dense(shortcut)
        z = ops.se_squeeze(x, use_max)
        with torch.autocast(x.device.type, enabled=False):  # the excitation stays in the accumulator's precision
            hidden_pre = F.linear(z, w1.to(z.dtype), b1.to(z.dtype))
            hidden = torch.relu(hidden_pre)
            gate, gate_slope = _gate_and_derivative(F.linear(hidden, w2.to(z.dtype), b2.to(z.dtype)), hard)
        s = gate * scale if factor is None else gate * scale * factor.to(z.dtype)[:, None]
        out = ops.se_scale(x, s.contiguous(), shortcut, relu)
        # the output is kept only for the fused ReLU's mask: without one, a following in-place op may change it
        ctx.save_for_backward(x, w1, w2, z, hidden_pre, hidden, gate_slope, s, factor, out if relu else None)
        ctx.flags = (scale, use_max, relu, shortcut is not None, shortcut.dtype if shortcut is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, z, hidden_pre, hidden, gate_slope, s, factor, out = ctx.saved_tensors
        scale, use_max, relu, has_shortcut, shortcut_dtype = ctx.flags
        ops = torch.ops.seify
        grad = _dense(grad)
        grad_behind_relu, ds, ties = ops.se_gate_grad(grad, x, out if relu else x, z, relu, use_max)
        if not relu:
            grad_behind_relu = grad
        dgate = ds * scale if factor is None else ds * scale * factor.to(ds.dtype)[:, None]
        d_pre2 = dgate * gate_slope
        with torch.autocast(grad.device.type, enabled=False):
            d_hidden_pre = (d_pre2 @ w2.to(ds.dtype)) * (hidden_pre > 0)
            dz = d_hidden_pre @ w1.to(ds.dtype)
            dw1, dw2 = d_hidden_pre.t() @ z, d_pre2.t() @ hidden
        dx = ops.se_input_grad(grad_behind_relu, x, s, dz.contiguous(), z, ties, use_max)
        dshortcut = grad_behind_relu.to(shortcut_dtype) if has_shortcut else None
        weight_grads = (dw1.to(w1.dtype), d_hidden_pre.sum(0).to(w1.dtype), dw2.to(w2.dtype),
                        d_pre2.sum(0).to(w2.dtype))
        return (dx, *weight_grads, dshortcut, None, None, None, None, None)


def squeeze_excite(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   shortcut: torch.Tensor | None = None, factor: torch.Tensor | None = None, scale: float = 1.0,
                   squeeze: str = "avg", gate: str = "sigmoid", relu: bool = False) -> torch.Tensor:
    """The fused SE site: ``relu?(shortcut + x * factor[n] * scale * gate(...))`` (fc weights as (out, in))."""
    return _SEFunction.apply(x, w1, b1, w2, b2, shortcut, factor, float(scale), squeeze == "max",
                             gate == "hard-sigmoid", relu)


if os.environ.get("SEIFY_KERNELS", "").lower() == "triton":
    use(True)
