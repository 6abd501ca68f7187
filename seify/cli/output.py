"""What the commands print: rich tables on a terminal, tab-separated lines in a log, one JSON or CSV document for
machines; and how a fine-tune shows its progress (bars on a terminal, plain lines in a log)."""
from __future__ import annotations

import csv
import json
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the commands import these when they run: --help stays free of torch
    from ..analyze import Analysis
    from ..api import Converted
    from ..export import Exported
    from ..finetune.loop import RunResult
    from ..fold import Folded
    from ..profile import Profile, Timing


def run_log():
    """Progress bars on a terminal, plain lines in a log."""
    from ..finetune.progress import PlainLog, RichLog
    return RichLog if sys.stdout.isatty() else PlainLog


def document(value: dict) -> None:
    print(json.dumps(value))


def one_line(text: str) -> str:
    """The first line, without terminal colour codes: an error must read the same in a log."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).strip()
    return text.splitlines()[0] if text else "unknown error"


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal, tab-separated lines in a log."""
    from rich.console import Console
    console = Console()
    if console.is_terminal:
        from rich.table import Table
        shown = Table(title=title)
        for i, c in enumerate(columns):
            shown.add_column(c, justify="left" if i == 0 else "right")
        for row in rows:
            shown.add_row(*row)
        console.print(shown)
    else:
        print(title)
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))


def _bytes(n: float) -> str:
    units = 0
    while n >= 1024 and units < 3:
        n, units = n / 1024, units + 1
    return f"{int(n)} B" if units == 0 else f"{n:.1f} {('KB', 'MB', 'GB')[units - 1]}"


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G"


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def conversion(result: Converted) -> None:
    columns = ["path", "after", "stage", "channels", "reduced_channels", "params", "compensation"]
    table(f"SE sites in {result.source.spec} ({result.placement})", columns,
          [[str(getattr(site, c)) for c in columns] for site in result.sites])
    for site in result.skipped:
        print(f"skipped {site.path}: {site.skipped}")
    print(f"parameters: {result.base_params:,} base + {result.added_params:,} SE = {result.params:,} "
          f"(+{result.added_params_percent:.2f}%) in {len(result.sites)} blocks")
    for note in result.source.notes:
        print(note)
    if result.dry_run:
        print("dry run: nothing written")
        return
    size = "x".join(map(str, result.input_size))
    print(f"function preserved: max |original - converted| = {result.max_abs_diff:.3g} on a {size} probe "
          f"(outputs up to {result.output_scale:.3g})")
    print(f"wrote {result.output} ({_bytes(result.output_bytes or 0)})")


def profile(p: Profile) -> None:
    native = p.native
    sites = [[s["path"], *([s["kind"]] if native else []), str(s["stage"]), f"{s['height']}x{s['width']}",
              str(s["channels"]), str(s["reduced_channels"]), f"{s['params']:,}", f"{s['macs']:,}"] for s in p.sites]
    table(f"{'Its own channel gates' if native else 'SE sites'} in {p.model} at {'x'.join(map(str, p.input_size))}",
          ["path", *(["gate"] if native else []), "stage", "spatial", "channels", "reduced", "params", "MACs"], sites)
    base, se = p.base, p.se
    rows = [["parameters", f"{base.params:,}", f"{se.params:,}", f"+{p.added_params:,}",
             f"+{p.added_params_percent:.2f}%"],
            ["trainable", f"{base.trainable:,}", f"{se.trainable:,}", "", ""],
            ["MACs (all counted)", _g(base.macs), _g(se.macs), f"+{p.added_macs:,}", f"+{p.added_macs_percent:.2f}%"],
            ["MACs (conv/linear only)", _g(base.conv_linear_macs), _g(se.conv_linear_macs),
             f"+{se.conv_linear_macs - base.conv_linear_macs:,}", ""]]
    for t in p.timings:
        b = t.batch_size
        rows += [[f"inference, batch {b}", _ms(t.infer_base_ms), _ms(t.infer_se_ms), f"x{t.infer_ratio:.3f}", ""],
                 [f"throughput, batch {b}", f"{t.throughput_base:.1f} img/s", f"{t.throughput_se:.1f} img/s", "",
                  ""],
                 [f"train step, batch {b}", *_train_cells(t)]]
        if t.peak_memory_base is not None and t.peak_memory_se is not None:
            rows.append([f"peak memory, batch {b}", _bytes(t.peak_memory_base), _bytes(t.peak_memory_se),
                         f"x{t.peak_memory_se / t.peak_memory_base:.3f}", ""])
    if native:
        table(f"{p.model}: every gate folded vs as it is (what its {len(p.sites)} gates cost)",
              ["", "gates folded", "as it is", "gates' share / ratio", "%"], rows)
    else:
        table(f"{p.model}: base vs SE", ["", "base", "SE", "added / ratio", "%"], rows)
    print("MACs are multiply-adds (the paper's FLOPs); 'all counted' adds SE's squeeze and scale, one MAC per "
          "element each." + (f" Timed on {p.device}, medians of interleaved runs." if p.timings else ""))


