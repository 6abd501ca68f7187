"""``seify profile``: what SE costs, parameters, multiply-adds, latency and memory, per site and per model.

The counts come from ``seify.counting`` (on the meta device, what the paper calls FLOPs are MACs); latency is
measured here, the base model and its SE conversion timed in turns.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .counting import Cost, cost
from .device import check_device, describe_device, peak_memory
from .gates import Gate, find_gates, without_any_gate
from .limits import MAX_TIMED_BATCH, check_whole
from .models import name_of, resolve
from .options import SEOptions
from .sites import feature_info, stage_of
from .surgery import add_se
from .timing import inference, interleaved_medians, synchronizer


@dataclass
class Timing:
    """Medians over interleaved runs, in milliseconds; ratio is SE / base. The training step is None where the
    model cannot train at that batch (BatchNorm over a single value per channel: batch 1 at a 1x1 feature map)."""
    batch_size: int
    infer_base_ms: float
    infer_se_ms: float
    train_base_ms: float | None
    train_se_ms: float | None
    peak_memory_base: int | None = None
    peak_memory_se: int | None = None

    @property
    def infer_ratio(self) -> float:
        return self.infer_se_ms / self.infer_base_ms

    @property
    def train_ratio(self) -> float | None:
        if self.train_se_ms is None or self.train_base_ms is None:
            return None
        return self.train_se_ms / self.train_base_ms

    @property
    def throughput_base(self) -> float:
        return 1000 * self.batch_size / self.infer_base_ms

    @property
    def throughput_se(self) -> float:
        return 1000 * self.batch_size / self.infer_se_ms

    def to_dict(self) -> dict:
        train_ratio = self.train_ratio
        return {**asdict(self), "infer_ratio": round(self.infer_ratio, 4),
                "train_ratio": round(train_ratio, 4) if train_ratio is not None else None,
                "throughput_base": round(self.throughput_base, 2), "throughput_se": round(self.throughput_se, 2)}


NATIVE = "native gates"  # the placement of a network's own gates: base is the model without them


@dataclass
class Profile:
    model: str
    input_size: tuple[int, int, int]
    base: Cost
    se: Cost
    sites: list[dict]
    placement: str | None
    device: str | None = None
    timings: list[Timing] = field(default_factory=list)

    @property
    def native(self) -> bool:
        """The sites are the network's own gates, and base is the model with every one folded."""
        return self.placement == NATIVE

    @property
    def added_params(self) -> int:
        return self.se.params - self.base.params

    @property
    def added_macs(self) -> int:
        return self.se.macs - self.base.macs

    @property
    def added_params_percent(self) -> float:
        return 100 * self.added_params / self.base.params

    @property
    def added_macs_percent(self) -> float:
        return 100 * self.added_macs / self.base.macs

    def to_dict(self) -> dict:
        return {
            "model": self.model, "placement": self.placement, "input_size": list(self.input_size),
            "macs_note": "multiply-adds (paper FLOPs)", "base": asdict(self.base), "se": asdict(self.se),
            "added_params": self.added_params, "added_params_percent": round(self.added_params_percent, 3),
            "added_macs": self.added_macs, "added_macs_percent": round(self.added_macs_percent, 3),
            "sites": self.sites, "device": self.device, "timings": [t.to_dict() for t in self.timings],
        }


def _build_pair(spec: str | nn.Module, options: SEOptions, input_size, num_classes, device: str, weights=None,
                pretrained=False):
    """(base, SE model, SE sites, placement, input size) for ``spec``: a model, or a seify file against the base
    it came from (placement None for files written before seify recorded it).

    The input size defaults to the one the model was trained (or converted) at.
    """
    loaded = resolve(spec, num_classes=num_classes, device=device, weights=weights, pretrained=pretrained)
    size = tuple(input_size or loaded.data_config["input_size"])
    if loaded.base is not None and loaded.recipe is not None:
        return loaded.base, loaded.model, loaded.recipe["sites"], loaded.recipe.get("placement"), size
    gates = find_gates(loaded.model)
    if gates and not any(gate.ours for gate in gates.values()):  # a network's own gates: what they cost
        return without_any_gate(loaded.model, gates), loaded.model, _gate_sites(loaded.model, gates, size), \
            NATIVE, size
    with torch.device(device):
        conversion = add_se(loaded.model, options, size)
    return loaded.model, conversion.model, [s.to_dict() for s in conversion.sites], conversion.placement, size


