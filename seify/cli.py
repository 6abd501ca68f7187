"""The ``seify`` command: arguments, output and exit codes over the Python API (no torch import at start-up)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import __version__
from .errors import SeifyError, first_line
from .finetune.config import FinetuneConfig
from .options import SEOptions, parse_value

if TYPE_CHECKING:  # the commands import these when they run: --help stays free of torch
    from .api import Converted
    from .profile import Profile, Timing

app = typer.Typer(
    help="Add Squeeze-and-Excitation blocks to trained PyTorch CNNs without losing their accuracy.\n\n"
         "Example: seify convert resnet50 --weights resnet50.safetensors -o resnet50-se.safetensors",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None, add_completion=False)
_state = {"debug": False}


def _version(value: bool):
    if value:
        typer.echo(f"seify {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (also after the "
                                                              "command).")] = False):
    _state["debug"] = _state["debug"] or debug


# ---------------------------------------------------------------- flags declared once, from the dataclasses

_CLI_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "str | None": Optional[str],
              "int | None": Optional[int], "float | None": Optional[float], "bool | None": Optional[bool],
              "tuple[int, ...] | None": Optional[str], "tuple[float, float] | None": Optional[str]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parameter(f: dataclasses.Field, default_owner) -> inspect.Parameter:
    kind = _CLI_TYPES[str(f.type)]
    flags = f.metadata.get("flags") or ((_flag(f.name),) if str(f.type) == "bool" else ())
    default = getattr(default_owner, f.name)
    if str(f.type).startswith("tuple") and default is not None:
        default = ",".join(map(str, default))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, typer.Option(*flags, help=f.metadata["help"])])


def _from_text(cls, name: str, value):
    """A flag's value in the dataclass's own type: comma lists become tuples."""
    if not isinstance(value, str):
        return value
    if name == "crop_scale":
        return _floats(value, name, 2)
    return parse_value(name, value) if cls is SEOptions else value


def with_options(cls, into: str, skip: tuple[str, ...] = ()):
    """Add ``cls``'s fields to a command as flags; the command gets ``into`` = (instance, names passed)."""
    names = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        wants_context = "ctx" in signature.parameters

        @functools.wraps(func)
        def wrapper(**kwargs):
            ctx = kwargs["ctx"] if wants_context else kwargs.pop("ctx")
            values = {f.name: _from_text(cls, f.name, kwargs.pop(f.name)) for f in names}
            return func(**kwargs, **{into: (cls(**values), passed(ctx, [f.name for f in names]))})
        params = [p for p in signature.parameters.values() if p.name != into]
        if not wants_context:
            params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
        wrapper.__signature__ = signature.replace(parameters=params + [_parameter(f, cls()) for f in names])
        return wrapper
    return decorate


def passed(ctx: typer.Context, names) -> set[str]:
    """The options among ``names`` that the user wrote on the command line."""
    return {name for name in names if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}


# Options shared by several commands.
Model = Annotated[str, typer.Argument(help="timm name (resnet50, resnet50.a1_in1k, hf-hub:...), "
                                           "torchvision:NAME, or a file written by seify.")]
Data = Annotated[str, typer.Argument(help="Image folder: DATA/train/<class>/* and DATA/val/<class>/* (or use "
                                          "--val-split).")]
Weights = Annotated[Optional[str], typer.Option(help="Checkpoint to load: .safetensors, or .pth/.pt/.bin "
                                                     "state_dict (also under state_dict/model/state_dict_ema).")]
