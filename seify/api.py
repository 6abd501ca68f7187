"""The Python API behind ``seify convert``: load, convert, prove the function is kept, save."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .errors import SeifyError, first_line
from .models import LoadedModel, check_known, data_config, has_frozen_batchnorm, model_of, num_classes_of, resolve
from .options import SEOptions
from .surgery import Conversion, add_se

PRESERVATION_TOLERANCE = 1e-5  # max abs diff relative to the output's magnitude, fp32


@dataclass(kw_only=True)
class Converted(Conversion):
    """A conversion of a resolved model, with everything ``seify convert`` reports about it."""
    source: LoadedModel
    input_size_given: bool = False
    dry_run: bool = False
    max_abs_diff: float | None = None
    output_scale: float | None = None
    output: str | None = None
    output_bytes: int | None = None
    base_params: int = field(init=False)

    def __post_init__(self):
        self.base_params = sum(p.numel() for p in self.source.model.parameters())

    @property
    def params(self) -> int:
        return self.base_params + self.added_params

    @property
    def added_params_percent(self) -> float:
        return 100 * self.added_params / max(self.base_params, 1)

    def recipe(self) -> dict:
        src = self.source
        parent = src.recipe
        config = dict(src.data_config)
        if self.input_size_given:  # the size the user works at is the size evaluate and profile default to
            config["input_size"] = list(self.input_size)
        return checkpoint.make_recipe(
            parent["model"] if parent else src.spec, src.num_classes, self.options.to_dict(), self.input_size,
            config, [s.to_dict() for s in self.sites], parent=parent, weights=src.weights,
            frozen_batchnorm=has_frozen_batchnorm(src.model), placement=self.placement,
            **{k: parent[k] for k in ("classes", "finetune") if parent and k in parent})

    def report(self) -> dict:
        """Everything ``seify convert --json`` prints."""
        return {
            "model": self.source.spec, "placement": self.placement, "options": self.options.to_dict(),
            "input_size": list(self.input_size), "base_params": self.base_params,
            "params": self.params, "added_params": self.added_params,
            "added_params_percent": round(self.added_params_percent, 3),
            "sites": [s.to_dict() for s in self.sites], "skipped": [s.to_dict() for s in self.skipped],
            "max_abs_diff": self.max_abs_diff, "output_scale": self.output_scale,
            "relative_diff": (self.max_abs_diff / self.output_scale)
            if self.output_scale and self.max_abs_diff is not None else None,
            "output": self.output, "output_bytes": self.output_bytes, "notes": self.source.notes,
        }


def convert(model: str, options: SEOptions = SEOptions(), *, weights: str | None = None, pretrained: bool = False,
            num_classes: int | None = None, input_size: tuple[int, int, int] | None = None,
            dry_run: bool = False) -> Converted:
    """Load ``model`` (any spec seify takes) and insert SE blocks; with ``dry_run``, only find the sites.

    Raises SeifyError on bad input, and if, with the default identity initialisation, the result's outputs
    differ from the original's by more than ``PRESERVATION_TOLERANCE`` of their magnitude (a dry run builds and
    checks the model too, but ``save`` refuses it).
    """
    source = resolve(model, pretrained=pretrained, weights=weights, num_classes=num_classes)
    return convert_loaded(source, options, input_size=input_size, dry_run=dry_run)


def convert_loaded(source: LoadedModel, options: SEOptions = SEOptions(), *,
                   input_size: tuple[int, int, int] | None = None, dry_run: bool = False) -> Converted:
    """``convert`` for a model already resolved (``seify.resolve``)."""
    size = tuple(input_size or source.data_config["input_size"])
    conversion = add_se(source.model, options, size)  # a dry run builds and checks it too
    result = Converted(**vars(conversion), source=source, input_size_given=input_size is not None, dry_run=dry_run)
    result.max_abs_diff, result.output_scale = output_difference(source.model, conversion.model, size)
    if conversion.scope:  # a detector's boxes depend on thresholds: compare the converted backbone's maps too
        part = output_difference(source.model.get_submodule(conversion.scope),
                                 conversion.model.get_submodule(conversion.scope), size)
        result.max_abs_diff, result.output_scale = max(result.max_abs_diff, part[0]), max(result.output_scale,
                                                                                          part[1])
    if options.init == "identity" and result.max_abs_diff > PRESERVATION_TOLERANCE * result.output_scale:
        raise SeifyError(f"converting {source.spec} did not keep its function: outputs differ by "
                         f"{result.max_abs_diff:.3g} (up to {result.output_scale:.3g}); seify cannot convert this "
                         "model exactly yet, please report it")
    return result


def output_difference(a: nn.Module, b: nn.Module, input_size, batch: int = 2, seed: int = 0):
    """(max |a(x) - b(x)|, max |a(x)|) in eval mode on a fixed random probe x, over every tensor the models
    return (a detector's boxes, scores and labels; a backbone's feature maps); inf where their shapes differ."""
    x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = _tensors(a.eval()(x)), _tensors(b.eval()(x))
    if [t.shape for t in ya] != [t.shape for t in yb]:
        return float("inf"), max((t.abs().max().item() for t in ya if t.numel()), default=0.0)
    pairs = [(p.float(), q.float()) for p, q in zip(ya, yb, strict=True) if p.numel()]
    return (max(((p - q).abs().max().item() for p, q in pairs), default=0.0),
            max((p.abs().max().item() for p, _ in pairs), default=0.0))


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out, key=str) for t in _tensors(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def save(result: Converted | Conversion, path: str | Path, *, model: str | None = None, force: bool = False,
         inputs: tuple = ()) -> Path:
    """Write a converted model as a seify file that ``seify.load(path)`` rebuilds with no other argument.

    ``result`` is what ``seify.convert`` returns, or a ``Conversion`` of a model you hold
    (``seify.surgery.add_se(my_model, ...)``); for the latter, ``model`` names its architecture (a timm name, or
    ``torchvision:NAME``), which timm models record themselves.
    """
    if not isinstance(result, Converted):
        return _save_conversion(result, path, model, force=force, inputs=inputs)
    if result.dry_run:
        raise SeifyError("a dry run has nothing to save")
    out = checkpoint.save(result.model, path, result.recipe(), force=force, inputs=inputs)
    result.output, result.output_bytes = str(out), out.stat().st_size
    return out


def _save_conversion(conversion: Conversion, path, spec: str | None, **kwargs) -> Path:
    spec = spec or getattr(conversion.model, "pretrained_cfg", {}).get("architecture")
    if not spec:
        raise SeifyError("name the architecture of this model so the file can be rebuilt: "
                         "seify.save(conversion, path, model='torchvision:resnet50')")
    check_known(spec)
    options = conversion.options
    recipe = checkpoint.make_recipe(spec, num_classes_of(conversion.model), options.to_dict(),
                                    conversion.input_size, data_config(conversion.model, spec),
                                    [s.to_dict() for s in conversion.sites], weights="held in memory",
                                    frozen_batchnorm=has_frozen_batchnorm(conversion.model))
    _check_rebuilds(conversion, recipe, spec)
    return checkpoint.save(conversion.model, path, recipe, **kwargs)


def _check_rebuilds(conversion: Conversion, recipe: dict, spec: str) -> None:
    """Refuse a file that would not load: the model the recipe rebuilds (on the meta device, no weights) must have
    every key and shape of the conversion's."""
    advice = "name the architecture it was converted from"
    try:
        with torch.device("meta"):
            rebuilt = model_of(recipe)
    except SeifyError as e:
        raise SeifyError(f"this conversion is not one of {spec} ({first_line(e).split(';')[0]}); {advice}") from e
    ours = {k: tuple(v.shape) for k, v in conversion.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if ours != theirs:
        odd = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k] != theirs[k]]
        raise SeifyError(f"this conversion is not one of {spec}: {len(odd)} weights differ in name or shape (e.g. "
                         f"{odd[0]}); {advice}")


def default_output(spec: str) -> str:
    """``resnet50`` -> ``resnet50-se.safetensors``, in the current folder."""
    stem = Path(spec).name.removesuffix(".safetensors") if spec.endswith(".safetensors") else \
        spec.split(":", 1)[-1].replace("/", "_")
    return f"{stem}-se.safetensors"
