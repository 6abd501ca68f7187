"""Seeding and the random-number state that a resumed run must continue exactly."""
from __future__ import annotations

import contextlib
import random

import numpy
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One image's augmentation seed in one epoch: the same on the CPU and the device path, whatever the worker
    count, the batch split or where a run was stopped."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


@contextlib.contextmanager
def sample_draws(seed: int):
    """Every generator an augmentation may draw from (torch's, Python's, numpy's) seeded for one image, and put
    back afterwards, so that loading in this process leaves the training draws (dropout, drop-path) as they were."""
    saved = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        numpy.random.set_state(saved[2])


def loading_process(worker_id: int) -> None:
    """A data-loading process takes one thread: the trainer owns the cores."""
    torch.set_num_threads(1)


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
