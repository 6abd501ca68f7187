"""Channel gates: every block that computes ``x * gate(f(pool(x)))`` per channel, found, recorded over images and
replaced by a per-channel constant. The one room that knows them; analyze, fold, profile and convert ask it.

Found by their class: seify's own block; timm's ``SEModule``, ``EffectiveSEModule``, ``SqueezeExciteCl``, the
EfficientNet/MobileNetV3/GhostNet ``SqueezeExcite``, the legacy SENet module, ``EcaModule``/``CecaModule`` and
HGNet's ``EseModule``; torchvision's ``SqueezeExcitation``. Found by their shape, for gates written by other code:
a module whose output is its input times a value computed from it through a global pool (a squeeze). Not gates:
modules that only add (GCNet's global context), spatial gates (their pool is over channels), attention over
branches (selective kernels), response normalisation.

A gate's value is read off the activation that makes it where its class is known, and otherwise measured as
``<x, y> / <x, x>`` per channel (exact for ``y = x * g``; 1 where a channel of ``x`` is all zero, which any gate
leaves unchanged).
"""
from .find import LOOKED_FOR, Gate, find_gates, is_channel_gate, is_global_pool, no_gates
from .record import GateStats, number, record_gates
from .replace import (
           Plan,
           multiplier,
           plan,
           remove_se,
           replace_module,
           trace_with_gates,
           without_any_gate,
           without_gates,
)

__all__ = ["LOOKED_FOR", "Gate", "GateStats", "Plan", "find_gates", "is_channel_gate",
           "is_global_pool", "multiplier", "no_gates", "number", "plan", "record_gates", "remove_se", "replace_module",
           "trace_with_gates", "without_any_gate", "without_gates"]