def _gate_sites(model: nn.Module, gates: dict[str, Gate], size) -> list[dict]:
    """Each gate as a site: where it is, the map it gates, its channels and the width of its excitation."""
    shapes: dict[str, tuple] = {}

    def seen(path: str):
        def hook(module, args, out) -> None:
            shapes.setdefault(path, tuple(args[0].shape))
        return hook
    hooks = [gate.module.register_forward_hook(seen(path)) for path, gate in gates.items()]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *size), device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    sites = []
    for path, gate in gates.items():
        _, channels, height, width = shapes[path]
        reduced = gate.hidden
        stage = stage_of(path, height, size[1], feature_info(model))  # the stride, as for seify's sites
        sites.append({"path": path, "kind": gate.kind, "stage": stage, "height": height, "width": width,
                      "channels": channels, "reduced_channels": reduced, "params": gate.params})
    return sites


def _count_pair(spec, options, input_size, num_classes, weights, pretrained):
    try:
        return _build_pair(spec, options, input_size, num_classes, "meta", weights, pretrained)
    except (NotImplementedError, RuntimeError) as e:
        if "meta" not in str(e):
            raise
        # a model that cannot be built on meta
        return _build_pair(spec, options, input_size, num_classes, "cpu", weights, pretrained)


def profile(spec: str | nn.Module, options: SEOptions = SEOptions(), *, input_size=None,
            num_classes: int | None = None, latency: bool = True, batch_sizes=(1,), device: str | None = None,
            repeats: int = 10, warmup: int = 3, weights: str | None = None, pretrained: bool = False) -> Profile:
    """Count and (unless ``latency=False``) time ``spec`` (a spec, or a module you hold) against its SE
    conversion; ``weights``/``pretrained`` as for ``resolve`` (an adapter's base: counting needs none)."""
    check_whole(repeats, "repeats", 1, 10_000)
    check_whole(warmup, "warmup", 0, 10_000)
    for batch in batch_sizes:
        check_whole(batch, "batch_size", 1, MAX_TIMED_BATCH)
    device = check_device(device)
    base, se, sites, placement, size = _count_pair(spec, options, input_size, num_classes, weights, pretrained)
    base_cost, _ = cost(base, size)
    se_cost, per_block = cost(se, size, {s["path"]: se.get_submodule(s["path"]) for s in sites})
    sites = [{**s, "macs": per_block[s["path"]]} for s in sites]
    result = Profile(name_of(spec), size, base_cost, se_cost, sites, placement)
    if latency:
        base, se, _, _, _ = _build_pair(spec, options, size, num_classes, "cpu", weights, pretrained)
        result.device = describe_device(device)
        result.timings = [measure(base, se, size, b, device, repeats, warmup) for b in batch_sizes]
    return result


def _train_step(model: nn.Module, x: torch.Tensor):
    def step():
        model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)
    return step


def measure(base: nn.Module, se: nn.Module, input_size, batch_size: int, device: str, repeats: int = 10,
            warmup: int = 3) -> Timing:
    """Inference and training-step latency of both models in one process, interleaved."""
    base, se = base.to(device), se.to(device)
    x = torch.randn((batch_size, *input_size), device=device)
    sync = synchronizer(device)
    infer = interleaved_medians([inference(base.eval(), x), inference(se.eval(), x)], repeats, warmup, sync)
    base.train(), se.train()
    steps = [_train_step(base, x), _train_step(se, x)]
    train: list[float | None]
    memory: list[int | None]
    try:
        train = [1000 * t for t in interleaved_medians(steps, repeats, warmup, sync)]
        memory = [peak_memory(step, device) for step in steps]
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
        train, memory = [None, None], [None, None]
    finally:
        base.eval(), se.eval()
    return Timing(batch_size, 1000 * infer[0], 1000 * infer[1], train[0], train[1], *memory)
