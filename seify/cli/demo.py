"""``seify demo``: the whole job on data it draws itself (``seify.images.synthetic``), with nothing downloaded.

A tour of the commands, so it lives with the CLI, the one layer that calls them: a resnet18 is converted,
profiled, fine-tuned and evaluated, in a new temporary folder unless ``out`` names one.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..api import convert, save
from ..errors import SeifyError
from ..finetune.config import FinetuneConfig
from ..finetune.loop import finetune
from ..images.scoring import evaluate_folder
from ..images.synthetic import CLASSES, make_dataset
from ..profile import profile


def run(out: str | Path | None = None, epochs: int = 5, force: bool = False, log=None, size: int = 64,
        train_per_class: int = 160) -> dict:
    """Draw data, convert, profile, fine-tune and evaluate; returns the figures and where everything is."""
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="seify-demo-"))
    if out.exists() and any(out.iterdir()) and not force:
        raise SeifyError(f"{out} is not empty; pass {{force}} to replace the demo there or choose {{out}}", "force",
                         "out")
    start = time.perf_counter()
    data = make_dataset(out / "data", train_per_class=train_per_class, val_per_class=train_per_class // 4, size=size)
    print(f"drew {len(CLASSES)} classes of textures in {data} (train and val, {size} px JPEGs)")
    result = convert("resnet18", input_size=(3, size, size))
    converted = save(result, out / "resnet18-se.safetensors", force=True)
    print(f"converted resnet18 (random weights): {len(result.sites)} SE blocks, +{result.added_params:,} parameters, "
        f"max output change {result.max_abs_diff:.3g} -> {converted}")
    cost = profile(str(converted), batch_sizes=(1,), device="cpu", repeats=5, warmup=2)
    timing = cost.timings[0]
    print(f"profiled: +{cost.added_macs_percent:.2f}% MACs, CPU inference x{timing.infer_ratio:.2f} "
        f"and training step x{timing.train_ratio or float('nan'):.2f} of the base model")
    config = FinetuneConfig(out=str(out / "run"), epochs=epochs, batch_size=32, lr=2e-3, img_size=size,
                            device="cpu", log_every=0, force=True)
    run_result = finetune(str(converted), str(data), config, log=log)
    metrics = evaluate_folder(str(out / "run" / "best.safetensors"), str(data / "val"), device="cpu", workers=2)
    seconds = time.perf_counter() - start
    print(f"evaluated {out / 'run' / 'best.safetensors'}: top-1 {metrics['top1']:.1f}% on {metrics['images']} "
        f"validation images")
    artifacts = {"data": str(data), "converted": str(converted), "run": str(out / "run"),
                 "best": str(out / "run" / "best.safetensors"), "curves": str(out / "run" / "curves.png"),
                 "metrics": str(out / "run" / "metrics.csv")}
    for name, path in artifacts.items():
        print(f"  {name:10s} {path}")
    print(f"demo finished in {seconds:.0f} s with {metrics['top1']:.1f}% validation top-1")
    return {"top1": metrics["top1"], "seconds": seconds, "best_epoch": run_result.best_epoch, **artifacts}
