"""Which networks carry channel gates: every timm and torchvision classifier built on the meta device (no weights,
no memory) and searched by ``seify.gates.find_gates``. Prints the README's coverage table (markdown) and the
totals; ``--out FILE`` also writes it. The table is generated, never typed.

    python benchmarks/gate_coverage.py --out benchmarks/gate_coverage.md
"""
import argparse
import collections
import sys
import time
import warnings

import timm
import torch
import torchvision

from seify.gates import find_gates
from seify.models import resolve


def count(spec: str) -> tuple[int, list[str]] | None:
    """(gates, their kinds) of a model, or None where it cannot be built on the meta device."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = resolve(spec, device="meta").model
        gates = find_gates(model)
        return len(gates), sorted({g.kind for g in gates.values()})
    except Exception:  # a model timm or torchvision cannot build here: counted as not built
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    start = time.time()
    families: dict[str, list] = collections.defaultdict(list)
    failed = []
    specs = [(module, name) for module in timm.list_modules() for name in timm.list_models(module=module)] + \
        [("torchvision", f"torchvision:{n}") for n in torchvision.models.list_models(module=torchvision.models)]
    for family, spec in specs:
        counted = count(spec)
        if counted is None:
            failed.append(spec)
        else:
            families[family].append((spec, *counted))
    gated = {f: [m for m in models if m[1]] for f, models in families.items()}
    lines = ["| library / family | models with gates | gate kinds | e.g. (gates) |", "|---|---|---|---|"]
    for family in sorted(families, key=lambda f: (f == "torchvision", f)):
        if not gated[family]:
            continue
        example = min(gated[family], key=lambda m: (len(m[0]), m[0]))
        kinds = sorted({k for m in gated[family] for k in m[2]})
        lines.append(f"| {'torchvision' if family == 'torchvision' else 'timm ' + family} | "
                     f"{len(gated[family])} of {len(families[family])} | {', '.join(kinds)} | "
                     f"`{example[0]}` ({example[1]}) |")
    timm_gated = sum(len(m) for f, m in gated.items() if f != "torchvision")
    timm_built = sum(len(m) for f, m in families.items() if f != "torchvision")
    vision_gated, vision_all = len(gated.get("torchvision", [])), len(families.get("torchvision", []))
    total = (f"timm {timm.__version__}: {timm_gated} of {timm_built} models carry channel gates; torchvision "
             f"{torchvision.__version__}: {vision_gated} of {vision_all} classifiers; {len(failed)} could not be "
             f"built on the meta device here ({time.time() - start:.0f} s)")
    text = "\n".join(lines) + "\n\n" + total + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
