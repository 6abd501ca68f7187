"""Fused Triton kernels for the SE block, opt-in with ``SEIFY_KERNELS=triton`` or ``seify.kernels.use(True)``.

SE adds well under 1% of a ResNet's multiply-adds, yet in eager PyTorch the squeeze, the broadcast scale, the
residual sum and their backward each take a full pass over the feature map. Here an SE site costs three passes
more than the plain residual sum:

- forward: the squeeze (``squeeze``: per-(n, c) mean or max, fp32 accumulation), the excitation's two small
  matrix products in PyTorch, then one pass for ``shortcut + x * s * drop_path_factor`` (``scale``);
- backward: one pass reads the incoming gradient and x for the gate's gradient (``gate_grad``), one writes x's
  gradient including the squeeze's share (``input_grad``); the shortcut's gradient is the incoming one.

Each module holds one kernel and its ``torch.library`` custom op with a fake implementation, so ``torch.compile``
keeps each as one node of one graph. They are imported, and so registered, on the first ``use(True)``. They run
on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the test suite checks them). Elsewhere, or while
off, SE keeps its PyTorch path; state_dicts are the same either way.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch
import torch.nn.functional as F

from .common import dense

_ACTIVE = False
_INTERPRETED = False
_OPS = ("squeeze", "scale", "gate_grad", "input_grad")


def use(active: bool = True) -> bool:
    """Turn the Triton path on or off for this process; returns whether it is on (Triton may be missing).

    The kernels are defined on the first ``use(True)``, in Triton's CPU interpreter if ``TRITON_INTERPRET=1`` is
    set then (Triton reads it when a kernel is decorated). Importing seify does this when ``SEIFY_KERNELS=triton``.
    """
    global _ACTIVE
    _ACTIVE = active and _register()
    return _ACTIVE


@functools.cache
def _register() -> bool:
    """Import the kernels' modules once, which registers their ops as ``torch.ops.seify.*``; False without
    Triton."""
    global _INTERPRETED
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    _INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
    for name in _OPS:
        importlib.import_module(f".{name}", __name__)
    return True


@contextlib.contextmanager
def disabled():
    """The PyTorch path for a while, whatever ``use`` said: what export writes must run without seify's ops."""
    global _ACTIVE
    was, _ACTIVE = _ACTIVE, False
    try:
        yield
    finally:
        _ACTIVE = was


def usable_for(x: torch.Tensor) -> bool:
    """Whether this SE input takes the Triton path: on, and a CUDA tensor (or any tensor when interpreted).

    Only module globals are read here, so that torch.compile traces it without a graph break.
    """
    if not _ACTIVE or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    return x.is_cuda or _INTERPRETED


def _gate_and_derivative(pre: torch.Tensor, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if hard:
        inside = (pre > -3) & (pre < 3)
        return F.hardsigmoid(pre), inside.to(pre.dtype) / 6
    gate = torch.sigmoid(pre)
    return gate, gate * (1 - gate)


class _SEFunction(torch.autograd.Function):
    """shortcut + x * s * factor with s = scale * gate(fc2(relu(fc1(squeeze(x))))), on the Triton ops.

    The excitation's backward is written out (it is four small matrix products) so that the gradient reaching
    the squeeze joins x's gradient in the same pass that applies the gate.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, shortcut, factor, scale, use_max, hard):
        ops = torch.ops.seify
        x = dense(x)
        shortcut = None if shortcut is None else dense(shortcut)
        z = ops.se_squeeze(x, use_max)
        with torch.autocast(x.device.type, enabled=False):  # the excitation stays in the accumulator's precision
            hidden_pre = F.linear(z, w1.to(z.dtype), b1.to(z.dtype))
            hidden = torch.relu(hidden_pre)
            gate, gate_slope = _gate_and_derivative(F.linear(hidden, w2.to(z.dtype), b2.to(z.dtype)), hard)
        s = gate * scale if factor is None else gate * scale * factor.to(z.dtype)[:, None]
        out = ops.se_scale(x, s.contiguous(), shortcut)
        ctx.save_for_backward(x, w1, w2, z, hidden_pre, hidden, gate_slope, s, factor)
        ctx.flags = (scale, use_max, shortcut.dtype if shortcut is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, z, hidden_pre, hidden, gate_slope, s, factor = ctx.saved_tensors
        scale, use_max, shortcut_dtype = ctx.flags
        ops = torch.ops.seify
        grad = dense(grad)
        ds, ties = ops.se_gate_grad(grad, x, z, use_max)
        dgate = ds * scale if factor is None else ds * scale * factor.to(ds.dtype)[:, None]
        d_pre2 = dgate * gate_slope
        with torch.autocast(grad.device.type, enabled=False):
            d_hidden_pre = (d_pre2 @ w2.to(ds.dtype)) * (hidden_pre > 0)
            dz = d_hidden_pre @ w1.to(ds.dtype)
            dw1, dw2 = d_hidden_pre.t() @ z, d_pre2.t() @ hidden
        dx = ops.se_input_grad(grad, x, s, dz.contiguous(), z, ties, use_max)
        dshortcut = grad.to(shortcut_dtype) if shortcut_dtype is not None else None
        weight_grads = (dw1.to(w1.dtype), d_hidden_pre.sum(0).to(w1.dtype), dw2.to(w2.dtype),
                        d_pre2.sum(0).to(w2.dtype))
        return (dx, *weight_grads, dshortcut, None, None, None, None)


def squeeze_excite(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   shortcut: torch.Tensor | None = None, factor: torch.Tensor | None = None, scale: float = 1.0,
                   squeeze: str = "avg", gate: str = "sigmoid") -> torch.Tensor:
    """The fused SE site: ``shortcut + x * factor[n] * scale * gate(...)`` (fc weights as (out, in))."""
    return _SEFunction.apply(x, w1, b1, w2, b2, shortcut, factor, float(scale), squeeze == "max",
                             gate == "hard-sigmoid")


if os.environ.get("SEIFY_KERNELS", "").lower() == "triton":
    use(True)
