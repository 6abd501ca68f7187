"""Files: seify files (safetensors weights plus a JSON recipe), users' checkpoints, and atomic writes.

Pure file I/O: what a recipe means (which model it rebuilds) is ``models.from_recipe``'s business.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__
from .errors import SeifyError, first_line

RECIPE_KEY = "seify"
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order: EMA first


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None], *, force: bool = False,
                 inputs: tuple = ()) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place.

    An existing ``path`` is kept unless ``force``; a path that is one of ``inputs`` is never written. The file
    gets the permissions a plain ``open`` would give (mkstemp's are 0600).
    """
    path = check_writable(path, force=force, inputs=inputs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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
        raise SeifyError(f"{path} already exists; pass {{force}} to replace it or choose another path", "force")
    if not path.parent.exists():
        raise SeifyError(f"cannot write {path}: the folder {path.parent} does not exist")
    return path


def save(model: nn.Module, path: str | Path, recipe: dict, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Write ``model``'s weights and ``recipe`` (see ``make_recipe``) as one safetensors file."""
    from safetensors.torch import save_model
    metadata = {"format": "pt", RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata), force=force, inputs=inputs)


def make_recipe(spec: str, num_classes: int, options: dict | None, input_size, data_config: dict,
                sites: list[dict], **extra) -> dict:
    """What rebuilds a model: base spec, classifier size, SE options and sites (None and [] for a plain model)."""
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


def read_state_dict(path: str | Path) -> tuple[dict, str]:
    """A plain state_dict from ``path``; never runs pickled code. Returns it and a note on where it came from."""
    p = Path(path)
    if not p.is_file():
        raise SeifyError(f"weights file {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(p)), f"weights: {path}"
        except SafetensorError as e:
            raise SeifyError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SeifyError(f"refusing to load {path}: it holds pickled code, not just tensors ("
                         f"{first_line(e)[:120]}). Re-save it as a state_dict or safetensors "
                         "from a trusted environment") from e
    except Exception as e:
        raise SeifyError(f"{path} is not a readable PyTorch checkpoint: {first_line(e)[:160]}") from e
    where = f"weights: {path}"
    if isinstance(checkpoint, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                checkpoint, where = checkpoint[key], f"weights: {path} ['{key}']"
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise SeifyError(f"{path} holds no state_dict (a dict of tensors, possibly under 'state_dict', "
                         "'model' or 'state_dict_ema')")
    from timm.models import clean_state_dict
    return clean_state_dict(checkpoint), where
