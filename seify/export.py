"""``seify export``: a model to what people deploy and share, each file proven to compute what the model does.

- ``onnx``: torch's dynamo exporter (``legacy``: the TorchScript-based one), a dynamic batch dimension (and H, W
  with ``dynamic_size``), run in onnxruntime at two batch sizes (and two sizes) against the model;
- ``pt2``: a ``torch.export`` ExportedProgram, loaded back and run the same way;
- ``timm``: a folder that ``timm.create_model("local-dir:PATH", pretrained=True)`` builds and loads with no seify
  installed (config.json and model.safetensors, written by timm's own ``save_for_hf``), where timm can build the
  model with its SE blocks itself;
- ``folder``: the same hub layout for any model, with seify's recipe, that ``seify.load("local-dir:PATH")`` opens,
  and ``seify.load("hf-hub:org/name")`` once uploaded.

Everything is written under a temporary name and checked before it is renamed into place: a file that does not
compute what the model does is never left behind as if it were good. Seify's Triton kernels are off while the
model is exported, so no exported graph holds them.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import __version__, kernels
from .checkpoint import atomic_write, check_output_folder, check_writable, save, umask, write_error
from .errors import SeifyError, first_line
from .limits import check_choice, check_whole
from .models import LoadedModel, load, resolve
from .models.files import set_pretrained_cfg
from .surgery import convertible_scope

FORMATS = ("onnx", "pt2", "timm", "folder")
TOLERANCE = 1e-4  # largest difference allowed, relative to the outputs' magnitude (fp32 kernels differ in order)
INSTALL = "pip install 'seify[export]'"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass
class Exported:
    """What ``export`` wrote and the check that proves it."""
    format: str
    path: str
    files: list[str]
    inputs: list[list[int]]  # the input shapes the written model was run at
    max_abs_diff: float
    output_scale: float
    tolerance: float  # the largest difference allowed: TOLERANCE of the outputs' magnitude, at least of 1
    details: dict = field(default_factory=dict)  # exporter, opset, dynamic axes; timm's architecture and args
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def export(model: str | nn.Module, path: str | Path, format: str = "onnx", *, weights: str | None = None,
           pretrained: bool = False, input_size: tuple[int, int, int] | None = None, opset: int | None = None,
           legacy: bool = False, dynamic_size: bool = False, force: bool = False) -> Exported:
    """Export ``model`` (any spec seify takes, or a module you hold) to ``path`` and check what was written."""
    check_choice(format, "format", FORMATS)
    if opset is not None:
        check_whole(opset, "opset", 7, 30)
    if (legacy or opset is not None or dynamic_size) and format != "onnx":
        raise SeifyError("{legacy}, {opset} and {dynamic_size} are options of {format} onnx", "legacy", "opset",
                         "dynamic_size", "format")
    path = Path(path)
    _check_output(path, format, force, inputs=(model, weights) if isinstance(model, str) else ())
    loaded: LoadedModel | None = None
    if isinstance(model, nn.Module):
        network = model
    else:
        loaded = resolve(model, weights=weights, pretrained=pretrained)
        network = loaded.model
    module, notes = _exported_part(network)
    size = tuple(input_size or (loaded.data_config["input_size"] if loaded else (3, 224, 224)))
    with kernels.disabled():
        if format == "onnx":
            _need("onnx", "onnxruntime", "onnxscript") if not legacy else _need("onnx", "onnxruntime")
            result = _write_file(path, force, lambda tmp: _onnx(module, tmp, size, opset, legacy, dynamic_size))
        elif format == "pt2":
            result = _write_file(path, force, lambda tmp: _pt2(module, tmp, size))
        else:
            if loaded is None or loaded.recipe is None:
                raise SeifyError(f"{{format}} {format} writes a seify file (what convert and finetune write): "
                                 f"convert {model if isinstance(model, str) else 'the model'} first, or save it with "
                                 "seify.save", "format")
            writer = _timm_folder if format == "timm" else _seify_folder
            result = _write_folder(path, force, lambda tmp: writer(loaded, tmp, size))
    result.notes = notes + result.notes
    return result


def _check_output(path: Path, format: str, force: bool, inputs: tuple) -> None:
    if format in ("onnx", "pt2"):
        check_writable(path, force=force, inputs=inputs)
    else:
        check_output_folder(path, force=force)


def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SeifyError(f"exporting to ONNX needs {', '.join(missing)}, which are not installed: {INSTALL}")


def _exported_part(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A detector's SE backbone (its heads take lists of images, which neither exporter handles as a graph),
    else the whole model."""
    scope = convertible_scope(model)
    if scope and type(model).__module__.startswith("torchvision.models.detection"):
        return model.get_submodule(scope).eval(), [f"exported the detector's backbone ({scope}), where the SE blocks "
                                                   "are; its heads stay in your detection pipeline"]
    return model.eval(), []