def _train_cells(t: Timing) -> list[str]:
    if t.train_ratio is None or t.train_base_ms is None or t.train_se_ms is None:
        return ["n/a", "n/a", "BatchNorm needs a batch of 2 here", ""]
    return [_ms(t.train_base_ms), _ms(t.train_se_ms), f"x{t.train_ratio:.3f}", ""]


def profiles(measured: list[Profile]) -> None:
    """Several models in one table, as in the paper's Table 2."""
    timed = bool(measured[0].timings)
    columns = ["model", "params base", "params SE", "MACs base", "MACs SE"]
    if timed:
        columns += ["latency base", "latency SE", "SE/base"]
    rows = []
    for p in measured:
        row = [p.model, f"{p.base.params / 1e6:.2f}M", f"{p.se.params / 1e6:.2f}M", _g(p.base.macs), _g(p.se.macs)]
        if timed:
            t = p.timings[0]
            row += [_ms(t.infer_base_ms), _ms(t.infer_se_ms), f"{t.infer_ratio:.3f}"]
        rows.append(row)
    table("Base vs SE (as in the paper's Table 2)", columns, rows)


def profile_csv(measured: list[Profile]) -> None:
    """One row per model and batch size."""
    rows = []
    for p in measured:
        common = {"model": p.model, "input_size": "x".join(map(str, p.input_size)),
                  "params_base": p.base.params, "params_se": p.se.params, "macs_base": p.base.macs,
                  "macs_se": p.se.macs, "conv_linear_macs_base": p.base.conv_linear_macs,
                  "conv_linear_macs_se": p.se.conv_linear_macs}
        for t in [t.to_dict() for t in p.timings] or [{}]:
            rows.append({**common, **{k: t.get(k, "") for k in (
                "batch_size", "infer_base_ms", "infer_se_ms", "infer_ratio", "train_base_ms", "train_se_ms",
                "train_ratio", "peak_memory_base", "peak_memory_se")}, "device": p.device or ""})
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def run(result: RunResult) -> None:
    """The end of a fine-tune: how it went and where everything is."""
    if result.stopped_by is not None:
        print("continue with the same command plus --resume")
        return
    if not result.epochs_run:
        return
    rows = [["best epoch", str(result.best_epoch)], ["best val top-1", f"{result.best_top1:.2f}%"],
            ["last val top-1", f"{result.last_top1:.2f}%"]]
    if result.start_top1 is not None:
        rows.insert(0, ["val top-1 before", f"{result.start_top1:.2f}%"])
    if result.skipped:
        rows.append(["unreadable files skipped", f"{len(result.skipped)} (first: {result.skipped[0]})"])
    rows += [[name, str(result.out / file)] for name, file in (
        ("best weights", "best.safetensors"), ("last weights", "last.safetensors"), ("run options", "run.json"),
        ("metrics", "metrics.csv"), ("curves", "curves.png"))]
    table("Fine-tuning done", ["", ""], rows)


def comparison(report: dict, out: str) -> None:
    def mean_std(stats: dict) -> str:
        return f"{stats['mean']:.2f}" + (f" +/- {stats['std']:.2f}" if stats["std"] is not None else "")
    tests = {v["arm"]: v["paired_test"]["pooled"]["p_value"] for v in report["verdicts"] if v["paired_test"]}
    paper = any(arm["paper"] for arm in report["arms"])
    rows = []
    for arm in report["arms"]:
        row = [arm["name"], str(len(arm["runs"])), mean_std(arm["final_top1"]), mean_std(arm["best_top1"]),
               f"{tests[arm['name']]:.2g}" if arm["name"] in tests else "",
               f"{arm['params'] / 1e6:.2f}M (+{arm['added_params']:,})",
               f"{arm['macs'] / 1e9:.4g} G (+{100 * arm['added_macs'] / arm['base_macs']:.2f}%)",
               f"{arm['trained_params']:,}" + (" (adapter)" if arm["adapter"] else ""), _size(arm["file_bytes"]),
               f"{arm['images_per_sec']:.1f}" if arm["images_per_sec"] else ""]
        if paper:
            row.append(_paper_cell(arm["paper"]))
        rows.append(row)
    columns = ["arm", "runs", "final top-1", "best top-1", f"per-image p vs {report['reference']}", "params (added)",
               "MACs (added)", "trained params", "file", "train img/s"] + \
        (["paper: ImageNet top-1/top-5 error"] if paper else [])
    table(f"{report['model']}: {report['metric']} over seeds {', '.join(map(str, report['seeds']))}", columns, rows)
    for verdict in report["verdicts"]:
        print(verdict["text"])
    if paper:
        print("paper: SE-ResNet-50 on ImageNet (Hu et al., TPAMI, Tables 10-15), beside your runs")
    skipped = report.get("skipped_files") or []
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) of DATA (first: {skipped[0]})")
    print(f"wrote {out}/compare.json, compare.csv and compare.png")


