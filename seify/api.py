"""The Python API behind ``seify convert``: load, convert, prove the function is kept, save."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .errors import SeifyError
from .models import LoadedModel, create
from .surgery import Conversion, SEOptions, convert as convert_model, find_sites, split_sites

create_model = create
PRESERVATION_TOLERANCE = 1e-5  # max abs diff relative to the output's magnitude, fp32


@dataclass
class Converted:
    """A converted model with everything ``seify convert`` reports about it."""
    source: LoadedModel
    options: SEOptions
    input_size: tuple[int, int, int]
    conversion: Conversion | None
    sites: list
    skipped: list
    placement: str
    max_abs_diff: float | None = None
    output_scale: float | None = None
    output: str | None = None
    output_bytes: int | None = None
    base_params: int = field(init=False)

    def __post_init__(self):
        self.base_params = sum(p.numel() for p in self.source.model.parameters())

    @property
    def model(self) -> nn.Module:
        return self.conversion.model

    @property
    def added_params(self) -> int:
        return sum(s.params for s in self.sites)

    def recipe(self) -> dict:
        src = self.source
        parent = src.recipe
        return checkpoint.make_recipe(
            parent["model"] if parent else src.spec, src.num_classes, self.options.to_dict(), self.input_size,
            src.data_config, [s.to_dict() for s in self.sites], parent=parent,
            **{k: parent[k] for k in ("classes",) if parent and k in parent})

    def report(self) -> dict:
        """Everything ``seify convert --json`` prints."""
        return {
            "model": self.source.spec, "placement": self.placement, "options": self.options.to_dict(),
            "input_size": list(self.input_size), "base_params": self.base_params,
            "params": self.base_params + self.added_params, "added_params": self.added_params,
            "added_percent": round(100 * self.added_params / max(self.base_params, 1), 3),
            "sites": [s.to_dict() for s in self.sites], "skipped": [s.to_dict() for s in self.skipped],
            "max_abs_diff": self.max_abs_diff, "output_scale": self.output_scale,
            "relative_diff": (self.max_abs_diff / self.output_scale) if self.output_scale else None,
            "output": self.output, "output_bytes": self.output_bytes, "notes": self.source.notes,
        }


def convert(model: str, options: SEOptions = SEOptions(), *, weights: str | None = None, pretrained: bool = False,
            num_classes: int | None = None, input_size: tuple[int, int, int] | None = None,
            dry_run: bool = False) -> Converted:
    """Load ``model`` (any spec seify takes) and insert SE blocks; with ``dry_run``, only find the sites.

    Raises SeifyError if, with the default identity initialisation, the result's outputs differ from the
    original's by more than ``PRESERVATION_TOLERANCE`` of their magnitude.
    """
    source = create(model, pretrained=pretrained, weights=weights, num_classes=num_classes)
    size = tuple(input_size or source.data_config["input_size"])
    if dry_run:
        _, placement, sites = find_sites(source.model, options, size)
        chosen, skipped = split_sites(source.model, placement, sites, options)
        return Converted(source, options, size, None, chosen, skipped, placement)
    conversion = convert_model(source.model, options, size)
    result = Converted(source, options, size, conversion, conversion.sites, conversion.skipped,
                       conversion.placement)
    result.max_abs_diff, result.output_scale = output_difference(source.model, conversion.model, size)
    if options.init == "identity" and result.max_abs_diff > PRESERVATION_TOLERANCE * result.output_scale:
        raise RuntimeError(f"converted {model} differs from the original by {result.max_abs_diff:.3g} "
                           f"(outputs up to {result.output_scale:.3g}); this is a seify bug, please report it")
    return result


def output_difference(a: nn.Module, b: nn.Module, input_size, batch: int = 2, seed: int = 0):
    """(max |a(x) - b(x)|, max |a(x)|) in eval mode on a fixed random probe x."""
    x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return (ya - yb).abs().max().item(), ya.abs().max().item()


def save(result: Converted, path: str | Path, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Write the converted model as a seify file and record where and how big it is."""
    if result.conversion is None:
        raise SeifyError("a dry run has nothing to save")
    out = checkpoint.save(result.model, path, result.recipe(), force=force, inputs=inputs)
    result.output, result.output_bytes = str(out), out.stat().st_size
    return out


def default_output(spec: str) -> str:
    """``resnet50`` -> ``resnet50-se.safetensors``, in the current folder."""
    stem = Path(spec).name.removesuffix(".safetensors") if spec.endswith(".safetensors") else \
        spec.split(":", 1)[-1].replace("/", "_")
    return f"{stem}-se.safetensors"