# ---------------------------------------------------------------- the formats


def _probe(size, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(seed))


def _shapes(size, dynamic_size: bool) -> list[tuple[int, ...]]:
    """The inputs a check runs: two batch sizes, and with dynamic H and W a second size too."""
    shapes = [(1, *size), (3, *size)]
    return shapes + [(2, size[0], size[1] + 32, size[2] + 32)] if dynamic_size else shapes


def _onnx(module: nn.Module, tmp: str, size, opset: int | None, legacy: bool, dynamic_size: bool) -> Exported:
    example = (_probe(size, 2),)
    axes = {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                torch.onnx.export(module, example, tmp, dynamo=False, opset_version=opset, input_names=["input"],
                                  dynamic_axes={"input": axes})
            else:
                dims = {i: torch.export.Dim(name, min=1 if i == 0 else 32, max=4096) for i, name in axes.items()}
                torch.onnx.export(module, example, tmp, dynamo=True, opset_version=opset, verbose=False,
                                  dynamic_shapes={_first_argument(module): dims}, report=False)
    except SeifyError:
        raise
    except Exception as e:
        raise _export_error(e, "ONNX", legacy) from e
    import onnxruntime as ort
    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list:
        return [torch.from_numpy(y) for y in session.run(None, {name: x.numpy()})]
    result = _checked("onnx", module, run, _shapes(size, dynamic_size))
    result.details = {"exporter": "torchscript" if legacy else "dynamo", "opset": _opset(tmp),
                      "dynamic": list(axes.values()), "runtime": f"onnxruntime {ort.__version__}"}
    return result


def _first_argument(module: nn.Module) -> str:
    return next(iter(inspect.signature(module.forward).parameters))


def _opset(path: str) -> int | None:
    import onnx
    proto = onnx.load(path, load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _export_error(e: Exception, target: str, legacy: bool = False) -> SeifyError:
    """One line that names the operator the exporter could not translate, and what to try instead."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    op = re.search(r"aten(?:::|\.)([A-Za-z0-9_]+)", text)
    what = f"operator aten::{op.group(1)} has no {target} translation" if op else first_line(e)
    other = "--format pt2" if legacy else "{legacy} (the TorchScript-based exporter) or {format} pt2"
    if target != "ONNX":
        other = "{format} onnx"
    return SeifyError(f"cannot export the model to {target}: {what}; try {other}", "legacy", "format")


def _pt2(module: nn.Module, tmp: str, size) -> Exported:
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (_probe(size, 2),),
                                      dynamic_shapes={_first_argument(module): {0: batch}})
        with open(tmp, "wb") as f:  # as a file object: torch's loader wants names that end in .pt2
            torch.export.save(program, f)
    except Exception as e:
        raise _export_error(e, "pt2") from e
    with open(tmp, "rb") as f:
        reloaded = torch.export.load(f).module()
    result = _checked("pt2", module, lambda x: tree_leaves(reloaded(x)), _shapes(size, False))
    result.details = {"exporter": "torch.export", "dynamic": ["batch"], "torch": torch.__version__}
    return result


def _timm_folder(loaded: LoadedModel, tmp: str, size) -> Exported:
    """timm's own model with SE, with the file's weights; timm's ``save_for_hf`` writes the folder."""
    import timm
    from timm.models import save_for_hf
    twin, architecture, model_args = _timm_twin(loaded)
    recipe = loaded.recipe or {}
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["data_config"].items()}
    config = {"label_names": recipe["classes"]} if recipe.get("classes") else {}
    save_for_hf(twin, tmp, model_config=config, model_args=model_args, safe_serialization=True, data_config=data)
    rebuilt = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
    result = _checked("timm", loaded.model, lambda x: tree_leaves(rebuilt(x)), _shapes(size, False))
    result.details = {"architecture": architecture, "model_args": model_args,
                      "load": "timm.create_model('local-dir:PATH', pretrained=True)"}
    return result


def _timm_twin(loaded: LoadedModel) -> tuple[nn.Module, str, dict]:
    """(timm's model with SE holding these weights, its architecture, its model_args): the ResNet family with
    ``block_args=dict(attn_layer='se')``, or a native SE twin (``seresnext26ts`` for ``resnext26ts``)."""
    import timm
    recipe = loaded.recipe or {}
    name = recipe.get("model", "")
    if recipe.get("parent") or name.startswith(("torchvision:", "hf-hub:")) or recipe.get("options") is None:
        raise _no_twin(loaded, "it is not a timm model with one SE conversion")
    base = name.split(".", 1)[0]
    candidates: list[tuple[str, dict[str, Any]]] = [(base, {"block_args": {"attn_layer": "se"}}), (f"se{base}", {})]
    tried = []
    x = _probe(tuple(recipe["input_size"]), 2)
    with torch.no_grad():
        expected = tree_leaves(loaded.model(x))
    for architecture, args in candidates:
        if not timm.is_model(architecture):
            continue
        try:
            twin = timm.create_model(architecture, num_classes=recipe["num_classes"], **args).eval()
            twin.load_state_dict(loaded.model.state_dict(), strict=True)
            with torch.no_grad():
                if _difference(expected, tree_leaves(twin(x)))[0] <= TOLERANCE * max(1.0, _scale(expected)):
                    set_pretrained_cfg(twin, recipe)
                    return twin, architecture, args
            tried.append(f"{architecture}: other outputs")
        except Exception as e:  # timm cannot build it this way: try the next
            tried.append(f"{architecture}: {first_line(e)[:80]}")
    raise _no_twin(loaded, "; ".join(tried) or "no SE twin of it is registered")


def _no_twin(loaded: LoadedModel, why: str) -> SeifyError:
    return SeifyError(f"timm cannot build {loaded.spec} with its SE blocks itself ({why}); export it with {{format}} "
                      "folder, which seify.load opens", "format")


def _seify_folder(loaded: LoadedModel, tmp: str, size) -> Exported:
    """config.json (what hubs show) and model.safetensors (the seify file: weights and recipe)."""
    recipe = dict(loaded.recipe or {})
    save(loaded.model, Path(tmp) / WEIGHTS, recipe)
    config = {"library_name": "seify", "seify_version": __version__, "base_architecture": recipe["model"],
              "num_classes": recipe["num_classes"], "label_names": recipe.get("classes"),
              "pretrained_cfg": dict(getattr(loaded.model, "pretrained_cfg", {}) or {}), "se": recipe["options"]}
    (Path(tmp) / CONFIG).write_text(json.dumps(config, indent=2, default=list) + "\n")
    rebuilt = load(f"local-dir:{tmp}")
    result = _checked("folder", loaded.model, lambda x: tree_leaves(rebuilt(x)), _shapes(size, False))
    result.details = {"load": "seify.load('local-dir:PATH'), or seify.load('hf-hub:ORG/NAME') once uploaded"}
    return result


# ---------------------------------------------------------------- the check, and where the files go


def _checked(format: str, module: nn.Module, run, shapes) -> Exported:
    """Run the written model and ``module`` on the same inputs: the largest difference must be within tolerance."""
    worst, scale = 0.0, 0.0
    for k, shape in enumerate(shapes):
        x = _probe(shape[1:], shape[0], seed=k + 1)
        with torch.no_grad():
            expected = tree_leaves(module(x))
            got = run(x)
        difference, magnitude = _difference(expected, got)
        worst, scale = max(worst, difference), max(scale, magnitude)
    allowed = TOLERANCE * max(1.0, scale)
    if worst > allowed:
        raise SeifyError(f"the {format} export computes something else: outputs differ by up to {worst:.3g} (they "
                         f"reach {scale:.3g}; allowed {allowed:.3g}); nothing was written")
    return Exported(format, "", [], [list(s) for s in shapes], worst, scale, allowed)


def _difference(expected: list, got: list) -> tuple[float, float]:
    expected = [t for t in expected if isinstance(t, torch.Tensor)]
    got = [torch.as_tensor(t) for t in got]
    if [t.shape for t in expected] != [t.shape for t in got]:
        return float("inf"), _scale(expected)
    return max(((a.float() - b.float()).abs().max().item() for a, b in zip(expected, got, strict=True)
                if a.numel()), default=0.0), _scale(expected)


def _scale(tensors: list) -> float:
    return max((t.abs().max().item() for t in tensors if isinstance(t, torch.Tensor) and t.numel()), default=0.0)


def _write_file(path: Path, force: bool, write) -> Exported:
    results = []
    atomic_write(path, lambda tmp: results.append(write(tmp)), force=force)
    result = results[0]
    result.path, result.files = str(path), [str(path)]
    return result


def _write_folder(path: Path, force: bool, write) -> Exported:
    """Write into a temporary folder beside ``path``; rename it into place once checked."""
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            result = write(tmp)
        except Exception as e:
            problem = write_error(e, path)
            if problem is None:
                raise
            raise SeifyError(f"{problem}; nothing there was changed") from e
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.path, result.files = str(path), sorted(str(p) for p in path.iterdir())
    return result


