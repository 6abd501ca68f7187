"""Files: seify files (safetensors weights plus a JSON recipe) and users' checkpoints (written atomically by
``writes``).

Pure file I/O: what a recipe means (which model it rebuilds) is ``models.from_recipe``'s business.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import SeifyError, first_line
from .limits import MAX_CLASSES, MAX_IMAGE_SIZE
from .options import SEOptions
from .writes import atomic_write

RECIPE_KEY = "seify"
# What a recipe holds and means. A change that an older seify would read wrongly takes the next number; seify
# reads every format up to its own (0.1.0 wrote format 1 without saying so), and tests/fixtures keeps a file of each.
# A file is written in the oldest format that holds it: 2 for adapters and scale blocks, else 1.
RECIPE_FORMAT = 2
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order: EMA first


def save(model: nn.Module, path: str | Path, recipe: dict, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Write ``model``'s weights and ``recipe`` (see ``make_recipe``) as one safetensors file; for an adapter
    (``recipe["adapter"]``), only the tensors it lists."""
    from safetensors.torch import save_file, save_model
    recipe = {**recipe, "recipe_format": format_of(recipe)}
    metadata = {"format": "pt", RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
    adapter = recipe.get("adapter")
    if adapter is None:
        return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata), force=force, inputs=inputs)
    state = model.state_dict()
    tensors = {k: state[k].detach().cpu().contiguous() for k in adapter["tensors"]}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), force=force, inputs=inputs)


def format_of(recipe: dict) -> int:
    """The oldest recipe format that holds ``recipe``: seify 0.2 reads format 1 and would misread adapters and scale
    blocks."""
    blocks = [r.get("options") or {} for r in _lineage(recipe)]
    return 2 if recipe.get("adapter") or any(o.get("block", "se") != "se" for o in blocks) else 1


def without_adapter(recipe: dict) -> dict:
    """The recipe of the whole model an adapter makes on its base: what it was merged from is kept as
    ``adapter_base``."""
    merged = {k: v for k, v in recipe.items() if k != "adapter"}
    merged["adapter_base"] = recipe["adapter"]["base"]
    return merged


def _lineage(recipe: dict) -> list[dict]:
    """A recipe and its parents."""
    chain = [recipe]
    while isinstance(chain[-1].get("parent"), dict):
        chain.append(chain[-1]["parent"])
    return chain


def make_recipe(spec: str, num_classes: int, options: dict | None, input_size, data_config: dict,
                sites: list[dict], **extra) -> dict:
    """What rebuilds a model: base spec, classifier size, SE options and sites (None and [] for a plain model)."""
    return {"seify_version": __version__, "recipe_format": RECIPE_FORMAT, "model": spec, "num_classes": num_classes,
            "options": options, "input_size": list(input_size), "data_config": data_config, "sites": sites,
            **extra}


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
        recipe = json.loads(meta[RECIPE_KEY])
        _check_format(recipe, path)
        _check_recipe(recipe)
    except (json.JSONDecodeError, RecursionError, _Damaged) as e:
        reason = "nested too deep" if isinstance(e, RecursionError) else str(e)
        raise SeifyError(f"{path} has a damaged seify recipe ({reason}); convert the model again") from e
    return recipe


class _Damaged(ValueError):
    pass


def _check_format(recipe, path) -> None:
    """A file from a newer seify, whose recipe this one would misread, is refused; naming both versions."""
    if not isinstance(recipe, dict):
        return
    written = recipe.get("recipe_format", 1)
    if isinstance(written, bool) or not isinstance(written, int) or written < 1:
        raise _Damaged(f"recipe_format {written!r} is not a format number")
    if written > RECIPE_FORMAT:
        raise SeifyError(f"{path} was written by seify {recipe.get('seify_version', '(unknown)')} in recipe format "
                         f"{written}; this seify {__version__} reads formats up to {RECIPE_FORMAT}: install a seify "
                         f"that reads format {written} (pip install -U seify)")


