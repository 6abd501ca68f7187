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

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__, kernels
from .card import model_card
from .checkpoint import save
from .equivalence import Difference, difference, probe
from .errors import SeifyError, first_line
from .limits import check_choice, check_whole
from .models import LoadedModel, files_read, load, resolve
from .models.twins import timm_twin
from .surgery import convertible_scope
from .writes import check_output_folder, check_writable, replace_folder, sidecar_of, write_with_sidecars, written_before

FORMATS = ("onnx", "pt2", "timm", "folder", "safetensors")
FILES = ("onnx", "pt2", "safetensors")  # formats written as one file; the others are folders
INSTALL = "pip install 'seify[export]'"
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
MANIFEST = ".seify-export.json"  # what an export wrote in a folder: all that a later --force may replace
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes 18 and newer (and silently 18 for older ones)
MIN_DYNAMIC = 32  # --dynamic-size exports heights and widths from here to 4096
EMBEDDED_BYTES = 2_000_000_000  # protobuf's limit: larger models keep their weights in NAME.onnx.data


@dataclass
class Exported:
    """What ``export`` wrote and the check that proves it."""
    format: str
    path: str
    files: list[str]
    inputs: list[list[int]]  # the input shapes the written model was run at
    max_abs_diff: float
    output_scale: float
    tolerance: float  # the largest difference allowed: equivalence.TOLERANCE of the outputs' magnitude
    details: dict = field(default_factory=dict)  # exporter, opset, dynamic axes; timm's architecture and args
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def export(model: str | nn.Module, path: str | Path, format: str = "onnx", *, weights: str | None = None,
           pretrained: bool = False, input_size: tuple[int, int, int] | None = None, opset: int | None = None,
           legacy: bool = False, dynamic_size: bool = False, force: bool = False) -> Exported:
    """Export ``model`` (any spec seify takes, or a module you hold) to ``path`` and check what was written.

    ``force`` replaces only what an earlier seify export wrote there; nothing else is ever removed."""
    check_choice(format, "format", FORMATS)
    if (legacy or opset is not None or dynamic_size) and format != "onnx":
        raise SeifyError("{legacy}, {opset} and {dynamic_size} are options of {format} onnx", "legacy", "opset",
                         "dynamic_size", "format")
    path = Path(path)
    inputs = _input_files(model, weights)
    _check_output(path, format, force, inputs)
    loaded: LoadedModel | None = None
    if isinstance(model, nn.Module):
        network = model
    else:
        loaded = resolve(model, weights=weights, pretrained=pretrained)
        network = loaded.model
    module, notes = _exported_part(network)
    size = _input_size(module, input_size, loaded, dynamic_size)
    with kernels.disabled():
        if format == "onnx":
            legacy, opset_notes = _exporter(opset, legacy)
            notes += opset_notes
            _need("onnx", "onnxruntime", "onnxscript") if not legacy else _need("onnx", "onnxruntime")
            result = _write_files(path, force, lambda tmp: _onnx(module, tmp, size, opset, legacy, dynamic_size))
        elif format == "pt2":
            result = _write_files(path, force, lambda tmp: _pt2(module, tmp, size))
        else:
            if loaded is None:
                raise SeifyError(f"{{format}} {format} writes what rebuilds the model, which a module you hold "
                                 "does not record: save it with seify.save(..., model=NAME) and export the file",
                                 "format")
            whole = loaded if loaded.recipe is not None else dataclasses.replace(loaded, recipe=loaded.plain_recipe())
            result = _write_files(path, force, lambda tmp: _whole_file(whole, tmp, size)) if format == "safetensors" \
                else _write_folder(path, format, lambda tmp: _folder_with_card(whole, format, tmp, size, path.name))
    result.notes = notes + result.notes
    return result


def _input_files(model: str | nn.Module, weights: str | None) -> list[Path]:
    """The files (or folders) the export reads: never written over, never inside a folder it replaces."""
    return list(files_read(model if isinstance(model, str) else None, weights))


