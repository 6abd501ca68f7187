"""The blocks seify inserts at a site: the Squeeze-and-Excitation block (Hu et al., Sec. 3), laid out like timm's
``SEModule``, and its control without input-conditioning, a static per-channel scale and shift.

Attribute names (``fc1``, ``bn``, ``act``, ``fc2``, ``gate``) match timm's so that a converted ResNet's
state_dict loads strictly into timm's native SE twin (``seresnet50`` and friends).
"""

from typing import Optional

import torch
from torch import nn

from . import kernels
from .options import SQUEEZES

GATE_LAYERS = {"sigmoid": nn.Sigmoid, "hard-sigmoid": nn.Hardsigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
# The fc2 bias at which each gate is exactly 0.5 (float32): with fc2's weights zero, a fresh block halves its input
# whatever it is, and surgery's x2 makes it the identity (tanh and ReLU are the paper's Table 12 alternatives).
HALF_AT = {"sigmoid": 0.0, "hard-sigmoid": 0.0, "tanh": 0.5493061542510986, "relu": 0.5}


def reduced_channels(channels: int, reduction: float = 16, divisor: int = 8, min_channels: int = 8) -> int:
    """C/r rounded to the nearest multiple of ``divisor`` and at least ``min_channels`` (timm's rounding)."""
    rounded = int(channels / reduction + divisor / 2) // divisor * divisor
    return max(min_channels, rounded)


class SiteBlock(nn.Module):
    """What seify inserts at a site: called as ``block(x)``, or ``block(x, shortcut, factor)`` where surgery fused
    the residual sum that follows into it (``shortcut + block(x) * factor``)."""


class ChannelScale(SiteBlock):
    """x * weight + bias per channel, the identity at the start: SE without input-conditioning.

    SSF's scale and shift (Lian et al., NeurIPS 2022) at the sites where SE would go, the control that tells
    whether SE's gains come from attention or from rescaling alone.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                factor: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = x * self.weight[:, None, None].to(x.dtype) + self.bias[:, None, None].to(x.dtype)
        if shortcut is None:
            return y
        if factor is not None:
            y = y * factor.to(y.dtype)
        return shortcut + y


class SqueezeExcite(SiteBlock):
    """x * gate(fc2(act(fc1(squeeze(x))))), channel-wise.

    ``scale`` multiplies the gate. Surgery sets it to 2 only where the gate's initial 0.5 could not be folded
    exactly into a neighbouring layer, so that a freshly inserted block passes its input through unchanged.
    """

    def __init__(self, channels: int, rd_channels: int, squeeze: str = "avg", gate: str = "sigmoid",
                 scale: float = 1.0):
        super().__init__()
        if squeeze not in SQUEEZES:
            raise ValueError(f"squeeze must be one of {SQUEEZES}, not {squeeze!r}")
        self.squeeze = squeeze
        self.scale = scale
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate_kind = gate
        self.gate = GATE_LAYERS[gate]()

    def excite(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate s, shaped (N, C, 1, 1).

        fc1 and fc2 are called as the modules they are, as timm's ``SEModule`` calls them, so that forward hooks,
        pruning, quantization and LoRA wrappers see them (a matrix product on their weights would hide them: at
        most tens of microseconds per block on a CPU, about 1% of ResNet-50 at batch 1).
        """
        z = x.mean((2, 3), keepdim=True) if self.squeeze == "avg" else x.amax((2, 3), keepdim=True)
        s = self.gate(self.fc2(self.act(self.bn(self.fc1(z)))))
        if self.scale != 1.0:
            s = s * self.scale
        return s

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None,
                factor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x * s; with a ``shortcut``, ``shortcut + x * s * factor`` in one pass over the feature map.

        ``factor`` (N, 1, 1, 1) is drop-path's per-sample draw, ``drop_path(ones)``: applied to the (N, C, 1, 1) gate
        instead of the (N, C, H, W) product it gives the same numbers for far less memory traffic. Surgery computes
        it in the graph, so that the block takes tensors only and scripts and exports as a plain call.
        """
        if not torch.jit.is_scripting() and self._takes_kernels(x):
            return self._fused(x, shortcut, factor)
        s = self.excite(x)
        if shortcut is None:
            return x * s
        if factor is not None:
            s = s * factor.to(s.dtype)
        return torch.addcmul(shortcut, x, s)

    @torch.jit.unused
    def _takes_kernels(self, x: torch.Tensor) -> bool:
        """Whether this call runs on seify's Triton kernels (``SEIFY_KERNELS=triton``, CUDA tensors)."""
        return kernels.usable_for(x) and isinstance(self.bn, nn.Identity) and isinstance(self.act, nn.ReLU) and \
            isinstance(self.gate, (nn.Sigmoid, nn.Hardsigmoid))  # the gates the kernels implement

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, shortcut: Optional[torch.Tensor], factor: Optional[torch.Tensor]
               ) -> torch.Tensor:
        """The same computation on seify's Triton kernels."""
        bias1, bias2 = self.fc1.bias, self.fc2.bias
        assert bias1 is not None and bias2 is not None  # built with bias=True
        per_sample = factor.flatten() if shortcut is not None and factor is not None else None
        return kernels.squeeze_excite(x, self.fc1.weight.flatten(1), bias1, self.fc2.weight.flatten(1), bias2,
                                      shortcut, per_sample, self.scale, self.squeeze,
                                      self.gate_kind)

    def init_identity(self) -> None:
        """Zero the last layer's weights and set its bias so that the gate is a constant 0.5 (exactly) whatever
        the input.

        fc1 keeps its random initialisation: fc2's gradient is non-zero from the first step, and fc1's follows.
        """
        nn.init.zeros_(self.fc2.weight)
        if self.fc2.bias is not None:
            nn.init.constant_(self.fc2.bias, HALF_AT[self.gate_kind])

    def constant_gate(self) -> Optional[torch.Tensor]:
        """The per-channel multiplier, (C,), where the gate does not depend on the input (fc2's weights are all
        zero), else None."""
        if self.fc2.weight.count_nonzero() or self.fc2.bias is None:
            return None
        with torch.no_grad():
            return self.gate(self.fc2.bias.detach().clone()) * self.scale

    def extra_repr(self) -> str:
        return f"squeeze={self.squeeze}, scale={self.scale}" if self.scale != 1.0 else f"squeeze={self.squeeze}"
