"""The GPU check (not part of the test suite; needs one CUDA GPU, finishes in about 5 minutes).

    PYTHONPATH=. python tests/gpu/gpu_check.py           (--smoke: a tiny run of the same code on the CPU)

1. Training step (forward, backward, SGD step) of timm resnet50, timm seresnet50 and seify's converted resnet50 on
   synthetic tensors: 224 px, bf16 autocast, channels_last, eager; images/s and ratios, measured interleaved.
2. `seify profile resnet50` on CUDA (latency, throughput, peak memory).
3. A JPEG folder written here: base vs SE fine-tuning throughput through seify's data pipeline, then a short
   `seify finetune` run that must lower the loss.
4. Step 1 again under torch.compile.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_se import models, report  # noqa: E402

from seify.demo import make_dataset  # noqa: E402
from seify.finetune import data  # noqa: E402
from seify.finetune.loop import FinetuneConfig, finetune  # noqa: E402
from seify.profile import interleaved_medians, profile  # noqa: E402

SMOKE = "--smoke" in sys.argv  # a tiny CPU run of the same code, to check the script before spending GPU time
DEVICE = "cpu" if SMOKE else "cuda"
BATCH, SIZE, PER_CLASS = (4, 64, 8) if SMOKE else (128, 224, 640)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, x, y):
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return lambda: train_step(model, opt, x, y)


def synthetic(compiled: bool, repeats: int) -> None:
    built = models(DEVICE, channels_last=True)
    names = list(built)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    steps = []
    for name in names:
        model = built[name].train()
        start = time.perf_counter()
        step = sgd_step(torch.compile(model) if compiled else model, x, y)
        step()
        sync()
        if compiled:
            print(f"  compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
        steps.append(step)
    seconds = interleaved_medians(steps, repeats, 3, sync)
    report(f"training step (fwd+bwd+SGD), bf16, channels_last, {SIZE} px, batch {BATCH}, "
           f"{'torch.compile' if compiled else 'eager'}", names, seconds)
    print("  images/s: " + ", ".join(f"{n} {BATCH / s:.0f}" for n, s in zip(names, seconds, strict=False)), flush=True)


def jpeg_folder(root: Path) -> bool:
    start = time.perf_counter()
    folder = make_dataset(root / "jpegs", train_per_class=PER_CLASS, val_per_class=PER_CLASS // 5, size=256)
    print(f"wrote {4 * (PER_CLASS + PER_CLASS // 5)} JPEGs (256 px) in {time.perf_counter() - start:.0f} s",
          flush=True)
    classes, train, _ = data.discover(folder)
    cfg = {"input_size": [3, SIZE, SIZE], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "crop_pct": 0.875}
    dataset = data.ImageDataset(train.items, data.transforms(cfg, None, training=True))
    built = models(DEVICE, channels_last=True)
    for name in ("resnet50", "seify SE"):
        model = built[name].train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        batches = data.loader(dataset, BATCH, data.EpochSampler(len(dataset), True), 0 if SMOKE else 12,
                              not SMOKE, drop_last=True)
        seen = 0
        for i, (images, labels) in enumerate(batches):
            x = images.to(DEVICE, non_blocking=True).contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, labels.to(DEVICE, non_blocking=True))
            if i == 1:  # the first steps pay for cuDNN's algorithm search and the workers' start
                sync()
                start, seen = time.perf_counter(), 0
            elif i > 1:
                seen += len(labels)
        sync()
        print(f"JPEG folder, {name}: {seen / (time.perf_counter() - start):.0f} images/s (data pipeline with 12 "
              f"workers, bf16, channels_last, forward + backward + SGD)", flush=True)
    out = root / "run"
    config = FinetuneConfig(out=str(out), epochs=4, batch_size=BATCH, lr=1e-3, backbone_lr_scale=1.0,
                            se_warmup_epochs=1, warmup_epochs=0.3, workers=0 if SMOKE else 12, log_every=0,
                            device=DEVICE, img_size=SIZE)
    result = finetune("resnet50", str(folder), config)
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(f"  epoch {r['epoch']} ({r['phase']}): train loss {r['train_loss']:.4f}, val loss {r['val_loss']:.4f}, "
              f"val top-1 {r['val_top1']:.1f}%, {r['images_per_sec']:.0f} images/s", flush=True)
    lowered = rows[-1]["train_loss"] < rows[0]["train_loss"]
    print(f"short fine-tune lowered the training loss: {lowered} (best val top-1 {result.best_top1:.1f}%)",
          flush=True)
    return lowered


def main() -> None:
    assert SMOKE or torch.cuda.is_available(), "this check needs a CUDA GPU (or --smoke for a CPU dry run)"
    torch.backends.cudnn.benchmark = True
    name = "CPU smoke run" if SMOKE else torch.cuda.get_device_name()
    print(f"GPU: {name}; torch {torch.__version__}, timm {timm.__version__}", flush=True)
    synthetic(compiled=False, repeats=2 if SMOKE else 20)
    p = profile("resnet50", input_size=(3, SIZE, SIZE), batch_sizes=(1, 64 if not SMOKE else 2), device=DEVICE,
                repeats=2 if SMOKE else 20).to_dict()
    for t in p["timings"]:
        memory = "" if t["peak_memory_base"] is None else \
            f", peak memory {t['peak_memory_base'] / 2**20:.0f} -> {t['peak_memory_se'] / 2**20:.0f} MiB"
        print(f"seify profile resnet50 --device {DEVICE}, batch {t['batch_size']}: inference "
              f"{t['infer_base_ms']:.2f} -> {t['infer_se_ms']:.2f} ms (x{t['infer_ratio']:.3f}), train step "
              f"{t['train_base_ms']:.2f} -> {t['train_se_ms']:.2f} ms (x{t['train_ratio']:.3f}){memory}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lowered = jpeg_folder(Path(tmp))
    if not SMOKE:
        synthetic(compiled=True, repeats=20)
    if not (lowered or SMOKE):
        sys.exit("FAILED: the short fine-tune did not lower the loss")


if __name__ == "__main__":
    main()