MAX_PARENTS = 8  # conversions of conversions: more than a handful is a tampered file, not a workflow


def _check_recipe(recipe, depth: int = 0) -> None:
    """The shape of a recipe, checked before anything is built from it."""
    def need(ok: bool, what: str):
        if not ok:
            raise _Damaged(what)
    need(isinstance(recipe, dict), f"expected a JSON object, found {type(recipe).__name__}")
    need(depth <= MAX_PARENTS, f"more than {MAX_PARENTS} nested parents")
    for key, kind in (("model", str), ("num_classes", int), ("input_size", list), ("data_config", dict),
                      ("sites", list)):
        need(isinstance(recipe.get(key), kind) and not isinstance(recipe.get(key), bool),
             f"'{key}' missing or not a {kind.__name__}")
    need(0 < recipe["num_classes"] <= MAX_CLASSES, f"num_classes {recipe['num_classes']} out of range")
    for size in (recipe["input_size"], recipe["data_config"].get("input_size")):
        need(isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and 0 < v <= MAX_IMAGE_SIZE
                                                               for v in size),
             f"input size {size!r} is not three whole numbers up to {MAX_IMAGE_SIZE}")
    need(recipe.get("options") is None or isinstance(recipe["options"], dict), "'options' is not an object")
    need(recipe.get("model_args") is None or isinstance(recipe["model_args"], dict), "'model_args' is not an object")
    if recipe.get("options") is not None:
        try:  # in the recipe's own words: the user passed none of these options
            SEOptions.from_dict(recipe["options"])
        except SeifyError as e:
            raise _Damaged(f"its SE options: {e}") from e
    need(all(isinstance(site, dict) and isinstance(site.get("path"), str) for site in recipe["sites"]),
         "'sites' holds entries without a path")
    for key in ("folded", "folded_native"):
        folded = recipe.get(key)
        need(folded is None or (isinstance(folded, list) and all(isinstance(f, str) for f in folded)),
             f"'{key}' is not a list of module paths")
    if depth == 0 and recipe.get("adapter") is not None:
        _check_adapter(recipe["adapter"], need)
    classes = recipe.get("classes")
    need(classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                             and len(classes) == recipe["num_classes"]), "'classes' does not match num_classes")
    if recipe.get("parent") is not None:
        _check_recipe(recipe["parent"], depth + 1)


def _check_adapter(adapter, need) -> None:
    need(isinstance(adapter, dict), "'adapter' is not an object")
    base = adapter.get("base")
    need(isinstance(base, dict) and isinstance(base.get("model"), str), "its adapter names no base model")
    need(isinstance(base.get("sha256"), str) and len(base["sha256"]) == 64 and
         all(c in "0123456789abcdef" for c in base["sha256"]), "its base's sha256 is not a sha256 digest")
    need(base.get("weights") is None or isinstance(base["weights"], str), "its base's weights are not a file name")
    for key in ("tensors", "trains"):
        need(isinstance(adapter.get(key), list) and all(isinstance(k, str) for k in adapter[key]),
             f"its adapter's '{key}' is not a list of names")


def read_state_dict(path: str | Path) -> tuple[dict, str]:
    """A plain state_dict from ``path``; never runs pickled code. Returns it and a note on where it came from."""
    p = Path(path)
    if p.is_dir():
        raise SeifyError(f"weights file {path} is a folder; pass the checkpoint file itself")
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
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses; one line is enough
            warnings.simplefilter("ignore")
            checkpoint = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SeifyError(f"refusing to load {path}: it is not a checkpoint that loads without running pickled code "
                         f"({_unpickling_reason(e)}); re-save it as a state_dict or safetensors from a trusted "
                         "environment") from e
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


def _unpickling_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that says what it met, without its advice to load unsafely."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return reasons[0].rstrip(".") if reasons else "refused by torch's weights-only loader"
