"""Which device a command runs on, checked before any work is done, and what is asked of that device (not of the
current one): waiting for its queued work, its peak memory, whether it computes in bf16 natively."""
from __future__ import annotations

import contextlib

import torch

from .errors import SeifyError


def check_device(device: str | None) -> str:
    """``device``, or the default (cuda where present, else cpu); a one-line error for one that is not here."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SeifyError(f"{{device}} {device} is not a device; use cpu, cuda or cuda:N", "device") from None
    if dev.type not in ("cpu", "cuda"):
        raise SeifyError(f"{{device}} {device}: seify runs on cpu or cuda", "device")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise SeifyError(f"{{device}} {device}: there is one cpu device (cpu, or cpu:0); cuda:N names GPUs",
                         "device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SeifyError(f"{{device}} {device}: this machine has no CUDA device; use cpu", "device")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SeifyError(f"{{device}} {device}: only {torch.cuda.device_count()} CUDA device(s) here", "device")
    return device


def describe_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued work (``cuda:1`` too, whichever device is current); nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guarded(device: str | torch.device):
    """``device`` made the current CUDA device while the block runs (kernels launch on the current one)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def peak_memory(step, device: str | torch.device) -> int | None:
    """The most memory ``step()`` held on ``device`` at once, in bytes (CUDA only; None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (Ampere and newer). T4 and V100 only emulate it, slowly, yet
    ``torch.cuda.is_bf16_supported()`` says yes there."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    with guarded(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)