def _check_output(path: Path, format: str, force: bool, inputs: list[Path]) -> None:
    if format == "safetensors" and path.suffix != ".safetensors":
        raise SeifyError(f"{path}: a seify file's name ends in .safetensors, which seify.load opens", "format")
    if format in FILES:
        check_writable(path, force=force, inputs=tuple(inputs))
        sidecar = sidecar_of(path)
        if sidecar.exists() and not (force and _weights_of(path, sidecar)):
            raise SeifyError(f"{sidecar} is there and is not the weights of an ONNX {path} that {{force}} replaces; "
                             "move it or choose another path", "force")
        return
    check_output_folder(path, force=force)
    if not path.parent.is_dir():
        raise SeifyError(f"cannot write {path}: {path.parent} is not an existing folder; create it first")
    for source in inputs:
        if source.resolve() == path.resolve() or path.resolve() in source.resolve().parents:
            raise SeifyError(f"{path} holds the input {source}, which {{force}} would remove; export to another "
                             "folder", "force")
    if path.is_dir() and any(path.iterdir()):
        foreign = sorted(set(os.listdir(path)) - written_before(path, MANIFEST))
        if foreign:
            raise SeifyError(f"{path} holds files an earlier seify export did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); {{force}} replaces only such an export: "
                             "choose another folder", "force")


def _weights_of(path: Path, sidecar: Path) -> bool:
    """Whether the ONNX file at ``path`` keeps its weights in ``sidecar``: then replacing the file replaces both."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # no onnx here, or not an ONNX file: the sidecar is not known to be its
        return False
    return any(uses_external_data(t) and ExternalDataInfo(t).location == sidecar.name
               for t in model.graph.initializer)


def _input_size(module: nn.Module, given, loaded: LoadedModel | None, dynamic_size: bool) -> tuple[int, ...]:
    """The size the model is exported and checked at; a channel count the model does not take, or a size below
    what ``dynamic_size`` exports, named before anything is traced."""
    size = tuple(given or (loaded.data_config["input_size"] if loaded else (3, 224, 224)))
    first = next((m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and size[0] != first.in_channels:
        raise SeifyError(f"{{input_size}} {','.join(map(str, size))} has {size[0]} channel(s), but the model's first "
                         f"convolution takes {first.in_channels}", "input_size")
    if dynamic_size and min(size[1:]) < MIN_DYNAMIC:
        raise SeifyError(f"{{dynamic_size}} exports sizes from {MIN_DYNAMIC} px up, and {{input_size}} "
                         f"{','.join(map(str, size))} is below that; use at least {MIN_DYNAMIC} px", "dynamic_size",
                         "input_size")
    return size


def _exporter(opset: int | None, legacy: bool) -> tuple[bool, list[str]]:
    """(whether the TorchScript-based exporter writes it, notes): each exporter only at the opsets it writes."""
    if opset is None:
        return legacy, []
    import torch.onnx._constants as constants
    legacy_max, dynamo_max = constants.ONNX_MAX_OPSET, _newest_opset()
    check_whole(opset, "opset", constants.ONNX_MIN_OPSET, legacy_max if legacy else dynamo_max)
    if not legacy and opset < DYNAMO_MIN_OPSET:
        return True, [f"opset {opset} is older than the dynamo exporter writes ({DYNAMO_MIN_OPSET} on): exported "
                      "with the TorchScript-based exporter"]
    return legacy, []


def _newest_opset() -> int:
    try:
        import onnx
        return int(onnx.defs.onnx_opset_version())
    except ImportError:
        return DYNAMO_MIN_OPSET


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


def _shapes(size, dynamic_size: bool) -> list[tuple[int, ...]]:
    """The inputs a check runs: two batch sizes, and with dynamic H and W a second size too."""
    shapes = [(1, *size), (3, *size)]
    return shapes + [(2, size[0], size[1] + 32, size[2] + 32)] if dynamic_size else shapes


def _onnx(module: nn.Module, tmp: str, size, opset: int | None, legacy: bool, dynamic_size: bool) -> Exported:
    """One self-contained .onnx; past protobuf's 2 GB limit its weights go to NAME.onnx.data beside it."""
    example = (probe(size, 2),)
    axes = {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})}
    external = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > EMBEDDED_BYTES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                torch.onnx.export(module, example, tmp, dynamo=False, opset_version=opset, input_names=["input"],
                                  dynamic_axes={"input": axes})
            else:
                dims = {i: torch.export.Dim(name, min=1 if i == 0 else MIN_DYNAMIC, max=4096)
                        for i, name in axes.items()}
                torch.onnx.export(module, example, tmp, dynamo=True, opset_version=opset, verbose=False,
                                  dynamic_shapes={_first_argument(module): dims}, report=False,
                                  external_data=external)
    except SeifyError:
        raise
    except Exception as e:
        raise _export_error(e, "ONNX", legacy, dynamic_size) from e
    _without_source_paths(tmp)
    written = _opset(tmp)
    if opset is not None and written != opset:
        raise SeifyError(f"asked for {{opset}} {opset}, the exporter wrote opset {written}; nothing was written",
                         "opset")
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise SeifyError(f"onnxruntime {ort.__version__} cannot run the exported model ({first_line(e)[:160]}); try "
                         "another {opset}; nothing was written", "opset") from e
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list:
        return [torch.from_numpy(y) for y in session.run(None, {name: x.numpy()})]
    result = _checked("onnx", module, run, _shapes(size, dynamic_size))
    result.details = {"exporter": "torchscript" if legacy else "dynamo", "opset": written,
                      "dynamic": list(axes.values()), "runtime": f"onnxruntime {ort.__version__}",
                      "weights": "in NAME.onnx.data (over 2 GB)" if external else "embedded"}
    if external:
        result.notes.append(f"the weights are over protobuf's 2 GB limit: they are in {Path(tmp).name}.data, which "
                            "must stay beside the .onnx file")
    return result


