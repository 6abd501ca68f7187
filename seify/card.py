"""The model card (README.md) of an exported folder, as timm's hub folders have one and the Hugging Face hub reads
it: a YAML header (library, tags, metrics) and what a colleague needs to know, all generated from the file's
recipe (the base model, where SE went, the training and its held-out scores, the data's fingerprint), never
typed, and holding no local path.
"""
from __future__ import annotations

import json

from torch import nn

from . import __version__
from .counting import count_macs
from .gates import find_gates
from .models import LoadedModel


def model_card(loaded: LoadedModel, format: str, name: str) -> str:
    """The card of ``loaded`` (a seify file) exported as ``format`` (``timm`` or ``folder``) into a folder called
    ``name``."""
    recipe = loaded.recipe or {}
    trained = recipe.get("finetune") or {}
    return "\n".join(["---", *_header(recipe, trained, format, name), "---", "", f"# {name}", "",
                      *_base(recipe), *_se(recipe, loaded), *_folds(recipe), *_cost(loaded),
                      *_training(recipe, trained), *_load(format, name),
                      f"Written by seify {__version__} from the file's recipe.", ""])


def _last_fold(recipe: dict) -> dict:
    return (recipe.get("folds") or [{}])[-1]


def _yaml(value) -> str:
    return json.dumps(value)  # JSON is YAML: names with any character stay one value


def _header(recipe: dict, trained: dict, format: str, name: str) -> list[str]:
    lines = [f"library_name: {'timm' if format == 'timm' else 'seify'}",
             "tags:", "- image-classification", "- squeeze-and-excitation", "- seify"] + \
        (["- timm"] if format == "timm" else [])
    fold = _last_fold(recipe)
    if fold.get("top1_after") is not None:  # what the file computes now, as fold measured it
        metrics = [(f"top-1 accuracy, measured by seify fold on {fold['images']} images", fold["top1_after"])]
    elif recipe.get("top1") is not None:
        metrics = [("top-1 accuracy (held-out split)", recipe["top1"])] + \
            ([("top-5 accuracy (held-out split)", recipe["top5"])] if recipe.get("top5") is not None else [])
    else:
        metrics = []
    if metrics:
        lines += ["model-index:", f"- name: {_yaml(name)}", "  results:", "  - task:",
                  "      type: image-classification", "    dataset:", "      type: imagefolder",
                  f"      name: {_yaml(_data_name(trained))}", "    metrics:"]
        for label, value in metrics:
            lines += ["    - type: accuracy", f"      name: {_yaml(label)}", f"      value: {value:.2f}"]
    return lines


def _data_name(trained: dict) -> str:
    data = trained.get("data_fingerprint") or {}
    classes = data.get("classes") or []
    return f"an image folder of {len(classes)} classes" if classes else "an image folder"


def _base(recipe: dict) -> list[str]:
    weights = recipe.get("weights") or "not recorded"
    return ["## Base model", "", f"- architecture: `{recipe.get('model')}`", f"- its weights: {weights}",
            f"- classes: {recipe.get('num_classes')}"
            + (f" ({', '.join(recipe['classes'][:20])}{', ...' if len(recipe['classes']) > 20 else ''})"
               if recipe.get("classes") else ""), ""]


def _se(recipe: dict, loaded: LoadedModel) -> list[str]:
    options = recipe.get("options")
    if options is None:
        own = find_gates(loaded.model)
        kinds = ", ".join(sorted({gate.kind for gate in own.values()}))
        return ["## Squeeze-and-Excitation", "", "No blocks added by seify." + (
            f" The network's own channel gates: {len(own)} ({kinds})." if own else " The network has no channel "
            "gates."), ""]
    sites = recipe.get("sites") or []
    block = "SE blocks (Hu et al., SENet)" if options.get("block", "se") == "se" else \
        "static scale-and-shift blocks (SE's sites, without input-conditioning)"
    lines = ["## Squeeze-and-Excitation", "",
             f"{len(sites)} {block}, placement `{recipe.get('placement') or options.get('at')}`, variant "
             f"`{options.get('variant')}`, reduction {options.get('reduction')}, squeeze `{options.get('squeeze')}`, "
             f"gate `{options.get('gate')}`.", ""]
    if sites:
        lines += ["| block | channels | reduced to |", "|---|---|---|"]
        lines += [f"| `{s['path']}` | {s.get('channels', '')} | {s.get('reduced_channels', '')} |" for s in sites]
        lines.append("")
    return lines


