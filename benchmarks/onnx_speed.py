"""Where SE is deployed: an exported SE-ResNet-50 against the exported plain resnet50, in onnxruntime on the CPU.

    python benchmarks/onnx_speed.py [--repeats 30] [--threads N] | tee benchmarks/onnx_speed.log

Every session is timed interleaved with the others in one process (a round of one run each, medians over the
rounds), so the ratios hold on a busy machine. Variants of the SE graph, each against the plain model under the
same exporter and optimisation level:

- seify's graph as ``seify export`` writes it: the gate's two layers as matrix products on the pooled (N, C) vector,
  scale and residual sum as one ``addcmul`` (exported as Mul and Add);
- the same with the sum left apart (``x * s`` into the block's own ``+``), the order timm's blocks compute;
- ``shortcut + s * x`` with the pooling as a GlobalAveragePool: the order of the plain block's sum;
- timm's seresnet50 with the same weights: the gate as 1x1 convolutions on the (N, C, 1, 1) map, the sum apart;
- each at onnxruntime's graph optimisation levels basic, extended and all, for the dynamo and the TorchScript
  exporters, with the number of layout conversions (ReorderInput/ReorderOutput) the runtime put in the graph.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
import torch.nn.functional as F

import seify.surgery as surgery
from seify.se import SqueezeExcite
from seify.surgery import SEOptions

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class ShortcutFirst(torch.nn.Module):
    """seify's SE-ResNet-50 whose SE blocks compute ``shortcut + s * x`` with a GlobalAveragePool squeeze."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        real = SqueezeExcite.forward
        SqueezeExcite.forward = _shortcut_first
        try:
            return self.model(x)
        finally:
            SqueezeExcite.forward = real


def _shortcut_first(self, x, shortcut=None, factor=None):
    z = self.act(F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), self.fc1.weight.flatten(1), self.fc1.bias))
    s = (self.gate(F.linear(z, self.fc2.weight.flatten(1), self.fc2.bias)) * self.scale)[:, :, None, None]
    return s * x if shortcut is None else shortcut + s * x


def models():
    """(name, model) pairs: plain resnet50 and four SE graphs with the same weights."""
    torch.manual_seed(0)
    plain = timm.create_model("resnet50").eval()
    fused = surgery.add_se(plain, SEOptions(init="paper"), (3, 224, 224)).model.eval()
    real = surgery._fuse_with_sum
    surgery._fuse_with_sum = lambda *args: False
    try:
        apart = surgery.add_se(plain, SEOptions(init="paper"), (3, 224, 224)).model.eval()
    finally:
        surgery._fuse_with_sum = real
    apart.load_state_dict(fused.state_dict())
    twin = timm.create_model("seresnet50").eval()
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for model in (apart, twin, ShortcutFirst(fused)):
            assert torch.allclose(model(x), fused(x), atol=1e-4, rtol=1e-4)  # the same function, another graph
    return [("resnet50", plain), ("seify", fused), ("seify, sum apart", apart),
            ("shortcut + s * x", ShortcutFirst(fused)), ("timm seresnet50", twin)]


def exported(model, folder, name, dynamo):
    path = os.path.join(folder, f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-{dynamo}.onnx")
    x = torch.randn(2, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


def session(path, level, threads):
    """(the session, how many layout conversions its optimised graph holds)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = path + f".{level}.onnx"
    options.log_severity_level = 3  # the runtime warns that an optimised NCHWc graph fits this machine only
    created = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
    return created, sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in nodes)


def interleaved(sessions: dict, batch: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per run of each session, one run of each per round."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    times = {name: [] for name in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(repeats):
        for name, s in sessions.items():
            feed = {s.get_inputs()[0].name: x}
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    pairs = models()
    with tempfile.TemporaryDirectory() as folder:
        for dynamo in (True, False):
            paths = {name: exported(model, folder, name, dynamo) for name, model in pairs}
            for level in LEVELS:
                built = {name: session(path, level, args.threads) for name, path in paths.items()}
                sessions = {name: s for name, (s, _) in built.items()}
                for batch in (1, 8):
                    ms = interleaved(sessions, batch, args.repeats if batch == 1 else max(5, args.repeats // 3))
                    base = ms["resnet50"]
                    cells = ", ".join(f"{name} {ms[name]:.1f} ms = {ms[name] / base:.3f}x ({built[name][1]} reorders)"
                                      for name in ms if name != "resnet50")
                    print(f"{'dynamo' if dynamo else 'torchscript'} exporter, {level:8s} batch {batch}: resnet50 "
                          f"{base:.1f} ms ({built['resnet50'][1]} reorders); {cells}", flush=True)


if __name__ == "__main__":
    main()