Pretrained = Annotated[bool, typer.Option(help="Use timm's or torchvision's pretrained weights (needs network).")]
NumClasses = Annotated[Optional[int], typer.Option(help="Classifier size (default: taken from the weights).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SeifyError(f"{{{what}}} must be comma-separated integers, not {text!r}", what) from None
    if any(v <= 0 for v in values):
        raise SeifyError(f"{{{what}}} must be positive, not {text!r}", what)
    return values


def _floats(text: str, what: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise SeifyError(f"{{{what}}} must be {count} comma-separated numbers, not {text!r}", what)
    return values


def _input_size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    size = _ints(text, "input_size")
    if len(size) != 3:
        raise SeifyError(f"{{input_size}} is C,H,W (three numbers), not {text!r}", "input_size")
    if size[0] > 64 or max(size[1:]) > 4096:
        raise SeifyError(f"{{input_size}} {text} is too large (at most 64 channels and 4096 px a side)",
                         "input_size")
    return size


def _run_log():
    from .finetune.progress import PlainLog, RichLog
    return RichLog if sys.stdout.isatty() else PlainLog


# ---------------------------------------------------------------- output


def _console():
    from rich.console import Console
    return Console()


def _size(n: float) -> str:
    units = 0
    while n >= 1024 and units < 3:
        n, units = n / 1024, units + 1
    return f"{int(n)} B" if units == 0 else f"{n:.1f} {('KB', 'MB', 'GB')[units - 1]}"


def _print_conversion(result: Converted) -> None:
    columns = ["path", "after", "stage", "channels", "reduced_channels", "params", "compensation"]
    _table(f"SE sites in {result.source.spec} ({result.placement})", columns,
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
    print(f"wrote {result.output} ({_size(result.output_bytes or 0)})")


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G"


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal, tab-separated lines in a log."""
    console = _console()
    if console.is_terminal:
        from rich.table import Table
        table = Table(title=title)
        for i, c in enumerate(columns):
            table.add_column(c, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        print(title)
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))


def _print_profile(p: Profile) -> None:
    sites = [[s["path"], str(s["stage"]), f"{s['height']}x{s['width']}", str(s["channels"]),
              str(s["reduced_channels"]), f"{s['params']:,}", f"{s['macs']:,}"] for s in p.sites]
    _table(f"SE sites in {p.model} at {'x'.join(map(str, p.input_size))}",
           ["path", "stage", "spatial", "channels", "reduced", "params", "MACs"], sites)
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
            rows.append([f"peak memory, batch {b}", _size(t.peak_memory_base), _size(t.peak_memory_se),
                         f"x{t.peak_memory_se / t.peak_memory_base:.3f}", ""])
    _table(f"{p.model}: base vs SE", ["", "base", "SE", "added / ratio", "%"], rows)
    print("MACs are multiply-adds (the paper's FLOPs); 'all counted' adds SE's squeeze and scale, one MAC per "
          "element each." + (f" Timed on {p.device}, medians of interleaved runs." if p.timings else ""))


def _train_cells(t: Timing) -> list[str]:
    if t.train_ratio is None or t.train_base_ms is None or t.train_se_ms is None:
        return ["n/a", "n/a", "BatchNorm needs a batch of 2 here", ""]
    return [_ms(t.train_base_ms), _ms(t.train_se_ms), f"x{t.train_ratio:.3f}", ""]


def _print_comparison(profiles: list[Profile]) -> None:
    timed = bool(profiles[0].timings)
    columns = ["model", "params base", "params SE", "MACs base", "MACs SE"]
    if timed:
        columns += ["latency base", "latency SE", "SE/base"]
    rows = []
    for p in profiles:
        row = [p.model, f"{p.base.params / 1e6:.2f}M", f"{p.se.params / 1e6:.2f}M", _g(p.base.macs), _g(p.se.macs)]
        if timed:
            t = p.timings[0]
            row += [_ms(t.infer_base_ms), _ms(t.infer_se_ms), f"{t.infer_ratio:.3f}"]
        rows.append(row)
    _table("Base vs SE (as in the paper's Table 2)", columns, rows)


def _csv_rows(profiles: list[Profile]):
    for p in profiles:
        common = {"model": p.model, "input_size": "x".join(map(str, p.input_size)),
                  "params_base": p.base.params, "params_se": p.se.params, "macs_base": p.base.macs,
                  "macs_se": p.se.macs, "conv_linear_macs_base": p.base.conv_linear_macs,
                  "conv_linear_macs_se": p.se.conv_linear_macs}
        for t in [t.to_dict() for t in p.timings] or [{}]:
            yield {**common, **{k: t.get(k, "") for k in ("batch_size", "infer_base_ms", "infer_se_ms",
                                                          "infer_ratio", "train_base_ms", "train_se_ms",
                                                          "train_ratio", "peak_memory_base", "peak_memory_se")},
                   "device": p.device or ""}


@app.command()
@with_options(SEOptions, "se")
def convert(model: Model, weights: Weights = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
            output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to write (default: "
                                                          "MODEL-se.safetensors).")] = None,
            force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
            input_size: Annotated[Optional[str], typer.Option(help="C,H,W the model works at (default: the "
                                                                   "model's); recorded in the file.")] = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="List the sites and write nothing.")] = False,
            json_out: Json = False, se=None):
    """Insert SE blocks into MODEL and save it as a seify .safetensors file.

    Example: seify convert resnet50 --weights resnet50_a1.safetensors -o resnet50-se.safetensors
    """
    from . import api
    options, _ = se
    out = output or api.default_output(model)
    if not dry_run:
        from .checkpoint import check_writable
        check_writable(out, force=force, inputs=(model, weights))
    result = api.convert(model, options, weights=weights, pretrained=pretrained, num_classes=num_classes,
                         input_size=_input_size(input_size), dry_run=dry_run)
    if not dry_run:
        api.save(result, out, force=force, inputs=(model, weights))
    if json_out:
        print(json.dumps(result.report()))
    else:
        _print_conversion(result)


@app.command()
@with_options(SEOptions, "se", skip=("init",))
def profile(models: Annotated[list[str], typer.Argument(help="One or more MODELs (names or seify files).")],
            num_classes: NumClasses = None,
            input_size: Annotated[Optional[str], typer.Option(help="C,H,W (default: the size the model was "
                                                                   "trained or converted at).")] = None,
            batch_size: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1",
            device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: cuda if present).")]
            = None,
            latency: Annotated[bool, typer.Option(help="Measure latency and memory (--no-latency: count only).")]
            = True,
            repeats: Annotated[int, typer.Option(help="Timed runs per model (median reported).")] = 10,
            warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
            json_out: Json = False,
            csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV rows instead of tables.")] = False,
            se=None):
    """Count what SE costs (parameters, MACs) and time it (latency, memory) against the base model.

    Example: seify profile resnet50 resnet101 torchvision:mobilenet_v2 --no-latency
    """
    from .profile import profile as run_profile
    options, _ = se
    if json_out and csv_out:
        raise SeifyError("pass {json} or {csv}, not both", "json", "csv")
    batches = _ints(batch_size, "batch_size")
    if repeats < 1 or warmup < 0 or max(batches) > 4096:
        raise SeifyError("{repeats} must be at least 1, {warmup} at least 0 and {batch_size} at most 4096",
                         "repeats", "warmup", "batch_size")
    profiles = [run_profile(m, options, input_size=_input_size(input_size), num_classes=num_classes,
                            latency=latency, batch_sizes=batches, device=device, repeats=repeats, warmup=warmup)
                for m in models]
    if json_out:
        reports = [p.to_dict() for p in profiles]
        print(json.dumps(reports[0] if len(reports) == 1 else {"models": reports}))
    elif csv_out:
        import csv
        rows = list(_csv_rows(profiles))
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    elif len(profiles) == 1:
        _print_profile(profiles[0])
    else:
        _print_comparison(profiles)


@app.command()
@with_options(SEOptions, "se")
@with_options(FinetuneConfig, "recipe")
def finetune(ctx: typer.Context, model: Model, data: Data, weights: Weights = None, pretrained: Pretrained = False,
             with_se: Annotated[bool, typer.Option("--se/--no-se", help="--no-se fine-tunes the plain model with "
                                                                        "the same recipe: the baseline.")] = True,
             recipe=None, se=None):
    """Fine-tune MODEL on an image folder, adding SE blocks first where it has none (--no-se: the baseline).

    Example: seify finetune resnet50 --weights resnet50.safetensors data/flowers --epochs 10 --out runs/flowers
    Many GPUs: torchrun --nproc_per_node 4 -m seify finetune resnet50-se.safetensors data/flowers
    """
    from .finetune.loop import exit_code
    from .finetune.loop import finetune as run
    config, given = recipe
    options, se_given = se
    given |= se_given | passed(ctx, ("weights", "pretrained")) | ({"se"} if passed(ctx, ("with_se",)) else set())
    result = run(model, data, config, options if with_se else None, weights=weights, pretrained=pretrained,
                 log=_run_log(), explicit=given)
    if result.stopped_by is not None and result.main:
        print("continue with the same command plus --resume")
    if result.stopped_by is None and result.main and result.epochs_run:
        rows = [["best epoch", str(result.best_epoch)], ["best val top-1", f"{result.best_top1:.2f}%"],
                ["last val top-1", f"{result.last_top1:.2f}%"]]
        if result.start_top1 is not None:
            rows.insert(0, ["val top-1 before", f"{result.start_top1:.2f}%"])
        if result.skipped:
            rows.append(["unreadable files skipped", f"{len(result.skipped)} (first: {result.skipped[0]})"])
        rows += [[name, str(result.out / file)] for name, file in (
            ("best weights", "best.safetensors"), ("last weights", "last.safetensors"), ("run options", "run.json"),
            ("metrics", "metrics.csv"), ("curves", "curves.png"))]
        _table("Fine-tuning done", ["", ""], rows)
    raise typer.Exit(exit_code(result.stopped_by))


@app.command()
@with_options(FinetuneConfig, "recipe", skip=("out", "resume", "force"))
def compare(model: Model, data: Data,
            out: Annotated[str, typer.Option(help="Folder for every run (DIR/<arm>/seed-<n>) and the comparison.")],
            weights: Weights = None, pretrained: Pretrained = False,
            arms: Annotated[str, typer.Option(help="Arms to compare: plain (no SE), se, se:name=value[:...] "
                                                   "(e.g. se:reduction=8, se:variant=pre, se:stages=4,5).")]
            = "plain,se",
            seeds: Annotated[int, typer.Option(help="Runs per arm, seeds --seed, --seed+1, ...")] = 3,
            json_out: Json = False, recipe=None):
    """Does SE pay on my data? Fine-tune each arm under one budget over several seeds and compare.

    Example: seify compare resnet18 data/flowers --weights r18.safetensors --epochs 5 --seeds 3 --out cmp
    Rerunning the same command skips finished runs and resumes a killed one.
    """
    from .compare import compare as run
    from .compare import parse_arms
    config, _ = recipe
    from .finetune.progress import SilentLog
    document = run(model, data, parse_arms(arms), dataclasses.replace(config, out=out), seeds=seeds,
                   weights=weights, pretrained=pretrained, log=SilentLog if json_out else _run_log(),
                   say=(lambda text: None) if json_out else print)
    if "stopped_by" in document:
        if not json_out:
            print("continue with the same command: finished runs are skipped and the stopped one resumes")
        raise typer.Exit({"SIGINT": 130, "SIGTERM": 143}[document["stopped_by"]])
    if json_out:
        print(json.dumps(document))
    else:
        _print_arms(document, out)


def _print_arms(document: dict, out: str) -> None:
    def mean_std(stats: dict) -> str:
        return f"{stats['mean']:.2f}" + (f" +/- {stats['std']:.2f}" if stats["std"] is not None else "")
    rows = [[arm["name"], str(len(arm["runs"])), mean_std(arm["final_top1"]), mean_std(arm["best_top1"]),
             f"{arm['params'] / 1e6:.2f}M (+{arm['added_params']:,})",
             f"{arm['macs'] / 1e9:.4g} G (+{100 * arm['added_macs'] / arm['base_macs']:.2f}%)",
             f"{arm['images_per_sec']:.1f}" if arm["images_per_sec"] else ""] for arm in document["arms"]]
    _table(f"{document['model']}: {document['metric']} over seeds {', '.join(map(str, document['seeds']))}",
           ["arm", "runs", "final top-1", "best top-1", "params (added)", "MACs (added)", "train img/s"], rows)
    for verdict in document["verdicts"]:
        print(verdict["text"])
    skipped = document.get("skipped_files") or []
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) of DATA (first: {skipped[0]})")
    print(f"wrote {out}/compare.json, compare.csv and compare.png")


@app.command()
def evaluate(model: Model, data: Annotated[str, typer.Argument(help="DATA/train + DATA/val (val/ is scored), or "
                                                                    "one DATA/<class> tree.")],
             weights: Weights = None,
             batch_size: Annotated[int, typer.Option()] = 64,
             img_size: Annotated[Optional[int], typer.Option(help="Evaluate at N px (default: the size the model "
                                                                  "was trained at).")] = None,
             val_split: Annotated[Optional[float], typer.Option(help="Score the part of a DATA/<class> tree that "
                                                                     "finetune --val-split F held out (default: the "
                                                                     "model's own split where it was fine-tuned on "
                                                                     "this tree).")] = None,
             seed: Annotated[Optional[int], typer.Option(help="The --seed of that split (default: the run's, "
                                                              "else 0).")] = None,
             all_images: Annotated[bool, typer.Option("--all-images", help="Score every image of DATA, training "
                                                                           "images included.")] = False,
             device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
             workers: Annotated[Optional[int], typer.Option(help="Data-loading processes.")] = None,
             json_out: Json = False):
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix of MODEL on an image folder.

    Example: seify evaluate runs/flowers/best.safetensors data/flowers --json
    Plain checkpoint: seify evaluate resnet18 data/flowers --weights resnet18-flowers.pth
    """
    from .finetune.evaluate import evaluate_folder
    report = evaluate_folder(model, data, batch_size, img_size, device, workers, weights=weights,
                             val_split=val_split, seed=seed, all_images=all_images)
    if json_out:
        print(json.dumps(report))
        return
    classes = report["classes"]
    for note in report["notes"]:
        print(note)
    _table(f"{model} on {report['data']} at {report['img_size']} px", ["class", "accuracy", *[c[:12] for c in classes]],
           [[name, f"{acc:.1f}%", *map(str, row)] for name, acc, row in
            zip(classes, report["per_class"], report["confusion"], strict=True)])
    skipped = report["skipped"]
    print(f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}  "
          f"({report['images']} images: {report['scored']}" +
          (f"; {len(skipped)} unreadable file(s) skipped, first {skipped[0]})" if skipped else ")"))


@app.command()
def demo(out: Annotated[Optional[str], typer.Option(help="Folder for the demo's data and results (default: a new "
                                                         "temporary folder).")] = None,
         epochs: Annotated[int, typer.Option()] = 5,
         force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo in --out.")] = False):
    """Draw a small image dataset, then convert, profile, fine-tune and evaluate a resnet18 on it (no downloads).

    Example: seify demo --out /tmp/seify-demo
    """
    from .demo import run
    run(out, epochs=epochs, force=force, log=_run_log())


def main() -> None:
    _state["debug"] = "--debug" in sys.argv[1:]  # accepted anywhere on the line, also after the subcommand
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    try:
        app(standalone_mode=True)
    except SeifyError as e:
        _fail(e, 2, e.render(_flag))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # an internal error still gets one line; --debug shows where
        _fail(e, 1, f"{first_line(e)} (this is a seify bug; run with --debug for the traceback)")


def _fail(e: Exception, code: int, message: str) -> None:
    if _state["debug"]:
        import traceback
        traceback.print_exception(e)
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _one_line(text: str) -> str:
    """The first line, without terminal colour codes: an error must read the same in a log."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).strip()
    return text.splitlines()[0] if text else "unknown error"
