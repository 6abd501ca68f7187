"""What trains in each epoch of a run: in a warm-up only what is new (the rest and its BatchNorm statistics frozen),
then everything; in an adapter run the adapter alone, the whole run, on a base that computes as loaded."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .build import Training

PHASES = {"warmup": "new parts only (the rest frozen)", "full": "all layers",
          "adapter": "the adapter only (the base frozen)"}


def phase_of(training: Training, epoch: int) -> str:
    """An adapter run's every epoch trains the adapter; others warm up what is new first, then train everything."""
    if training.prepared.trains is not None:
        return "adapter"
    return "warmup" if epoch < training.se_warmup_epochs else "full"


def enter_phase(training: Training, phase: str, compiled: bool) -> Callable:
    """The network a phase trains: in the warm-up only what is new gets gradients (and frozen BatchNorm keeps its
    statistics), in an adapter run only the adapter (so backward computes no gradient of a frozen weight); DDP and
    torch.compile wrap it anew, since what trains changed."""
    trains = {"warmup": training.prepared.fresh, "adapter": training.prepared.trains}.get(phase)
    for name, p in training.model.named_parameters():
        p.requires_grad_(trains is None or name in trains)
    net: nn.Module = training.model
    if training.dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[training.device.index] if training.device.type == "cuda" else None)
    return torch.compile(net) if compiled else net


def train_mode(model: nn.Module, phase: str) -> None:
    """Training mode, except for BatchNorm layers whose parameters are all frozen; an adapter's base computes as
    loaded (eval mode: its statistics, no dropout or drop-path), and the adapter has no mode of its own."""
    if phase == "adapter":
        model.eval()
        return
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and \
                not any(p.requires_grad for p in m.parameters()):
            m.eval()
