"""The Python API behind ``seify convert``: load, convert, prove the function is kept, save."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .equivalence import compare
from .errors import SeifyError, first_line
from .models import HELD, LoadedModel, check_known, data_config, has_frozen_batchnorm, model_of, num_classes_of, resolve
from .options import PRESERVING, SEOptions
from .surgery import Conversion, add_se


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
            parent["model"] if parent else src.architecture or src.spec, src.num_classes, self.options.to_dict(),
            self.input_size, config, [s.to_dict() for s in self.sites], parent=parent, weights=src.weights,
            frozen_batchnorm=has_frozen_batchnorm(src.model), placement=self.placement,
            **{k: parent[k] for k in ("classes", "finetune", "model_args") if parent and k in parent},
            **({} if parent else src.rebuilt_with()))

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


def convert(model: str | nn.Module, options: SEOptions = SEOptions(), *, weights: str | None = None,
            pretrained: bool = False, num_classes: int | None = None,
            input_size: tuple[int, int, int] | None = None, dry_run: bool = False) -> Converted:
    """Load ``model`` (any spec seify takes, or a module you hold, which is left as it is) and insert SE blocks;
    with ``dry_run``, only find the sites.

    Raises SeifyError on bad input, and if, with the default identity initialisation, the result's outputs
    differ from the original's by more than ``equivalence.TOLERANCE`` of their magnitude (a dry run builds and
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
    checked = compare(source.model, conversion.model, size)
    if conversion.scope:  # a detector's boxes depend on thresholds: compare the converted backbone's maps too
        checked = checked | compare(source.model.get_submodule(conversion.scope),
                                    conversion.model.get_submodule(conversion.scope), size)
    result.max_abs_diff, result.output_scale = checked.max_abs, checked.scale
    if options.init in PRESERVING and not checked.agrees:
        raise SeifyError(f"converting {source.spec} did not keep its function: {checked.why()}; seify cannot "
                         "convert this model exactly yet, please report it")
    return result


def save(result: Converted | Conversion, path: str | Path, *, model: str | None = None, force: bool = False,
         inputs: tuple = ()) -> Path:
    """Write a converted model as a seify file that ``seify.load(path)`` rebuilds with no other argument.

    ``result`` is what ``seify.convert`` returns, or a ``Conversion`` of a model you hold
    (``seify.surgery.add_se(my_model, ...)``); where it was made from a module you hold, ``model`` names its
    architecture (a timm name, or ``torchvision:NAME``) so that the file can be rebuilt, which timm models record
    themselves.
    """
    if not isinstance(result, Converted) or (result.source.weights == HELD and not result.dry_run):
        return _save_conversion(result, path, model, force=force, inputs=inputs)
    if result.dry_run:
        raise SeifyError("a dry run has nothing to save")
    out = checkpoint.save(result.model, path, result.recipe(), force=force, inputs=inputs)
    result.output, result.output_bytes = str(out), out.stat().st_size
    return out


def _save_conversion(conversion: Conversion, path, spec: str | None, **kwargs) -> Path:
    spec = spec or getattr(conversion.model, "pretrained_cfg", {}).get("architecture")
    if not spec:
        raise SeifyError(f"a {type(conversion.model).__name__} you hold records no architecture: name the one it is "
                         "built by, so that the file can be rebuilt: seify.save(result, path, "
                         "model='torchvision:resnet50')")
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