def _saved(ratio: list[float]) -> str:
    """A time saved with its spread over paired repeats, and whether it is more than this machine's noise."""
    middle, low, high = ratio
    noise = " (within the noise)" if low <= 1 <= high else ""
    return f"{100 * (1 - middle):.1f}% [{100 * (1 - high):.1f} to {100 * (1 - low):.1f}%]{noise}"


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _paper_cell(paper: dict | None) -> str:
    if not paper:
        return ""
    top5 = f"{paper['top5_error']:.2f}" if paper["top5_error"] is not None else "-"
    return f"{paper['label']}: {paper['top1_error']:.2f}/{top5}"


def evaluation(report: dict, model: str) -> None:
    classes = report["classes"]
    for note in report["notes"]:
        print(note)
    confusion = report["confusion"] or [[] for _ in classes]  # none past CONFUSION_CLASSES classes
    table(f"{model} on {report['data']} at {report['img_size']} px",
          ["class", "accuracy", *[c[:12] for c in classes if report["confusion"]]],
          [[name, f"{acc:.1f}%", *map(str, row)] for name, acc, row in
           zip(classes, report["per_class"], confusion, strict=True)])
    skipped = report["skipped"]
    print(f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}  "
          f"({report['images']} images: {report['scored']}" +
          (f"; {len(skipped)} unreadable file(s) skipped, first {skipped[0]})" if skipped else ")"))


def exported(result: Exported) -> None:
    for note in result.notes:
        print(note)
    shapes = ", ".join("x".join(map(str, shape)) for shape in result.inputs)
    print(f"checked: max |model - {result.format}| = {result.max_abs_diff:.3g} on {shapes} (outputs up to "
          f"{result.output_scale:.3g}; allowed {result.tolerance:.3g})")
    for key, value in result.details.items():
        print(f"{key}: {value}")
    for path in result.files:
        print(f"wrote {path}")


def analysis(result: Analysis) -> None:
    for note in result.notes:
        print(note)
    rows = [[s.path, str(s.stage), str(s.channels), f"{s.params:,}", f"{s.macs:,}" if s.macs is not None else "",
             f"{float(s.mean.mean()):.3f}", f"{float(s.std.mean()):.2g}", f"{s.specificity:.3g}",
             f"{100 * s.saturation:.1f}%"] for s in result.ranked()]
    table(f"SE gates of {result.model} over {result.where}, least input-dependent per parameter first",
          ["site", "stage", "channels", "params", "MACs", "mean gate", "spread", "specificity", "saturated"], rows)
    print("spread: the gates' standard deviation over images (mean over channels); specificity: how far the "
          "class means stand apart, over the spread within classes")
    for path in result.files:
        print(f"wrote {path}")


def folded(result: Folded) -> None:
    for step in result.steps:
        print(f"folded {step['path']}: top-1 {step['top1']:.2f}%, {step['params_saved']:,} parameters and "
              f"{step['macs_saved']:,} multiply-adds saved")
    if result.stopped_at is not None:
        print(f"stopped before {result.stopped_at['path']}: top-1 would be {result.stopped_at['top1']:.2f}%, more "
              f"than {result.budget:g} points below {result.top1_before:.2f}%")
    rows = [[s.path, ", ".join(sorted({p.rsplit(".", 1)[0] for p in s.into})) or "(multiplies by 1)",
             f"{s.multiplier_min:.3g}..{s.multiplier_max:.3g}",
             "constant" if s.gate_std_max is None else f"{s.gate_std_max:.2g}",
             f"{s.max_output_change:.3g}" if s.max_output_change is not None else ""] for s in result.folded]
    table(f"Gates folded in {result.model}", ["site", "into", "multiplier", "gate spread", "output change"], rows)
    for kept in result.kept:
        print(f"kept {kept['path']}: {kept['why']}")
    for note in result.notes:
        print(note)
    where = f" over {result.images}" if result.images else " on a random probe"
    print(f"{len(result.folded)} gates folded, {result.params_saved:,} parameters and {result.macs_saved:,} "
          f"multiply-adds saved; outputs change by up to {result.max_output_change:.3g}{where}")
    if result.top1_before is not None:
        print(f"top-1 {result.top1_before:.2f}% before, {result.top1_after:.2f}% after (measured on "
              f"{result.image_count} images at {result.img_size} px)")
    for runtime, ms in (result.latency or {}).items():
        if ms is None:
            print(f"{runtime}: not timed (pip install 'seify[export]' for onnxruntime)")
            continue
        print(f"{runtime}, batch 1, one thread: {ms['before']:.2f} -> {ms['after']:.2f} ms; saved "
              f"{_saved(ms['after_ratio'])}; removing every gate: {_saved(ms['every_gate_removed_ratio'])} "
              f"(medians of {ms['repeats']} paired repeats, the middle half in brackets)")
    print(f"wrote {result.output}")