def _folds(recipe: dict) -> list[str]:
    """What ``seify fold`` did to the file, as it measured it: each gate and how it went."""
    lines = []
    for fold in recipe.get("folds") or []:
        gates = fold.get("gates") or {}
        lines += ["## Folded", "", f"`seify fold` took {len(gates)} gates out, each replaced by a per-channel "
                  "constant in a neighbouring layer:", ""] + [f"- `{path}`: {how}" for path, how in gates.items()]
        if fold.get("top1_after") is not None:
            lines += ["", f"Measured on {fold['images']} images at {fold['img_size']} px: top-1 "
                      f"{fold['top1_before']:.2f}% before, {fold['top1_after']:.2f}% after; outputs changed by up to "
                      f"{fold['max_output_change']:.3g}."]
        else:
            lines += ["", "Every gate folded was constant by its weights: the file computes what the model did."]
        lines.append("")
    return lines


def _cost(loaded: LoadedModel) -> list[str]:
    size = tuple(loaded.data_config["input_size"])
    ours = _counted(loaded.model, size)
    lines = ["## Cost", "", f"At {size[1]}x{size[2]} px, one image:", "", "| | parameters | multiply-adds |",
             "|---|---|---|"]
    if loaded.base is not None:
        base = _counted(loaded.base, size)
        lines.append(f"| base model | {base[0]:,} | {base[1]:,} |")
        lines.append(f"| this model | {ours[0]:,} ({_percent(ours[0], base[0])}) | {ours[1]:,} "
                     f"({_percent(ours[1], base[1])}) |")
    else:
        lines.append(f"| this model | {ours[0]:,} | {ours[1]:,} |")
    return lines + [""]


def _counted(model: nn.Module, size) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), count_macs(model, size)[0]


def _percent(value: int, base: int) -> str:
    return f"{100 * (value - base) / base:+.2f}%" if base else "n/a"


def _training(recipe: dict, trained: dict) -> list[str]:
    if not trained:
        measured = any(f.get("top1_after") is not None for f in recipe.get("folds") or [])
        what = "Not fine-tuned by seify" + (
            ": folded with gates measured on images (above), it computes close to, not exactly, what its base does."
            if measured else ": a conversion, computing what its base model does." if recipe.get("options")
            else ": the network as it was loaded" + (", its constant gates folded." if recipe.get("folds") else "."))
        return ["## Training", "", what, ""]
    config = trained.get("config") or {}
    settings = ", ".join(f"{k} {v}" for k, v in sorted(config.items()) if v is not None) or "not recorded"
    data = trained.get("data_fingerprint") or {}
    split = f"--val-split {trained['val_split']:g} --seed {trained.get('seed')}" if trained.get("val_split") else \
        "the data's own val/ folder"
    lines = ["## Training", "", f"Fine-tuned with `seify finetune` at {trained.get('img_size')} px, augmentation "
             f"`{trained.get('augmentation')}`.", "", f"- configuration: {settings}",
             f"- held-out images: {split}"]
    if data:
        lines += [f"- data: {data.get('images')} images of {len(data.get('classes') or [])} classes, fingerprint "
                  f"`{data.get('digest')}` (file names and sizes; `seify evaluate` recognises the tree by it)"]
    if recipe.get("top1") is not None:
        top5 = f", top-5 {recipe['top5']:.2f}%" if recipe.get("top5") is not None else ""
        folded = " (before folding: see above)" if _last_fold(recipe).get("top1_after") is not None else ""
        lines.append(f"- held-out top-1 {recipe['top1']:.2f}%{top5} (the best epoch, {recipe.get('epoch')}){folded}")
    else:
        lines.append("- held-out scores: not recorded in this file (the last weights of a run; its best file has them)")
    return lines + [""]


def _load(format: str, name: str) -> list[str]:
    lines = ["## How to load", "", "```python", "import seify", f'model = seify.load("local-dir:{name}")  '
             '# or "hf-hub:ORG/NAME" once uploaded']
    if format == "timm":
        lines += ["", "import timm  # no seify needed", f'model = timm.create_model("local-dir:{name}", '
                  "pretrained=True)"]
    return lines + ["```", ""]