def _without_source_paths(path: str) -> None:
    """Drop the exporter's stack traces (the file paths of torch's, timm's and the user's code, home folder and
    all) from the nodes: a file that travels carries no local path."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    for graph in [model.graph, *model.functions]:
        for node in graph.node:
            node.doc_string = ""
            kept = [p for p in node.metadata_props if "stack_trace" not in p.key]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    onnx.save(model, path)


def _first_argument(module: nn.Module) -> str:
    return next(iter(inspect.signature(module.forward).parameters))


def _opset(path: str) -> int | None:
    import onnx
    proto = onnx.load(path, load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _export_error(e: Exception, target: str, legacy: bool = False, dynamic_size: bool = False) -> SeifyError:
    """One line that names the operator the exporter could not translate, and what to try instead."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if dynamic_size and re.search(r"Constraints violated|guard|specializ|Dim\(", text):
        return SeifyError(f"the model does not run at every size from {MIN_DYNAMIC} to 4096 px, which "
                          "{dynamic_size} exports (a size it needs is fixed or bounded in its graph); export a fixed "
                          "size without {dynamic_size}", "dynamic_size")
    op = re.search(r"aten(?:::|\.)([A-Za-z0-9_]+)", text)
    what = f"operator aten::{op.group(1)} has no {target} translation" if op else first_line(e)
    other = "--format pt2" if legacy else "{legacy} (the TorchScript-based exporter) or {format} pt2"
    if target != "ONNX":
        other = "{format} onnx"
    return SeifyError(f"cannot export the model to {target}: {what}; try {other}", "legacy", "format")


def _pt2(module: nn.Module, tmp: str, size) -> Exported:
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (probe(size, 2),),
                                      dynamic_shapes={_first_argument(module): {0: batch}})
        for graph in program.graph_module.modules():  # stack traces hold local paths: a file that travels has none
            if isinstance(graph, torch.fx.GraphModule):
                for node in graph.graph.nodes:
                    node.meta.pop("stack_trace", None)
        with open(tmp, "wb") as f:  # as a file object: torch's loader wants names that end in .pt2
            torch.export.save(program, f)
    except Exception as e:
        raise _export_error(e, "pt2") from e
    with open(tmp, "rb") as f:
        reloaded = torch.export.load(f).module()
    result = _checked("pt2", module, reloaded, _shapes(size, False))
    result.details = {"exporter": "torch.export", "dynamic": ["batch"], "torch": torch.__version__}
    return result


