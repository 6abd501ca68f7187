"""What SE learned on real small data: scikit-learn's handwritten digits at 32 px, the paper's Sec. 7.2 there.

    pip install scikit-learn
    python benchmarks/what_se_learned.py --out /tmp/seify-digits | tee benchmarks/what_se_learned.log

Fine-tunes resnet18 with SE from random weights (SE trains from the first step), then runs ``seify analyze`` on
the validation digits and ``seify fold`` with them, and copies the two pictures beside this script (the README
shows them): ``what_se_learned_excitations.png`` (the paper's Fig. 6 for the digits) and
``what_se_learned_summary.png`` (class specificity and saturation against depth).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_small_data import make_digits  # noqa: E402

from seify.analyze import analyze  # noqa: E402
from seify.errors import SeifyError  # noqa: E402
from seify.finetune.config import FinetuneConfig  # noqa: E402
from seify.finetune.loop import finetune  # noqa: E402
from seify.finetune.progress import SilentLog  # noqa: E402
from seify.fold import fold  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/seify-digits")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = make_digits(out / "data")
    run = finetune("resnet18", str(data), FinetuneConfig(out=str(out / "run"), epochs=args.epochs, batch_size=64,
                                                         img_size=32, device="cpu", log_every=0), log=SilentLog)
    print(f"resnet18 with SE from random weights, {args.epochs} epochs at 32 px: best val top-1 "
          f"{run.best_top1:.2f}% (epoch {run.best_epoch})")
    best = str(out / "run" / "best.safetensors")
    result = analyze(best, str(data), out=out / "analysis")
    print(f"analyze over {result.where}:")
    print("site\tstage\tchannels\tparams\tmean gate\tspread\tspecificity\tsaturated")
    for s in result.sites:
        print(f"{s.path}\t{s.stage}\t{s.channels}\t{s.params}\t{float(s.mean.mean()):.3f}\t{float(s.std.mean()):.3f}"
              f"\t{s.specificity:.3f}\t{100 * s.saturation:.1f}%")
    for threshold in (0.02, 0.05, 0.1):
        try:
            folded = fold(best, out / f"folded-{threshold}.safetensors", str(data), max_gate_std=threshold,
                          max_images=None)
        except SeifyError as e:
            print(f"fold --max-gate-std {threshold}: {e}")
            continue
        print(f"fold --max-gate-std {threshold}: {len(folded.folded)} of {len(result.sites)} blocks "
              f"({', '.join(s.path for s in folded.folded)}), {folded.params_saved:,} parameters saved, top-1 "
              f"{folded.top1_before:.2f}% -> {folded.top1_after:.2f}%, outputs change by up to "
              f"{folded.max_output_change:.3g}")
    for name in ("excitations", "summary"):
        shutil.copyfile(out / "analysis" / f"{name}.png", HERE / f"what_se_learned_{name}.png")
    print(f"pictures: {HERE / 'what_se_learned_excitations.png'}, {HERE / 'what_se_learned_summary.png'}")


if __name__ == "__main__":
    main()
