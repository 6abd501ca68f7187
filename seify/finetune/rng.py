"""Seeding and the random-number state that a resumed run must continue exactly."""
from __future__ import annotations

import random

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def seed_worker(worker_id: int) -> None:
    """A data-loading process: seeded from the loader's generator, one thread (the trainer owns the cores)."""
    torch.set_num_threads(1)
    seed_everything(torch.initial_seed() % 2**32)


def capture(device: torch.device) -> dict:
    version, state, gauss = random.getstate()
    captured = {"torch": torch.get_rng_state(), "python": list(state), "python_version": version,
                "python_gauss": gauss}
    if device.type == "cuda":
        captured["cuda"] = torch.cuda.get_rng_state(device)
    return captured


def restore(captured: dict, device: torch.device) -> None:
    torch.set_rng_state(captured["torch"])
    random.setstate((captured["python_version"], tuple(captured["python"]), captured["python_gauss"]))
    if device.type == "cuda" and "cuda" in captured:
        torch.cuda.set_rng_state(captured["cuda"], device)
