"""Which device a command runs on, checked before any work is done."""
from __future__ import annotations

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
