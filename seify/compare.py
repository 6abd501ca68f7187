"""``seify compare``: does SE pay on my data? Arms (plain, SE, SE variants, and the controls that tell attention
from rescaling) fine-tuned under one budget, per seed.

Every arm-seed is an ordinary run folder, ``DIR/<arm>/seed-<n>``: rerunning the comparison skips finished runs
and resumes killed ones. Seeds run in turns with the arm order alternating, so drift in the machine's speed hits
every arm alike. The verdict pairs arms by seed: same data order, augmentation draws and schedule.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import read_recipe
from .counting import cost
from .device import check_device
from .errors import SeifyError
from .finetune.config import FinetuneConfig, Source
from .finetune.dist import choose_threads
from .finetune.loop import RunResult, Trainer
from .finetune.resume import given_options
from .finetune.state import RunFolder
from .gates import find_gates
from .images import folders
from .models import LoadedModel, resolve
from .options import SEOptions, parse_pairs
from .paired import mcnemar, per_image_test
from .paper import PREFIX, TABLES, figures
from .plots import comparison, save_png
from .sites import find_sites
from .surgery import split_sites
from .writes import atomic_write

REPORT, TABLE, FIGURE = "compare.json", "compare.csv", "compare.png"


@dataclass(frozen=True)
class Arm:
    """One way to fine-tune: ``plain`` (no SE), ``se`` (convert's defaults) or ``se:name=value:...``; ``scale``
    (a static scale and shift where ``se`` puts its blocks); ``probe`` (the head alone on the frozen base) and
    ``gates`` (the network's own gates and the head), adapter runs whatever the comparison's ``--adapter``."""
    name: str
    options: SEOptions | None
    given: frozenset[str] = frozenset()  # the SE options the arm names: on an SE model they must be its own
    adapter: bool = False  # an adapter run even without --adapter
    own_gates: bool = False
    table: str | None = None  # the paper's table the arm came from (--arms paper:NAME)

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_").replace(",", "-").replace("/", "-")


def parse_arms(text: str) -> list[Arm]:
    """``plain,se,se:reduction=8,se:stages=4,5``: a piece that starts with neither ``plain``, ``se`` nor
    ``paper`` continues the previous arm's value (``stages=4,5``); ``paper:NAME`` is the arms of one of the
    paper's tables (``paper:reduction`` is Table 10's: r = 2, 4, 8, 16, 32 and no SE)."""
    pieces: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if piece.split(":", 1)[0] in KINDS or not pieces:
            pieces.append(piece)
        else:
            pieces[-1] += "," + piece
    tables = {arm: table for piece in pieces for arm, table in _preset(piece)}
    pieces = [arm for piece in pieces for arm, _ in _preset(piece)]
    arms = []
    for piece in pieces:
        kind, _, rest = piece.partition(":")
        if kind in ("plain", "probe", "gates") and not rest:
            arms.append(Arm(kind, None, adapter=kind != "plain", own_gates=kind == "gates"))
        elif kind in ("se", "scale"):
            pairs = parse_pairs(rest)
            if "block" in pairs:
                raise SeifyError(f"{piece!r}: the arm's kind says its block (se or scale)", "arms")
            arms.append(Arm(piece, SEOptions(**pairs, block=kind), frozenset(pairs)))
        else:
            raise SeifyError(f"{piece!r} is not an arm; write plain, se, se:name=value[:name=value] (for example "
                             "se:reduction=8), scale[:...], probe or gates", "arms")
    arms = [dataclasses.replace(a, table=tables.get(a.name)) for a in arms]
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or len({a.folder for a in arms}) != len(arms):
        raise SeifyError(f"{{arms}} names an arm twice: {text}", "arms")
    if len(arms) < 2:
        raise SeifyError("{arms} needs at least two arms to compare, for example plain,se", "arms")
    return arms


KINDS = ("plain", "se", "scale", "probe", "gates", "paper")


def _preset(piece: str) -> list[tuple[str, str | None]]:
    """The arms a piece of --arms names, each with the paper's table it came from (None: typed by hand)."""
    if not piece.startswith(PREFIX):
        return [(piece, None)]
    table = TABLES.get(piece[len(PREFIX):])
    if table is None:
        raise SeifyError(f"{piece!r} is not one of the paper's tables; use {', '.join(PREFIX + t for t in TABLES)}",
                         "arms")
    return [(a.arm, table.name) for a in table.arms]


def compare(spec: str, data_dir: str, arms: list[Arm], config: FinetuneConfig, *, seeds: int = 3,
            weights: str | None = None, pretrained: bool = False, log=None, say=print) -> dict:
    """Fine-tune every arm with seeds ``config.seed .. config.seed + seeds - 1`` in ``config.out``/<arm>/seed-<n>,
    then write and return the comparison (``compare.json``, ``.csv``, ``.png`` in ``config.out``)."""
    if not 1 <= seeds <= 100:
        raise SeifyError(f"{{seeds}} must be from 1 to 100, not {seeds}", "seeds")
    config.check()
    root = Path(config.out)
    architecture = resolve(spec, weights=weights, device="meta")  # the arms are checked on it, nothing allocated
    size = (3, config.img_size, config.img_size) if config.img_size else \
        tuple(architecture.data_config["input_size"])
    _check_arms(architecture, arms, size)
    arms, notes = _without_twins(architecture, arms, size)
    for note in notes:
        say(note)
    split = folders.discover(data_dir, config.val_split, config.seed, config.strict_data)
    seed_list = [config.seed + k for k in range(seeds)]
    config = dataclasses.replace(config, threads=_threads(root, arms, seed_list, config))
    for k, seed in enumerate(seed_list):
        for arm in arms if k % 2 == 0 else arms[::-1]:
            say(f"--- {arm.name}, seed {seed}")
            result = _run_one(spec, data_dir, arm, seed, config, root, split, weights, pretrained, log)
            if result.stopped_by is not None:
                return {"stopped_by": result.stopped_by, "out": str(root)}
    document = summarize(root, arms, seed_list, spec)
    document["skipped_files"] = split[1].skipped + split[2].skipped
    document["notes"] = notes
    _write(root, document)
    return document


def _check_arms(loaded: LoadedModel, arms: list[Arm], size: tuple) -> None:
    """Refuse, before any run, an arm that cannot be built: blocks where the model has no site for them, its own
    gates where it has none."""
    for arm in arms:
        try:
            if arm.options is not None and not loaded.has_se:
                gm, placement, sites = find_sites(loaded.model, arm.options, size)
                split_sites(loaded.model, placement, sites, arm.options)
        except SeifyError as e:
            raise SeifyError(f"{arm.name}: {e.template}", *e.options) from e
        if arm.own_gates and not any(not gate.ours for gate in find_gates(loaded.model).values()):
            raise SeifyError(f"{arm.name}: {loaded.spec} has no channel gates of its own", "arms")


def _without_twins(loaded: LoadedModel, arms: list[Arm], size: tuple) -> tuple[list[Arm], list[str]]:
    """(the arms, what was said): an SE-3x3 arm on a model whose blocks end in their 3x3 convolution (ResNet's
    basic block) puts SE exactly where the standard arm does, and would train the same model twice: it is dropped."""
    twins = [a for a in arms if a.options is not None and a.options.variant == "3x3"]
    if not twins:
        return arms, []
    kept, notes = list(arms), []
    for arm in twins:
        assert arm.options is not None
        standard = next((a for a in arms if a.options == dataclasses.replace(arm.options, variant="standard")), None)
        if standard is None or standard.options is None:
            continue
        places = [[(s.owner, s.after) for s in find_sites(loaded.model, options, size)[2]]
                  for options in (arm.options, standard.options)]
        if places[0] == places[1]:
            kept.remove(arm)
            notes.append(f"{arm.name} puts SE where {standard.name} does in {loaded.spec} (its blocks end in their 3x3 "
                         f"convolution): the two arms would be the same model, so {arm.name} is left out")
    return kept, notes


def _threads(root: Path, arms: list[Arm], seeds: list[int], config: FinetuneConfig) -> int:
    """One thread count for every arm and seed, so that arms differ only in what they are meant to: --threads,
    else the count the comparison's first runs chose (a rerun keeps it), else seify's choice for this machine."""
    if config.threads is not None:
        return config.threads
    for arm in arms:
        for seed in seeds:
            info = RunFolder(root / arm.folder / f"seed-{seed}").read_info()
            if info and isinstance(info.get("threads"), int):
                return info["threads"]
    device = torch.device(check_device(config.device))
    return choose_threads(None, device, 1)[0]


def _run_one(spec, data_dir, arm: Arm, seed: int, config: FinetuneConfig, root: Path, split, weights, pretrained,
             log) -> RunResult:
    out = root / arm.folder / f"seed-{seed}"
    folder = RunFolder(out)
    committed = folder.committed()
    run_config = dataclasses.replace(config, out=str(out), seed=seed, resume=committed is not None,
                                     force=committed is None and bool(folder.holds_outputs()),
                                     adapter=config.adapter or arm.adapter, own_gates=arm.own_gates)
    source = Source(spec, arm.options, weights, pretrained)
    return Trainer(spec, data_dir, run_config, arm.options, weights=weights, pretrained=pretrained, log=log,
                   split=split, explicit=given_options(source, run_config) | arm.given).run()


# ---------------------------------------------------------------- the comparison


def _run_record(out: Path) -> dict | None:
    folder = RunFolder(out)
    committed = folder.committed()
    if committed is None:
        return None
    state, rows = folder.read(committed)
    trained = [r for r in rows if r["epoch"] > 0]
    if not trained:
        return None
    # Step time is compared where every layer trains, or an adapter all run: a warm-up with a frozen backbone is
    # cheaper per step, and one arm may warm up (new SE blocks) where the other does not (a kept head), so warm-ups
    # are not compared.
    full = [r for r in trained if r["phase"] in ("full", "adapter")]
    full_seconds = sum(r["seconds"] for r in full)
    start = next((r["val_top1"] for r in rows if r["epoch"] == 0), None)
    return {"seed": state["config"]["seed"], "folder": str(out), "epochs": [r["epoch"] for r in rows],
            "val_top1": [r["val_top1"] for r in rows], "best_top1": max(r["val_top1"] for r in trained),
            "final_top1": trained[-1]["val_top1"], "start_top1": start,
            "seconds": sum(r["seconds"] for r in trained),
            "images_per_sec": sum(r["images_per_sec"] * r["seconds"] for r in full) / full_seconds
            if full_seconds else None,
            "complete": state["progress"]["epoch"] >= state["config"]["epochs"],
            "val_correct": state["progress"].get("val_correct") or None}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def _arm_cost(runs: list[dict]) -> dict:
    """Parameters and MACs of the arm's model and of the model without SE, at the size it was trained at; what
    trained and the size of its files."""
    last = Path(runs[0]["folder"]) / "last.safetensors"
    loaded = resolve(str(last), device="meta")
    size = tuple(loaded.data_config["input_size"])
    own, _ = cost(loaded.model, size)
    base, _ = cost(loaded.base, size) if loaded.base is not None else (own, None)
    adapter = (read_recipe(last) or {}).get("adapter")
    trains = set(adapter["trains"]) if adapter else set()
    trained = own.params if adapter is None else sum(p.numel() for n, p in loaded.model.named_parameters()
                                                      if n in trains)
    return {"img_size": size[-1], "params": own.params, "macs": own.macs, "base_params": base.params,
            "base_macs": base.macs, "added_params": own.params - base.params, "added_macs": own.macs - base.macs,
            "trained_params": trained, "adapter": adapter is not None,
            "file_bytes": (Path(runs[0]["folder"]) / "best.safetensors").stat().st_size}


def summarize(root: Path, arms: list[Arm], seeds: list[int], spec: str) -> dict:
    """The comparison document of the runs under ``root``: per arm its runs, statistics and cost; verdicts."""
    summary = []
    for arm in arms:
        runs = [r for r in (_run_record(root / arm.folder / f"seed-{s}") for s in seeds) if r is not None]
        if not runs:
            raise SeifyError(f"no finished epoch for arm {arm.name} in {root}; run the comparison first")
        rates = [r["images_per_sec"] for r in runs if r["images_per_sec"]]
        summary.append({"name": arm.name, "folder": arm.folder, "table": arm.table,
                        "options": arm.options.to_dict() if arm.options else None, "runs": runs,
                        "final_top1": _stats([r["final_top1"] for r in runs]),
                        "best_top1": _stats([r["best_top1"] for r in runs]),
                        "images_per_sec": statistics.median(rates) if rates else None,
                        **_arm_cost(runs)})
    reference = next((a for a in summary if a["options"] is None), None) or \
        next((a for a in summary if a["name"] == "se"), summary[0])
    verdicts = [_verdict(arm, reference) for arm in summary if arm is not reference]
    for entry in summary:  # the per-image record served the test; the document keeps its counts
        for run in entry["runs"]:
            run.pop("val_correct")
        paper = figures(entry["name"], entry.pop("table"))
        entry["paper"] = asdict(paper) if paper else None
    return {"model": spec, "seeds": seeds, "metric": "final val top-1 (%)", "reference": reference["name"],
            "arms": summary, "verdicts": verdicts}


def _paired(arm: dict, reference: dict, seeds: list[int]) -> dict | None:
    """McNemar's test per seed, and pooled over seeds with the image as the unit (``per_image_test``), on the
    validation images both arms' final models judged."""
    ours = {r["seed"]: r.get("val_correct") for r in arm["runs"]}
    theirs = {r["seed"]: r.get("val_correct") for r in reference["runs"]}
    per_seed, counts = [], None
    for seed in seeds:
        a, b = theirs.get(seed), ours.get(seed)
        if not a or not b or len(a) != len(b):
            return None  # a run from before seify recorded its predictions, or other images
        only_reference = sum(x and not y for x, y in zip(a, b, strict=True))
        only_arm = sum(y and not x for x, y in zip(a, b, strict=True))
        per_seed.append({"seed": seed, "only_reference": only_reference, "only_arm": only_arm,
                         "p_value": mcnemar(only_reference, only_arm)})
        step = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
        counts = step if counts is None else [c + d for c, d in zip(counts, step, strict=True)]
    if counts is None:
        return None
    return {"per_seed": per_seed, "pooled": {"images": len(counts), "reference_ahead": sum(d < 0 for d in counts),
                                             "arm_ahead": sum(d > 0 for d in counts),
                                             "p_value": per_image_test(counts)}}


SIGNIFICANCE = 0.05


def _verdict(arm: dict, reference: dict) -> dict:
    """The paired difference in final top-1 over the seeds both arms finished, McNemar's test on the same images,
    and the step-time ratio. The words "better" and "worse" are kept for what the test can tell."""
    ours = {r["seed"]: r["final_top1"] for r in arm["runs"] if r["complete"]}
    theirs = {r["seed"]: r["final_top1"] for r in reference["runs"] if r["complete"]}
    seeds = sorted(set(ours) & set(theirs))
    diffs = [ours[s] - theirs[s] for s in seeds]
    stats = _stats(diffs)
    ratio = reference["images_per_sec"] / arm["images_per_sec"] \
        if arm["images_per_sec"] and reference["images_per_sec"] else None
    higher = sum(d > 0 for d in diffs)
    paired = _paired(arm, reference, seeds)
    name, against = arm["name"], reference["name"]
    if diffs:
        spread = f" +/- {stats['std']:.1f}" if stats["std"] is not None else ""
        text = (f"{name}: {stats['mean']:+.1f}{spread} points over {against} (higher in {higher} of {len(diffs)} "
                f"seed{'s' if len(diffs) > 1 else ''})")
    else:
        text = f"{name}: no seed finished in both it and {against} yet"
    if paired is not None:
        pooled = paired["pooled"]
        tells = pooled["p_value"] < SIGNIFICANCE
        judged = (f"{name} is {'better' if pooled['arm_ahead'] > pooled['reference_ahead'] else 'worse'}" if tells
                  else "the test cannot tell them apart")
        text += (f"; of {pooled['images']} images {against} was right in more seeds on {pooled['reference_ahead']} "
                 f"and {name} on {pooled['arm_ahead']} (per-image test p = {pooled['p_value']:.2g}): {judged}")
    if ratio is not None:
        text += f"; {ratio:.2f}x step time"
    else:  # e.g. --epochs 1 with a warm-up: one arm trained its new parts only, the other everything
        text += "; step time not comparable (no epoch in which both trained every layer)"
    return {"arm": name, "against": against, "seeds": seeds, "differences": diffs,
            "mean_difference": stats["mean"], "std_difference": stats["std"], "higher_in": higher,
            "paired_test": paired, "step_time_ratio": ratio, "text": text}


def _write(root: Path, document: dict) -> None:
    def table(tmp):
        buf = io.StringIO()
        run_columns = ["seed", "final_top1", "best_top1", "start_top1", "seconds", "images_per_sec", "complete",
                       "folder"]
        # the arm's model: the same for every seed
        arm_columns = ["params", "macs", "added_params", "added_macs", "trained_params", "file_bytes"]
        writer = csv.DictWriter(buf, fieldnames=["arm", *run_columns, *arm_columns], extrasaction="ignore")
        writer.writeheader()
        for arm in document["arms"]:
            for run in arm["runs"]:
                writer.writerow({"arm": arm["name"], **{k: run[k] for k in run_columns},
                                 **{k: arm[k] for k in arm_columns}})
        Path(tmp).write_text(buf.getvalue())

    def figure(tmp):
        save_png(comparison(document["arms"]), tmp)
    atomic_write(root / REPORT, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n"), force=True)
    atomic_write(root / TABLE, table, force=True)
    atomic_write(root / FIGURE, figure, force=True)
