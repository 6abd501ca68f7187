"""The paths only a GPU walks, checked in one run of a few minutes, for the day a GPU is lent (issue 31):

1. the precision seify picks here (bf16 only where the GPU computes it natively, else fp16 with a grad scaler);
2. timing another GPU: ``cuda:1`` synchronised, its peak memory read, while cuda:0 stays current (two GPUs only);
3. the Triton SE kernels, forward and backward, against the PyTorch path: NCHW and channels_last, bf16, and a map
   large enough that a sample's offset passes 2**31 elements (64-bit indices), and on cuda:1 from cuda:0;
4. `seify finetune --decode gpu` against `--decode cpu` on a JPEG folder: the same run, images/s of each;
5. an adapter run against a full fine-tune: step time and peak memory;
6. two ranks over NCCL with --force over a finished run (two GPUs only).

    PYTHONPATH=. python benchmarks/gpu_paths.py | tee benchmarks/gpu_paths_<gpu>.log
    PYTHONPATH=. python benchmarks/gpu_paths.py --smoke     (the same code, tiny, on the CPU: checks the script)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

from seify import kernels  # noqa: E402
from seify.device import native_bf16, peak_memory, synchronize  # noqa: E402
from seify.finetune.build import precision  # noqa: E402
from seify.finetune.config import FinetuneConfig  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
GPUS = 0 if SMOKE else torch.cuda.device_count()


def say(text: str) -> None:
    print(text, flush=True)


def check_precision() -> None:
    device = torch.device(DEVICE)
    name = torch.cuda.get_device_name(device) if DEVICE == "cuda" else "cpu"
    chosen = precision(FinetuneConfig(), device)
    say(f"1. {name}: native bf16 {native_bf16(device)}; seify finetune picks {chosen.name}"
        f"{' with a grad scaler' if chosen.scaler is not None else ''}")


def check_second_gpu() -> None:
    if GPUS < 2:
        say("2. cuda:1 timing: skipped (one GPU here)")
        return
    torch.cuda.set_device(0)
    x = torch.randn(4096, 4096, device="cuda:1")
    start = time.perf_counter()
    for _ in range(20):
        x = x @ x / 64
    synchronize("cuda:1")
    waited = time.perf_counter() - start
    memory = peak_memory(lambda: x @ x, "cuda:1")
    say(f"2. cuda:1: 20 matmuls timed {1000 * waited:.1f} ms with cuda:0 current (synchronised, not launch time); "
        f"peak memory {memory / 2**20:.0f} MiB; current device still {torch.cuda.current_device()}")


def se_site(x: torch.Tensor, block, shortcut: torch.Tensor, active: bool):
    """(output, gradient of x, of fc1's weight) of one SE site with the Triton path on or off."""
    kernels.use(active)
    x = x.detach().requires_grad_()
    block.zero_grad()
    out = block(x, shortcut)
    out.float().square().mean().backward()
    kernels.use(False)
    return out.detach().float(), x.grad.float(), block.fc1.weight.grad.float()


def check_kernels() -> None:
    from seify.se import SqueezeExcite
    if not kernels.use(True):
        say("3. kernels: Triton is missing")
        return
    kernels.use(False)
    shapes = [(2, 32, 8)] if SMOKE else [(128, 256, 56), (64, 2048, 128)]  # the second: 2**31+ elements per map
    devices = [DEVICE] + (["cuda:1"] if GPUS >= 2 else [])
    for device in devices:
        for n, c, h in shapes:
            for fmt in (torch.contiguous_format, torch.channels_last):
                dtype = torch.float32 if SMOKE else torch.bfloat16
                block = SqueezeExcite(c, max(8, c // 16)).to(device)
                with torch.no_grad():
                    block.fc2.weight.normal_(0, 0.1)
                x = torch.randn(n, c, h, h, device=device, dtype=dtype).to(memory_format=fmt)
                shortcut = torch.randn_like(x)
                with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                    ours, theirs = se_site(x, block, shortcut, True), se_site(x, block, shortcut, False)
                worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                            for a, b in zip(ours, theirs, strict=True))
                say(f"3. kernels on {device}, {n}x{c}x{h}x{h} {str(dtype)[6:]} "
                    f"{'channels_last' if fmt == torch.channels_last else 'NCHW'}: output and gradients within "
                    f"{worst:.2g} of the PyTorch path ({x.numel() * 1.0:.3g} elements)")
                del x, shortcut


def seify_run(args: list[str]) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "seify", *args], capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def images_per_sec(out: Path) -> float:
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["images_per_sec"] for r in rows if r["epoch"] > 0)


def check_decode_and_adapter(work: Path) -> None:
    from seify.images.synthetic import make_dataset
    data = make_dataset(work / "data", train_per_class=16 if SMOKE else 256, val_per_class=4 if SMOKE else 32,
                        size=64 if SMOKE else 256)  # JPEG files
    import timm
    from safetensors.torch import save_model
    model, size = ("test_resnet", "64") if SMOKE else ("resnet50", "224")
    weights = work / "weights.safetensors"  # the lent machine reaches no hub: random weights stand for trained ones
    save_model(timm.create_model(model), str(weights))
    common = ["--epochs", "1", "--img-size", size, "--batch-size", "8" if SMOKE else "128", "--device", DEVICE,
              "--log-every", "0", "--weights", str(weights)]
    rates = {}
    for decode in (["cpu"] if SMOKE else ["cpu", "gpu"]):
        code, text = seify_run(["finetune", model, str(data), *common, "--decode", decode, "--out",
                                str(work / decode), "--force"])
        rates[decode] = images_per_sec(work / decode) if code == 0 else None
        if code:
            say(f"4. --decode {decode} failed: {text[-800:]}")
    say(f"4. seify finetune {model} images/s: " + ", ".join(f"--decode {k} {v:.0f}" for k, v in rates.items() if v))
    steps = {}
    for adapter in (False, True):
        out = work / f"adapter-{adapter}"
        code, text = seify_run(["finetune", model, str(data), *common, "--out", str(out), "--force",
                                *(["--adapter"] if adapter else []), "--se-warmup-epochs", "0"])
        steps[adapter] = images_per_sec(out) if code == 0 else None
        if code:
            say(f"5. adapter {adapter} failed: {text[-800:]}")
    if steps[False] and steps[True]:
        say(f"5. adapter run {steps[True]:.0f} images/s, full fine-tune {steps[False]:.0f}: "
            f"{steps[True] / steps[False]:.2f}x")


def check_two_ranks(work: Path) -> None:
    if GPUS < 2:
        say("6. two NCCL ranks: skipped (one GPU here)")
        return
    from seify.images.synthetic import make_dataset
    data = make_dataset(work / "ranks", train_per_class=32, val_per_class=8, size=64)
    common = ["test_resnet", str(data), "--epochs", "1", "--img-size", "64", "--batch-size", "8", "--out",
              str(work / "ddp")]
    seify_run(["finetune", *common, "--device", "cuda"])
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "seify",
                          "finetune", *common, "--force"], capture_output=True, text=True, timeout=240)
    say(f"6. two NCCL ranks, --force over a finished run: exit {run.returncode} in {time.perf_counter() - start:.0f} s"
        + ("" if run.returncode == 0 else f": {run.stderr[-800:]}"))


def main() -> None:
    say(f"torch {torch.__version__}, {GPUS} GPU(s)" + (": smoke run on the CPU" if SMOKE else ""))
    check_precision()
    check_second_gpu()
    check_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        check_decode_and_adapter(Path(tmp))
        check_two_ranks(Path(tmp))


if __name__ == "__main__":
    main()
