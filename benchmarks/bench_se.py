"""Benchmark: seify's converted resnet50 against timm's resnet50 and timm's own seresnet50.

Run: python benchmarks/bench_se.py [--device cpu|cuda] [--quick]
Measures in one process, the three models interleaved (seify.profile.interleaved_medians), and prints medians and
ratios: inference at 224 px (batch 1 and 8), a training step (forward + backward) at batch 8 and 128 px, and, on
CUDA, a bf16 channels_last training step at 224 px, eager and torch.compile'd. Also times `seify --help` and
`seify convert resnet50 --dry-run` against `import timm; timm.create_model('seresnet50')`.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import timm
import torch

import seify
from seify.surgery import SEOptions
from seify.surgery import add_se as convert
from seify.timing import interleaved_medians


def models(device, channels_last=False):
    base = timm.create_model("resnet50").eval()
    twin = timm.create_model("seresnet50").eval()
    ours = convert(base, SEOptions(), (3, 224, 224)).model
    built = {"resnet50": base, "timm seresnet50": twin, "seify SE": ours}
    for m in built.values():
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    return built


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def infer_fn(model, x):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def train_fn(model, x, dtype=None):
    def run():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
    return run


def report(title, names, seconds):
    base = dict(zip(names, seconds, strict=False))
    print(f"{title}")
    for name, s in zip(names, seconds, strict=False):
        print(f"  {name:16s} {1000 * s:8.2f} ms")
    print(f"  ratios: seify/seresnet50 {base['seify SE'] / base['timm seresnet50']:.3f}, "
          f"seify/resnet50 {base['seify SE'] / base['resnet50']:.3f}, "
          f"seresnet50/resnet50 {base['timm seresnet50'] / base['resnet50']:.3f}", flush=True)


def bench_cpu(repeats):
    built = models("cpu")
    names = list(built)
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        report(f"CPU inference, fp32, 224 px, batch {batch} ({torch.get_num_threads()} threads)", names,
               interleaved_medians([infer_fn(built[n], x) for n in names], repeats, 3, lambda: None))
    x = torch.randn(8, 3, 128, 128)
    for m in built.values():
        m.train()
    report("CPU training step, fp32, 128 px, batch 8", names,
           interleaved_medians([train_fn(built[n], x) for n in names], max(5, repeats // 2), 2, lambda: None))


def bench_gpu(repeats, batch):
    print(f"GPU: {torch.cuda.get_device_name()}")
    for compiled in (False, True):
        built = models("cuda", channels_last=True)
        names = list(built)
        for m in built.values():
            m.train()
        runs = {n: (torch.compile(m) if compiled else m) for n, m in built.items()}
        x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        fns = [train_fn(runs[n], x, torch.bfloat16) for n in names]
        seconds = interleaved_medians(fns, repeats, 5 if compiled else 3, torch.cuda.synchronize)
        report(f"GPU training step, bf16, channels_last, 224 px, batch {batch}, "
               f"{'torch.compile' if compiled else 'eager'}", names, seconds)
        print("  throughput: " + ", ".join(f"{n} {batch / s:.0f} img/s" for n, s in zip(names, seconds, strict=False)))


def wall(cmd, n=3):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_cli():
    help_s = wall(["seify", "--help"], 5)
    dry = wall(["seify", "convert", "resnet50", "--dry-run"])
    timm_s = wall([sys.executable, "-c", "import timm; timm.create_model('seresnet50')"])
    print(f"CLI: seify --help {help_s:.2f} s; seify convert resnet50 --dry-run {dry:.2f} s; "
          f"timm create seresnet50 {timm_s:.2f} s; ratio {dry / timm_s:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="GPU training batch")
    parser.add_argument("--no-cli", action="store_true")
    args = parser.parse_args()
    print(f"seify {seify.__version__}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{platform.processor() or platform.machine()}")
    if args.device == "cpu":
        bench_cpu(args.repeats)
    else:
        bench_gpu(args.repeats, args.batch)
    if not args.no_cli:
        bench_cli()


if __name__ == "__main__":
    main()
