"""Undoing a fresh SE gate's constant 0.5, exactly: the x2 folded into a neighbouring layer where that is exact
(backward through positively homogeneous ops into a norm, convolution, linear layer or layer scale, or forward into
the consumer convolutions), else the gate itself scaled by 2."""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from .scaling import fold_backward, fold_forward, tensor_of
from .se import SqueezeExcite
from .sites import Site


def join(scope: str, path: str) -> str:
    """A module path inside ``scope`` ('' for the whole model) as a path in the whole model."""
    return f"{scope}.{path}" if scope and path else scope or path


def compensate(model: nn.Module, gm_whole: fx.GraphModule, sites: list[Site], scope: str, fold: bool = True
               ) -> None:
    """Make every fresh gate's constant 0.5 an exact identity: fold x2 into a neighbour, else (or without
    ``fold``, leaving the model's own tensors as they were) scale the gate."""
    calls = Counter(n.target for n in gm_whole.graph.nodes if n.op in ("call_module", "get_attr"))
    scaled: set[str] = set()
    for site in sites:
        readers = site.consumers + [site.slot] if site.slot is not None else site.consumers
        value = site.slot if site.slot is not None else site.producer
        candidates = (fold_backward(site.producer, readers, gm_whole, calls),
                      fold_forward(value, site.consumers, gm_whole, calls)) if fold else ()
        params = next((p for p in candidates if p and not scaled & set(p)), None)
        if params:
            with torch.no_grad():
                for name in params:
                    tensor_of(model, name).mul_(2.0)
            scaled.update(params)
            owners = {p.rsplit(".", 1)[0] if p.endswith((".weight", ".bias")) else p for p in params}
            site.compensation = "x2 folded into " + ", ".join(sorted(join(scope, o) for o in owners))
        else:
            block = model.get_submodule(site.path)
            assert isinstance(block, SqueezeExcite)
            block.scale = 2.0
            site.compensation = "gate scaled x2"
