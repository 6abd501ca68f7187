"""seify files: safetensors weights plus a JSON recipe that rebuilds the model with no other argument."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from torch import nn

from . import __version__
from .errors import SeifyError

RECIPE_KEY = "seify"


def atomic_write(path: str | Path, write: Callable[[str], None], *, force: bool = False,
                 inputs: tuple = ()) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place.

    An existing ``path`` is kept unless ``force``; a path that is one of ``inputs`` is never written.
    """
    path = check_writable(path, force=force, inputs=inputs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(path: str | Path, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Refuse to write over an input, or over an existing file without ``force``, before any work is done."""
    path = Path(path)
    for source in inputs:
        if source and Path(source).exists() and path.exists() and path.samefile(source):
            raise SeifyError(f"refusing to write over the input {source}; choose another output path")
    if path.exists() and not force:
        raise SeifyError(f"{path} already exists; pass --force to replace it or choose another path with -o")
    if not path.parent.exists():
        raise SeifyError(f"cannot write {path}: the folder {path.parent} does not exist")
    return path


def save(model: nn.Module, path: str | Path, recipe: dict, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Write ``model``'s weights and ``recipe`` (see ``make_recipe``) as one safetensors file."""
    from safetensors.torch import save_model
    metadata = {"format": "pt", RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata), force=force, inputs=inputs)


def make_recipe(spec: str, num_classes: int, options: dict, input_size, data_config: dict, sites: list[dict],
                **extra) -> dict:
    return {"seify_version": __version__, "model": spec, "num_classes": num_classes, "options": options,
            "input_size": list(input_size), "data_config": data_config, "sites": sites, **extra}


def read_recipe(path: str | Path) -> dict | None:
    """The recipe of a seify file, or None for any other safetensors file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SeifyError(f"{path} is not a readable safetensors file: {e}") from e
    if RECIPE_KEY not in meta:
        return None
    try:
        return json.loads(meta[RECIPE_KEY])
    except json.JSONDecodeError as e:
        raise SeifyError(f"{path} has a damaged seify recipe: {e}") from e


def rebuild(recipe: dict):
    """(base model, Conversion) that a recipe describes, with fresh weights (on the default device)."""
    from .models import build
    from .surgery import SEOptions, convert
    base = rebuild(recipe["parent"])[1].model if recipe.get("parent") else \
        build(recipe["model"], False, recipe["num_classes"])
    conversion = convert(base, SEOptions.from_dict(recipe["options"]), tuple(recipe["input_size"]))
    built = [s.path for s in conversion.sites]
    recorded = [s["path"] for s in recipe["sites"]]
    if built != recorded:
        raise SeifyError(f"this file was written by seify {recipe['seify_version']} with SE sites that this "
                         f"version places differently ({len(recorded)} recorded, {len(built)} now); convert again")
    return base, conversion


def load_with_recipe(path: str | Path) -> tuple[nn.Module, dict]:
    from safetensors.torch import load_model
    recipe = read_recipe(path)
    if recipe is None:
        raise SeifyError(f"{path} was not written by seify (no recipe in its metadata); load it with "
                         "--weights and a model name instead")
    model = rebuild(recipe)[1].model
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as e:
        raise SeifyError(f"{path}: weights do not match its recipe: {str(e).splitlines()[0]}") from e
    return model.eval(), recipe


def load(path: str | Path) -> nn.Module:
    """The model a seify file holds, ready in eval mode."""
    return load_with_recipe(path)[0]