def _whole_file(loaded: LoadedModel, tmp: str, size) -> Exported:
    """The seify file of the whole model (an adapter merged onto its base), which loads with no base."""
    save(loaded.model, tmp, dict(loaded.recipe or {}), force=True)
    result = _checked("safetensors", loaded.model, load(tmp), _shapes(size, False))
    result.details = {"load": "seify.load(PATH)"}
    return result


def _folder_with_card(loaded: LoadedModel, format: str, tmp: str, size, name: str) -> Exported:
    result = (_timm_folder if format == "timm" else _seify_folder)(loaded, tmp, size)
    (Path(tmp) / CARD).write_text(model_card(loaded, format, name))
    return result


def _timm_folder(loaded: LoadedModel, tmp: str, size) -> Exported:
    """timm's own model with SE, with the file's weights; timm's ``save_for_hf`` writes the folder."""
    import timm
    from timm.models import save_for_hf
    twin, architecture, model_args = timm_twin(loaded)
    recipe = loaded.recipe or {}
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["data_config"].items()}
    config = {"label_names": recipe["classes"]} if recipe.get("classes") else {}
    save_for_hf(twin, tmp, model_config=config, model_args=model_args, safe_serialization=True, data_config=data)
    rebuilt = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
    result = _checked("timm", loaded.model, rebuilt, _shapes(size, False))
    result.details = {"architecture": architecture, "model_args": model_args,
                      "load": "timm.create_model('local-dir:PATH', pretrained=True)"}
    return result


def _seify_folder(loaded: LoadedModel, tmp: str, size) -> Exported:
    """config.json (what hubs show) and model.safetensors (the seify file: weights and recipe)."""
    recipe = dict(loaded.recipe or {})
    save(loaded.model, Path(tmp) / WEIGHTS, recipe)
    config = {"library_name": "seify", "seify_version": __version__, "base_architecture": recipe["model"],
              "num_classes": recipe["num_classes"], "label_names": recipe.get("classes"),
              "pretrained_cfg": dict(getattr(loaded.model, "pretrained_cfg", {}) or {}), "se": recipe["options"]}
    (Path(tmp) / CONFIG).write_text(json.dumps(config, indent=2, default=list) + "\n")
    rebuilt = load(f"local-dir:{tmp}")
    result = _checked("folder", loaded.model, rebuilt, _shapes(size, False))
    result.details = {"load": "seify.load('local-dir:PATH'), or seify.load('hf-hub:ORG/NAME') once uploaded"}
    return result


# ---------------------------------------------------------------- the check, and where the files go


def _checked(format: str, module: nn.Module, run, shapes) -> Exported:
    """Run the written model and ``module`` on the same inputs: they must agree (``seify.equivalence``)."""
    checked = Difference()
    for k, shape in enumerate(shapes):
        x = probe(shape[1:], shape[0], seed=k + 1)
        with torch.no_grad():
            checked = checked | difference(module(x), run(x))
    if not checked.agrees:
        raise SeifyError(f"the {format} export does not compute what the model does: {checked.why()}; nothing was "
                         "written")
    return Exported(format, "", [], [list(s) for s in shapes], checked.max_abs, checked.scale, checked.allowed)


def _write_files(path: Path, force: bool, write) -> Exported:
    results: list[Exported] = []
    files = write_with_sidecars(path, lambda tmp: results.append(write(tmp)), force=force)
    result = results[0]
    result.path, result.files = str(path), sorted(str(f) for f in files)
    return result


def _write_folder(path: Path, format: str, write) -> Exported:
    """``_check_output`` has made sure that what it replaces is an earlier export and nothing else."""
    results: list[Exported] = []
    replace_folder(path, lambda tmp: results.append(write(tmp)), MANIFEST,
                   {"seify_version": __version__, "format": format})
    result = results[0]
    result.path, result.files = str(path), sorted(str(p) for p in path.iterdir() if p.name != MANIFEST)
    return result
