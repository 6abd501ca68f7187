"""fold within a top-1 budget on networks that ship their own SE gates: how many gates go, what they cost, the
top-1 measured before and after, and the latency won, in one run.

    pip install scikit-learn
    python benchmarks/fold_budget.py | tee benchmarks/fold_budget.log

No pretrained checkpoint is reachable here, so each network is first fine-tuned from random weights on
scikit-learn's handwritten digits at 32 px (``seify finetune --no-se``: the plain network, its own gates kept).
Then ``seify fold best.safetensors DATA --max-top1-drop 0.5`` on the digits' held-out split. Latency: batch 1, one
thread, eager and onnxruntime, each model timed in turns with the folded one and with every gate removed (the
limit), at the 32 px it was trained at and at 224 px (where the issue's figures are).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_small_data import make_digits  # noqa: E402

import seify  # noqa: E402
from seify.finetune.config import FinetuneConfig  # noqa: E402
from seify.finetune.loop import finetune  # noqa: E402
from seify.finetune.progress import SilentLog  # noqa: E402
from seify.fold import fold  # noqa: E402
from seify.gates import find_gates, without_any_gate  # noqa: E402
from seify.timing import inference_ms, onnxruntime_ms  # noqa: E402

# torchvision's MobileNetV3 is left out: its BatchNorm momentum of 0.01 leaves the running statistics near their
# start after the few hundred steps run here, so it scores chance (10%) in eval mode and has no top-1 to keep
NETWORKS = ["mobilenetv3_small_100", "efficientnet_b0", "regnety_002", "seresnet18"]


def saved(ms: list[float] | None) -> str:
    if ms is None:
        return "n/a"
    return f"{100 * (1 - ms[1] / ms[0]):.1f}% of {100 * (1 - ms[2] / ms[0]):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/seify-fold-budget")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = make_digits(out / "data")
    print(f"digits at 32 px, {args.epochs} epochs from random weights (lr {args.lr:g}), then fold --max-top1-drop "
          f"{args.budget} on the 360 held-out digits; latency: batch 1, one thread, 'saved' is before -> after of "
          "the limit (every gate removed)")
    print("network\tgates folded\tparams saved\tMACs saved\ttop-1 before\ttop-1 after\teager 32px\tonnxruntime 32px"
          "\teager 224px\tonnxruntime 224px")
    for spec in args.networks.split(","):
        run = out / spec.replace(":", "_")
        config = FinetuneConfig(out=str(run), epochs=args.epochs, batch_size=64, img_size=32, device="cpu",
                                log_every=0, lr=args.lr)
        finetune(spec, str(data), config, options=None, log=SilentLog)
        best = str(run / "best.safetensors")
        result = fold(best, run / "folded.safetensors", str(data), max_top1_drop=args.budget, max_images=None,
                      latency=True)
        model = seify.load(best)
        limit = without_any_gate(model, find_gates(model))
        models = [model, result.module, limit]
        big = [None if times is None else [statistics.median(t) for t in times]
               for times in (inference_ms(models, (3, 224, 224), repeats=20),
                             onnxruntime_ms(models, (3, 224, 224), repeats=20))]
        small = [[ms[k] for k in ("before", "after", "every_gate_removed")] if ms else None
                 for ms in (result.latency or {}).values()]
        print(f"{spec}\t{len(result.folded)} of {len(result.folded) + len(result.kept)}\t{result.params_saved:,}\t"
              f"{result.macs_saved:,}\t{result.top1_before:.2f}%\t{result.top1_after:.2f}%\t{saved(small[0])}\t"
              f"{saved(small[1])}\t{saved(big[0])}\t{saved(big[1])}", flush=True)


if __name__ == "__main__":
    main()
