"""torchrun integration: one process per device, NCCL on GPUs and gloo on CPUs; rank 0 alone writes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda"):
        dev = torch.device("cuda", d.local_rank if d.enabled else torch.device(wanted).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
