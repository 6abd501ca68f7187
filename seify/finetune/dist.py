"""torchrun integration: one process per device, NCCL on GPUs and gloo on CPUs; rank 0 alone writes."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..device import check_device
from ..errors import SeifyError, first_line
from ..images.folders import usable_cores

T = TypeVar("T")


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

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def decided(self, decide: Callable[[], T]) -> T:
        """``decide()`` run on rank 0 alone, and its outcome (a value, or the error it raised) on every rank: a
        start-up decision (the lock, ``--force``, what to resume) must be one for all ranks before any reads the run
        folder, or one rank would leave while the others wait for it until the timeout."""
        if not self.enabled:
            return decide()
        outcome: list = [None]
        failure: BaseException | None = None
        if self.main:
            try:
                outcome[0] = ("value", decide())
            except SeifyError as e:
                failure, outcome[0] = e, ("refused", e.template, e.options)
            except BaseException as e:
                failure, outcome[0] = e, ("failed", f"rank 0 failed to start the run: {first_line(e)}", ())
        dist.broadcast_object_list(outcome, src=0)
        kind, *rest = outcome[0]
        if kind == "value":
            return rest[0]
        if failure is not None:
            raise failure
        raise SeifyError(rest[0], *rest[1]) if kind == "refused" else RuntimeError(rest[0])

    def same_buffers(self, *modules: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank. DDP sends them at each forward, but each rank's
        last forward of an epoch updates them with its own batch: validation must score one model (as timm's
        ``distribute_bn``), and the ranks' weights must be what rank 0 saves."""
        if self.enabled:
            for module in modules:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    wanted = check_device(device)
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


def busy_cores(seconds: float = 0.25) -> float:
    """How many cores other processes keep busy, sampled from /proc/stat (0 where it cannot be read)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total and idle + iowait jiffies
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def choose_threads(requested: int | None, device: torch.device, world: int,
                   recorded: int | None = None) -> tuple[int, str]:
    """(intra-op threads, why). On a CPU the cores other processes use are left to them: a thread that waits for a
    core stalls every other thread at the next barrier, which made a busy 2-core machine 10x slower. A resumed run
    keeps the count it ``recorded``: another count sums in another order, and the weights would drift."""
    if requested is not None:
        return requested, "--threads"
    if recorded is not None:
        return recorded, "as the run chose"
    cores = max(1, usable_cores() // world)
    if device.type == "cuda":
        return min(torch.get_num_threads(), cores), "default"
    busy = busy_cores()
    free = max(1, min(cores, int(usable_cores() - busy + 0.3) // world))
    why = f"{free} of {cores} cores" + (f"; about {busy:.1f} busy with other work" if busy >= 0.7 else "")
    return free, why
