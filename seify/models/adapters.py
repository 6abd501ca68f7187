"""Adapter files: what a run trained on a frozen base (seify's blocks, the head, a network's own gates), plus the
few tensors its conversion changed, with the identity of that base; rebuilt on that base and on nothing else.

One base, many adapters: each file is a few percent of the model and names its base by spec, weights file and a
sha256 of the base's tensors, which loading checks against the base it is given.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import SeifyError
from .files import load_strict
from .spec import names_files


def digest(model: nn.Module) -> str:
    """sha256 of a model's state_dict: each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def identity(model: nn.Module, spec: str, weights: str | None, pretrained: bool) -> dict:
    """How an adapter names its base: the spec (a file or folder by its name alone: files that travel carry no
    local path), its weights file's name, and the digest of its tensors."""
    whole = names_files(spec)  # the base is a file or folder itself
    return {"model": Path(spec.removeprefix("local-dir:")).name if whole else spec, "whole": whole,
            "weights": Path(weights).name if weights else None, "pretrained": pretrained, "sha256": digest(model)}


def named(base: dict) -> str:
    """The base as a message names it."""
    given = f" with the weights {base['weights']}" if base.get("weights") else \
        " with its pretrained weights" if base.get("pretrained") else ""
    return f"{base['model']}{given} (sha256 {base['sha256'][:12]})"


def how_to_give(base: dict) -> str:
    """Which option gives an adapter its base, as the base was given when it was trained."""
    if base.get("pretrained"):
        return "{pretrained}"
    return "{weights} " + (base.get("weights") or base["model"])


def no_base(path: str, base: dict) -> SeifyError:
    return SeifyError(f"{path} is an adapter: it holds only what a run trained on {named(base)}; give that base "
                      f"with {how_to_give(base)}", "weights", "pretrained")


def check_base(path: str, base: dict, model: nn.Module, given: str) -> None:
    """Refuse a base whose tensors are not the ones the adapter was trained on."""
    found = digest(model)
    if found != base["sha256"]:
        raise SeifyError(f"{given} is not the base {path} was trained on: it expects {named(base)}, and {given} "
                         f"gives sha256 {found[:12]}; pass the base it was trained on with {how_to_give(base)}",
                         "weights", "pretrained")


def assemble(model: nn.Module, base: nn.Module, tensors: dict, path: str) -> None:
    """Fill ``model`` (the adapter's architecture) with the base's tensors and the adapter's over them, strictly."""
    expected, frozen = model.state_dict(), base.state_dict()
    full = {k: frozen[k] for k in expected if k in frozen and k not in tensors}
    full.update(tensors)
    load_strict(model, full, f"{path} and its base do not make the model its recipe describes",
                "train the adapter again")
