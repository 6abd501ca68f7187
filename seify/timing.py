"""Timing models against each other: medians of interleaved runs in one process, eager and in onnxruntime, so that
drift and load hit every model alike. Ratios from one run are what seify reports."""
from __future__ import annotations

import functools
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .device import synchronize


def synchronizer(device: str):
    """What waits for the device's queued work: that device's, whichever is current (nothing on a CPU)."""
    return functools.partial(synchronize, device)


def interleaved_medians(fns, repeats: int, warmup: int, sync) -> list[float]:
    """Median seconds of each function, run in turns (order alternating) so drift hits all alike."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats, warmup, sync)]


def interleaved_times(fns, repeats: int, warmup: int, sync) -> list[list[float]]:
    """Seconds of each function at each repeat, run in turns (order alternating): repeat r of one function is
    paired with repeat r of the others, so the ratio of a pair is free of the drift between repeats."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            start = time.perf_counter()
            fns[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return times


def inference_ms(models: list[nn.Module], input_size, batch_size: int = 1, repeats: int = 30, warmup: int = 5,
                 threads: int = 1) -> list[list[float]]:
    """Eager inference milliseconds of each model at each repeat, on the CPU with ``threads`` threads,
    interleaved."""
    x = torch.randn((batch_size, *input_size))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [inference(m.eval().cpu(), x) for m in models]
        return [[1000 * t for t in times] for times in interleaved_times(runs, repeats, warmup, lambda: None)]
    finally:
        torch.set_num_threads(before)


def onnxruntime_ms(models: list[nn.Module], input_size, batch_size: int = 1, repeats: int = 30, warmup: int = 5,
                   threads: int = 1) -> list[list[float]] | None:
    """The same in onnxruntime (the TorchScript-based exporter, all optimisations), or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = torch.randn((batch_size, *input_size))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    with tempfile.TemporaryDirectory() as folder:
        sessions = []
        for k, model in enumerate(models):
            path = str(Path(folder) / f"m{k}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.eval().cpu(), (x,), path, dynamo=False, input_names=["input"])
            sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
        feed = {"input": x.numpy()}
        runs = [lambda s=s: s.run(None, feed) for s in sessions]
        return [[1000 * t for t in times] for times in interleaved_times(runs, repeats, warmup, lambda: None)]


def paired_change(before: list[float], after: list[float]) -> tuple[float, float, float]:
    """The median of ``after / before`` over paired repeats and its quartiles: (median, low, high)."""
    ratios = sorted(a / b for a, b in zip(after, before, strict=True))
    low, middle, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return middle, low, high


def inference(model: nn.Module, x: torch.Tensor):
    """One eager forward of ``model`` on ``x``, without autograd."""
    def run():
        with torch.inference_mode():
            model(x)
    return run
