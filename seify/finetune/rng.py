"""Seeding and the random-number state that a resumed run must continue exactly."""
from __future__ import annotations

import random

import numpy
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)


def capture(device: torch.device) -> dict:
    """This process's random state. Every rank has its own (each was seeded with seed + rank)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = numpy.random.get_state(legacy=True)
    captured = {"torch": torch.get_rng_state(), "python": list(state), "python_version": version,
                "python_gauss": gauss, "numpy": {"kind": kind, "keys": torch.from_numpy(numpy.asarray(keys, "int64")),
                                                 "pos": pos, "has_gauss": has_gauss, "cached": cached}}
    if device.type == "cuda":
        captured["cuda"] = torch.cuda.get_rng_state(device)
    return captured


def restore(captured: dict, device: torch.device) -> None:
    torch.set_rng_state(captured["torch"])
    random.setstate((captured["python_version"], tuple(captured["python"]), captured["python_gauss"]))
    if "numpy" in captured:  # checkpoints of 0.1.0 did not hold it
        n = captured["numpy"]
        numpy.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                                n["cached"]))
    if device.type == "cuda" and "cuda" in captured:
        torch.cuda.set_rng_state(captured["cuda"], device)
