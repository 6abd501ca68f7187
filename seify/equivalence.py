"""Whether two models compute the same: the one check that convert, export and fold make, with one tolerance.

Two models agree when, for every tensor they return (logits; a detector's boxes, scores and labels; a backbone's
feature maps), ``max |a - b| <= TOLERANCE x max |a|``: relative to that tensor's own scale in the reference, since
fp32 kernels that sum in another order (onnxruntime, a folded multiplier) differ in the last bits of each output,
and those bits grow with the outputs; and per tensor, so that a detector's scores (at most 1) are not checked
against its box coordinates (hundreds). Outputs of other shapes, and any NaN or Inf on either side, never agree:
a NaN difference would otherwise compare as no difference at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Difference:
    """The worst tensor of two models' outputs: its largest difference and the reference's largest magnitude in
    it (the tensor whose difference is the largest share of its magnitude)."""
    max_abs: float = 0.0
    scale: float = 0.0
    finite: bool = True  # both sides' outputs were finite
    same_shapes: bool = True

    @property
    def allowed(self) -> float:
        return TOLERANCE * self.scale

    @property
    def agrees(self) -> bool:
        return self.finite and self.same_shapes and self.max_abs <= self.allowed

    @property
    def share(self) -> float:
        """The difference as a share of the magnitude (inf where a zero tensor got anything else)."""
        if self.max_abs == 0:
            return 0.0
        return self.max_abs / self.scale if self.scale else math.inf

    def __or__(self, other: Difference) -> Difference:
        """The worst of two checks (two inputs, two parts of a model, two tensors)."""
        worst = max(self, other, key=lambda d: d.share)
        return Difference(worst.max_abs, worst.scale, self.finite and other.finite,
                          self.same_shapes and other.same_shapes)

    def why(self) -> str:
        """What disagrees, in words, for an error message."""
        if not self.same_shapes:
            return "the outputs have other shapes"
        if not self.finite:
            return "the outputs are not finite (NaN or Inf); check the weights for NaN or Inf"
        return f"outputs differ by up to {self.max_abs:.3g} (they reach {self.scale:.3g}; allowed {self.allowed:.3g})"


def tensors(outputs) -> list[torch.Tensor]:
    """Every tensor in a model's outputs (a tensor, a tuple, a dict of lists...), non-empty ones only."""
    return [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.numel()]


def difference(expected, got) -> Difference:
    """Compare the outputs of a reference (``expected``) and another model (``got``), in float32 on the CPU."""
    a = [t.detach().float().cpu() for t in tensors(expected)]
    b = [torch.as_tensor(t).detach().float().cpu() for t in tensors(got)]
    scale = max((t.abs().max().item() for t in a), default=0.0)
    finite = all(bool(torch.isfinite(t).all()) for t in a + b)
    if [t.shape for t in a] != [t.shape for t in b]:
        return Difference(math.inf, scale, finite, same_shapes=False)
    if not finite:
        return Difference(math.inf, scale if math.isfinite(scale) else math.inf, finite=False)
    checked = Difference()
    for p, q in zip(a, b, strict=True):
        checked = checked | Difference((p - q).abs().max().item(), p.abs().max().item())
    return checked


def probe(input_size, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random input: the same for every check of the same size and seed."""
    return torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed))


def compare(reference: nn.Module, other: nn.Module, input_size, batch: int = 2, seed: int = 0) -> Difference:
    """Both models in eval mode on one fixed random probe, on the reference's device."""
    x = probe(input_size, batch, seed).to(next(reference.parameters(), torch.empty(0)).device)
    with torch.no_grad():
        return difference(reference.eval()(x), other.eval()(x))
