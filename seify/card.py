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
from .models import LoadedModel


def model_card(loaded: LoadedModel, format: str, name: str) -> str:
    """The card of ``loaded`` (a seify file) exported as ``format`` (``timm`` or ``folder``) into a folder called
    ``name``."""
    recipe = loaded.recipe or {}
    trained = recipe.get("finetune") or {}
    return "\n".join(["---", *_header(recipe, trained, format, name), "---", "", f"# {name}", "",
                      *_base(recipe), *_se(recipe), *_cost(loaded), *_training(recipe, trained), *_load(format, name),
                      f"Written by seify {__version__} from the file's recipe.", ""])


def _yaml(value) -> str:
    return json.dumps(value)  # JSON is YAML: names with any character stay one value


def _header(recipe: dict, trained: dict, format: str, name: str) -> list[str]:
    lines = [f"library_name: {'timm' if format == 'timm' else 'seify'}",
             "tags:", "- image-classification", "- squeeze-and-excitation", "- seify"] + \
        (["- timm"] if format == "timm" else [])
    if recipe.get("top1") is not None:
        metrics = [("top-1 accuracy", recipe["top1"])] + \
            ([("top-5 accuracy", recipe["top5"])] if recipe.get("top5") is not None else [])
        lines += ["model-index:", f"- name: {_yaml(name)}", "  results:", "  - task:",
                  "      type: image-classification", "    dataset:", "      type: imagefolder",
                  f"      name: {_yaml(_data_name(trained))}", "    metrics:"]
        for label, value in metrics:
            lines += ["    - type: accuracy", f"      name: {_yaml(label + ' (held-out split)')}",
                      f"      value: {value:.2f}"]
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


def _se(recipe: dict) -> list[str]:
    options = recipe.get("options")
    if options is None:
        return ["## Squeeze-and-Excitation", "", "None: the plain model (`--no-se`).", ""]
    sites = recipe.get("sites") or []
    lines = ["## Squeeze-and-Excitation", "",
             f"{len(sites)} SE blocks (Hu et al., SENet), placement `{recipe.get('placement') or options.get('at')}`, "
             f"variant `{options.get('variant')}`, reduction {options.get('reduction')}, squeeze "
             f"`{options.get('squeeze')}`, gate `{options.get('gate')}`.", ""]
    if recipe.get("folded"):
        lines += [f"{len(recipe['folded'])} blocks were folded away by `seify fold` (their gates were constant): "
                  + ", ".join(f"`{p}`" for p in recipe["folded"]), ""]
    if sites:
        lines += ["| block | channels | reduced to |", "|---|---|---|"]
        lines += [f"| `{s['path']}` | {s.get('channels', '')} | {s.get('reduced_channels', '')} |" for s in sites]
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
        return ["## Training", "", "Not fine-tuned by seify: a conversion, computing what its base model does.", ""]
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
        lines.append(f"- held-out top-1 {recipe['top1']:.2f}%{top5} (the best epoch, {recipe.get('epoch')})")
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
