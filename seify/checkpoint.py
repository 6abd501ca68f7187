"""Files: seify files (safetensors weights plus a JSON recipe), users' checkpoints, and atomic writes.

Pure file I/O: what a recipe means (which model it rebuilds) is ``models.from_recipe``'s business.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__
from .errors import SeifyError, first_line
from .limits import MAX_CLASSES, MAX_IMAGE_SIZE
from .options import SEOptions

RECIPE_KEY = "seify"
# What a recipe holds and means. A change that an older seify would read wrongly takes the next number; seify
# reads every format up to its own (0.1.0 wrote format 1 without saying so), and tests/fixtures keeps a file of each.
# A file is written in the oldest format that holds it: 2 for adapters and scale blocks, else 1.
RECIPE_FORMAT = 2
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order: EMA first


def umask() -> int:
    """This process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object], *, force: bool = False,
                 inputs: tuple = ()) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place.

    An existing ``path`` is kept unless ``force``; a path that is one of ``inputs`` is never written. The file
    gets the permissions a plain ``open`` would give (mkstemp's are 0600).
    """
    path = check_writable(path, force=force, inputs=inputs)
    tmp = None
    try:
        with _nothing_changed(path):
            fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def _nothing_changed(path: Path):
    """A full disk or another OS error while writing ``path``: one line, saying that nothing there changed."""
    try:
        yield
    except Exception as e:
        problem = write_error(e, path)
        if problem is None:
            raise
        raise SeifyError(f"{problem}; nothing there was changed") from e


def sidecar_of(path: Path) -> Path:
    """Where a file keeps what does not fit in it (ONNX's external weights): NAME.data beside it."""
    return path.with_name(path.name + ".data")


def write_with_sidecars(path: Path, write: Callable[[str], object], *, force: bool = False) -> list[Path]:
    """``write(tmp)`` a file (and any ``sidecar_of`` it) in a temporary folder beside ``path``, then move them into
    place, the file last; with ``force`` a sidecar of the file replaced that the new one does not have goes too."""
    def move(tmp: str) -> list[Path]:
        write(str(Path(tmp) / path.name))
        written = sorted(Path(tmp).iterdir(), key=lambda p: p == Path(tmp) / path.name)
        if force and sidecar_of(path).name not in {f.name for f in written}:
            sidecar_of(path).unlink(missing_ok=True)
        for f in written:
            os.chmod(f, 0o666 & ~umask())
            os.replace(f, path.parent / f.name)
        return [path.parent / f.name for f in written]
    return _in_temporary_folder(path, move)


def replace_folder(path: Path, fill: Callable[[str], object], manifest: str, about: dict) -> None:
    """``fill(tmp)`` a temporary folder beside ``path``, list what it holds in ``manifest`` (with ``about``), and
    put it in the place of ``path``: the caller checks first that ``path`` holds nothing but an earlier such
    folder (``written_before``)."""
    def replace(tmp: str) -> None:
        fill(tmp)
        listing = {**about, "files": sorted(os.listdir(tmp))}
        (Path(tmp) / manifest).write_text(json.dumps(listing, indent=2) + "\n")
        for f in Path(tmp).iterdir():  # as a plain open would give them (safetensors writes 0600)
            os.chmod(f, 0o666 & ~umask())
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    _in_temporary_folder(path, replace)


def written_before(folder: Path, manifest: str) -> set[str]:
    """What ``replace_folder`` wrote in ``folder`` (its manifest lists it), the manifest included; empty if none."""
    try:
        listed = json.loads((folder / manifest).read_text())["files"]
        return {*listed, manifest} if isinstance(listed, list) else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


_STALE = 3600  # seconds: a leftover of a seify that did not name its process is taken to be dead after this


def _temporary_prefix(path: Path) -> str:
    """``.NAME.PID.``: the temporary files of a write are named after their output and the process writing them,
    so that the next write there removes those a killed process left (``remove_leftovers``), and only those."""
    remove_leftovers(path)
    return f".{path.name}.{os.getpid()}."


def remove_leftovers(path: Path) -> None:
    """Remove what a killed write of ``path`` left beside it (its temporary file or folder): seify's own names
    alone, of a process no longer running (or, named before seify recorded the process, older than an hour)."""
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    leftover = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.(?:tmp|old)$")
    for entry in entries:
        match = leftover.match(entry.name)
        if match is None or _alive(match[1], entry):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _alive(pid: str | None, entry: Path) -> bool:
    if pid is None:
        try:
            return time.time() - entry.stat().st_mtime < _STALE
        except OSError:
            return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _in_temporary_folder(path: Path, work):
    """``work(tmp)`` with a temporary folder beside ``path``, removed afterwards whatever happens; a full disk or
    another OS error is one line, and leaves nothing."""
    tmp = tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with _nothing_changed(path):
            return work(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_error(e: BaseException, path: Path) -> str | None:
    """What went wrong writing ``path``, in words, where it is the machine's doing (None: a bug of ours).

    A full disk reaches us as ENOSPC, as safetensors' SafetensorError ("No space left on device (os error 28)"),
    or as torch.save's "unexpected pos" with no reason at all: asked while the partial file still takes its
    space, the file system's free space tells.
    """
    from safetensors import SafetensorError
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in text or "os error 28" in text or \
            isinstance(e, (RuntimeError, SafetensorError)) and _full(path):
        return f"cannot write {path}: no space left on device ({_free(path)} free there)"
    if isinstance(e, OSError):
        return f"cannot write {path}: {e.strerror or first_line(e)}"
    if isinstance(e, SafetensorError) or isinstance(e, RuntimeError) and ("write" in text.lower() or
                                                                           "unexpected pos" in text):
        return f"cannot write {path}: {first_line(e)}"
    return None


_FULL = 1 << 20  # bytes: less than this free after a failed write is a full disk


def _folder(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.is_dir()), Path("."))


def _full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_folder(path)).free < _FULL
    except OSError:
        return False


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(_folder(path)).free / 1e6:.1f} MB"
    except OSError:
        return "unknown"


def check_writable(path: str | Path, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Refuse to write over an input, or over an existing file without ``force``, before any work is done."""
    path = Path(path)
    for source in inputs:
        if source and Path(source).exists() and path.exists() and path.samefile(source):
            raise SeifyError(f"refusing to write over the input {source}; choose another output path")
    if path.is_dir():
        raise SeifyError(f"cannot write {path}: it is a folder; name a file")
    if path.exists() and not force:
        raise SeifyError(f"{path} already exists; pass {{force}} to replace it or choose another path", "force")
    if not path.parent.is_dir():
        raise SeifyError(f"cannot write {path}: {path.parent} is not an existing folder")
    check_folder_writable(path.parent)
    return path


def check_output_folder(folder: str | Path, *, force: bool = False) -> Path:
    """Refuse, before any work is done, an output folder that is a file, or one that holds something (unless
    ``force``), or one that cannot be created where it would go."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SeifyError(f"{folder} is a file; name a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise SeifyError(f"{folder} already exists; pass {{force}} to replace it or choose another path", "force")
    check_folder_writable(next(p for p in (folder, *folder.parents) if p.exists()))
    return folder


def check_folder_writable(folder: Path) -> None:
    """Create and remove a file there: the one test that also catches read-only and special file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SeifyError(f"cannot write in {folder}: {e.strerror or first_line(e)}") from e


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
