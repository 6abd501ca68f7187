"""The Squeeze-and-Excitation block (Hu et al., Sec. 3), laid out like timm's ``SEModule``.

Attribute names (``fc1``, ``bn``, ``act``, ``fc2``, ``gate``) match timm's so that a converted ResNet's
state_dict loads strictly into timm's native SE twin (``seresnet50`` and friends).
"""
from __future__ import annotations

import torch
from torch import nn

SQUEEZES = ("avg", "max")
GATES = {"sigmoid": nn.Sigmoid, "hard-sigmoid": nn.Hardsigmoid}


def reduced_channels(channels: int, reduction: float = 16, divisor: int = 8, min_channels: int = 8) -> int:
    """C/r rounded to the nearest multiple of ``divisor`` and at least ``min_channels`` (timm's rounding)."""
    rounded = int(channels / reduction + divisor / 2) // divisor * divisor
    return max(min_channels, rounded)


class SqueezeExcite(nn.Module):
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
        self.gate = GATES[gate]()

    def excite(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate s, shaped (N, C, 1, 1)."""
        if self.squeeze == "avg":
            z = x.mean((2, 3), keepdim=True)
        else:
            z = x.amax((2, 3), keepdim=True)
        s = self.gate(self.fc2(self.act(self.bn(self.fc1(z)))))
        return s * self.scale if self.scale != 1.0 else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(x)

    def init_identity(self) -> None:
        """Zero the last layer so the gate is a constant 0.5 (exactly) whatever the input.

        fc1 keeps its random initialisation: fc2's gradient is non-zero from the first step, and fc1's follows.
        """
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def extra_repr(self) -> str:
        return f"squeeze={self.squeeze}, scale={self.scale}" if self.scale != 1.0 else f"squeeze={self.squeeze}"
