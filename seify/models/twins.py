"""timm's own model with its SE blocks that holds a seify file's weights: what ``seify export --format timm``
writes, so that timm builds and loads it with no seify installed."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..equivalence import compare
from ..errors import SeifyError, first_line
from . import LoadedModel
from .files import set_pretrained_cfg


def timm_twin(loaded: LoadedModel) -> tuple[nn.Module, str, dict]:
    """(timm's model with SE holding these weights, its architecture, its model_args): the ResNet family with
    ``block_args=dict(attn_layer='se')``, or a native SE twin (``seresnext26ts`` for ``resnext26ts``)."""
    import timm
    recipe = loaded.recipe or {}
    name = recipe.get("model", "")
    if recipe.get("parent") or name.startswith(("torchvision:", "hf-hub:")):
        raise _no_twin(loaded, "it is not a timm model with at most one SE conversion")
    if recipe.get("folded_native"):
        raise _no_twin(loaded, "seify fold took some of its own gates out")
    base = name.split(".", 1)[0]
    own = recipe.get("model_args") or {}
    candidates: list[tuple[str, dict[str, Any]]] = [(base, own)] if recipe.get("options") is None else \
        [(base, {**own, "block_args": {"attn_layer": "se"}}), (f"se{base}", own)]
    tried = []
    size = tuple(recipe["input_size"])
    for architecture, args in candidates:
        if not timm.is_model(architecture):
            continue
        try:
            twin = timm.create_model(architecture, num_classes=recipe["num_classes"], **args).eval()
            twin.load_state_dict(loaded.model.state_dict(), strict=True)
            if compare(loaded.model, twin, size).agrees:
                set_pretrained_cfg(twin, recipe)
                return twin, architecture, args
            tried.append(f"{architecture}: other outputs")
        except Exception as e:  # timm cannot build it this way: try the next
            tried.append(f"{architecture}: {first_line(e)[:80]}")
    raise _no_twin(loaded, "; ".join(tried) or "no SE twin of it is registered")


def _no_twin(loaded: LoadedModel, why: str) -> SeifyError:
    return SeifyError(f"timm cannot build {loaded.spec} with its SE blocks itself ({why}); export it with {{format}} "
                      "folder, which seify.load opens", "format")
