"""The ``seify`` command: arguments, output and exit codes over the Python API (no torch import at start-up)."""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import SeifyError

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
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False):
    _state["debug"] = debug


# Options shared by every command that builds an SE model; declared once, reused in each signature.
Model = Annotated[str, typer.Argument(help="timm name (resnet50, resnet50.a1_in1k, hf-hub:...), "
                                           "torchvision:NAME, or a file written by seify.")]
Weights = Annotated[Optional[str], typer.Option(help="Checkpoint to load: .safetensors, or .pth/.pt/.bin "
                                                     "state_dict (also under state_dict/model/state_dict_ema).")]
Pretrained = Annotated[bool, typer.Option(help="Use timm's or torchvision's pretrained weights (needs network).")]
NumClasses = Annotated[Optional[int], typer.Option(help="Classifier size (default: taken from the weights).")]
At = Annotated[str, typer.Option(help="Where SE goes: residual (on each residual branch, before the sum), "
                                      "activation (after each conv nonlinearity), auto (residual if any).")]
Variant = Annotated[str, typer.Option(help="Residual integration (paper Table 14): standard, pre, post, identity.")]
Reduction = Annotated[float, typer.Option(help="Reduction ratio r: SE's hidden width is C/r.")]
Divisor = Annotated[int, typer.Option(help="Round the hidden width to a multiple of this (timm: 8).")]
MinChannels = Annotated[int, typer.Option(help="Smallest hidden width.")]
Squeeze = Annotated[str, typer.Option(help="Squeeze pooling: avg or max.")]
Gate = Annotated[str, typer.Option(help="Excitation gate: sigmoid or hard-sigmoid.")]
Stages = Annotated[Optional[str], typer.Option(help="Only these stages, paper numbering: 2,3,4 is conv2_x..conv4_x "
                                                    "(a stage's number is log2 of its stride).")]
Include = Annotated[Optional[str], typer.Option(help="Only sites whose SE module path matches this regex.")]
Exclude = Annotated[Optional[str], typer.Option(help="Skip sites whose SE module path matches this regex.")]
Init = Annotated[str, typer.Option(help="identity: the converted model computes exactly what the original did; "
                                        "paper: plain random init, for training from scratch.")]
InputSize = Annotated[Optional[str], typer.Option(help="C,H,W of the probe input (default: the model's).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SeifyError(f"{what} must be comma-separated integers, not {text!r}") from None
    if any(v <= 0 for v in values):
        raise SeifyError(f"{what} must be positive, not {text!r}")
    return values


def _input_size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    size = _ints(text, "--input-size")
    if len(size) != 3:
        raise SeifyError(f"--input-size is C,H,W (three numbers), not {text!r}")
    return size


def _se_options(at, variant, reduction, divisor, min_channels, squeeze, gate, stages, include, exclude, init):
    from .surgery import SEOptions
    return SEOptions(at=at, variant=variant, reduction=reduction, divisor=divisor, min_channels=min_channels,
                     squeeze=squeeze, gate=gate, stages=_ints(stages, "--stages") if stages else None,
                     include=include, exclude=exclude, init=init)


def _console():
    from rich.console import Console
    return Console()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _print_conversion(report: dict, dry_run: bool) -> None:
    columns = ["path", "after", "stage", "channels", "reduced_channels", "params", "compensation"]
    _table(f"SE sites in {report['model']} ({report['placement']})", columns,
           [[str(site[c]) for c in columns] for site in report["sites"]])
    for site in report["skipped"]:
        print(f"skipped {site['path']}: {site['skipped']}")
    added = report["added_params"]
    print(f"parameters: {report['base_params']:,} base + {added:,} SE = {report['params']:,} "
          f"(+{report['added_percent']:.2f}%) in {len(report['sites'])} blocks")
    for note in report["notes"]:
        print(note)
    if dry_run:
        print("dry run: nothing written")
        return
    size = "x".join(map(str, report["input_size"]))
    print(f"function preserved: max |original - converted| = {report['max_abs_diff']:.3g} on a {size} probe "
          f"(outputs up to {report['output_scale']:.3g})")
    print(f"wrote {report['output']} ({_size(report['output_bytes'])})")


@app.command()
def convert(model: Model, weights: Weights = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
            output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to write (default: "
                                                          "MODEL-se.safetensors).")] = None,
            force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
            at: At = "auto", variant: Variant = "standard", reduction: Reduction = 16, divisor: Divisor = 8,
            min_channels: MinChannels = 8, squeeze: Squeeze = "avg", gate: Gate = "sigmoid",
            stages: Stages = None, include: Include = None, exclude: Exclude = None, init: Init = "identity",
            input_size: InputSize = None,
            dry_run: Annotated[bool, typer.Option(help="List the sites and write nothing.")] = False,
            json_out: Json = False):
    """Insert SE blocks into MODEL and save it as a seify .safetensors file.

    Example: seify convert resnet50 --weights resnet50_a1.safetensors -o resnet50-se.safetensors
    """
    from . import api
    options = _se_options(at, variant, reduction, divisor, min_channels, squeeze, gate, stages, include, exclude,
                          init)
    out = output or api.default_output(model)
    if not dry_run:
        from .checkpoint import check_writable
        check_writable(out, force=force, inputs=(model, weights))
    result = api.convert(model, options, weights=weights, pretrained=pretrained, num_classes=num_classes,
                         input_size=_input_size(input_size), dry_run=dry_run)
    if not dry_run:
        api.save(result, out, force=force, inputs=(model, weights))
    report = result.report()
    if json_out:
        print(json.dumps(report))
    else:
        _print_conversion(report, dry_run)


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


def _print_profile(report: dict) -> None:
    sites = [[s["path"], str(s["stage"]), f"{s['height']}x{s['width']}", str(s["channels"]),
              str(s["reduced_channels"]), f"{s['params']:,}", f"{s['macs']:,}"] for s in report["sites"]]
    _table(f"SE sites in {report['model']} at {'x'.join(map(str, report['input_size']))}",
           ["path", "stage", "spatial", "channels", "reduced", "params", "MACs"], sites)
    base, se = report["base"], report["se"]
    rows = [["parameters", f"{base['params']:,}", f"{se['params']:,}", f"+{report['added_params']:,}",
             f"+{report['added_params_percent']:.2f}%"],
            ["trainable", f"{base['trainable']:,}", f"{se['trainable']:,}", "", ""],
            ["MACs (all counted)", _g(base["macs"]), _g(se["macs"]), f"+{report['added_macs']:,}",
             f"+{report['added_macs_percent']:.2f}%"],
            ["MACs (conv/linear only)", _g(base["conv_linear_macs"]), _g(se["conv_linear_macs"]),
             f"+{se['conv_linear_macs'] - base['conv_linear_macs']:,}", ""]]
    for t in report["timings"]:
        b = t["batch_size"]
        rows += [[f"inference, batch {b}", _ms(t["infer_base_ms"]), _ms(t["infer_se_ms"]),
                  f"x{t['infer_ratio']:.3f}", ""],
                 [f"throughput, batch {b}", f"{t['throughput_base']:.1f} img/s", f"{t['throughput_se']:.1f} img/s",
                  "", ""],
                 [f"train step, batch {b}", _ms(t["train_base_ms"]), _ms(t["train_se_ms"]),
                  f"x{t['train_ratio']:.3f}", ""]]
        if t["peak_memory_base"] is not None:
            rows.append([f"peak memory, batch {b}", _size(t["peak_memory_base"]), _size(t["peak_memory_se"]),
                         f"x{t['peak_memory_se'] / t['peak_memory_base']:.3f}", ""])
    _table(f"{report['model']}: base vs SE", ["", "base", "SE", "added / ratio", "%"], rows)
    print("MACs are multiply-adds (the paper's FLOPs); 'all counted' adds SE's squeeze and scale, one MAC per "
          "element each." + (f" Timed on {report['device']}, medians of interleaved runs." if report["timings"]
                             else ""))


def _print_comparison(reports: list[dict]) -> None:
    timed = bool(reports[0]["timings"])
    columns = ["model", "params base", "params SE", "MACs base", "MACs SE"]
    if timed:
        columns += ["latency base", "latency SE", "SE/base"]
    rows = []
    for r in reports:
        row = [r["model"], f"{r['base']['params'] / 1e6:.2f}M", f"{r['se']['params'] / 1e6:.2f}M",
               _g(r["base"]["macs"]), _g(r["se"]["macs"])]
        if timed:
            t = r["timings"][0]
            row += [_ms(t["infer_base_ms"]), _ms(t["infer_se_ms"]), f"{t['infer_ratio']:.3f}"]
        rows.append(row)
    _table("Base vs SE (as in the paper's Table 2)", columns, rows)


def _csv_rows(reports: list[dict]):
    for r in reports:
        common = {"model": r["model"], "input_size": "x".join(map(str, r["input_size"])),
                  "params_base": r["base"]["params"], "params_se": r["se"]["params"],
                  "macs_base": r["base"]["macs"], "macs_se": r["se"]["macs"],
                  "conv_linear_macs_base": r["base"]["conv_linear_macs"],
                  "conv_linear_macs_se": r["se"]["conv_linear_macs"]}
        for t in r["timings"] or [{}]:
            yield {**common, **{k: t.get(k, "") for k in ("batch_size", "infer_base_ms", "infer_se_ms",
                                                          "infer_ratio", "train_base_ms", "train_se_ms",
                                                          "train_ratio", "peak_memory_base", "peak_memory_se")},
                   "device": r["device"] or ""}


@app.command()
def profile(models: Annotated[list[str], typer.Argument(help="One or more MODELs (names or seify files).")],
            num_classes: NumClasses = None, at: At = "auto", variant: Variant = "standard",
            reduction: Reduction = 16, divisor: Divisor = 8, min_channels: MinChannels = 8, squeeze: Squeeze = "avg",
            gate: Gate = "sigmoid", stages: Stages = None, include: Include = None, exclude: Exclude = None,
            input_size: Annotated[Optional[str], typer.Option(help="C,H,W (default: the model's).")] = None,
            batch_size: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1",
            device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: cuda if present).")]
            = None,
            latency: Annotated[bool, typer.Option(help="Measure latency and memory (--no-latency: count only).")]
            = True,
            repeats: Annotated[int, typer.Option(help="Timed runs per model (median reported).")] = 10,
            warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
            json_out: Json = False,
            csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV rows instead of tables.")] = False):
    """Count what SE costs (parameters, MACs) and time it (latency, memory) against the base model.

    Example: seify profile resnet50 resnet101 torchvision:mobilenet_v2 --no-latency
    """
    from .profile import profile as run_profile
    options = _se_options(at, variant, reduction, divisor, min_channels, squeeze, gate, stages, include, exclude,
                          "identity")
    batches = _ints(batch_size, "--batch-size")
    if repeats < 1 or warmup < 0:
        raise SeifyError("--repeats must be at least 1 and --warmup at least 0")
    reports = [run_profile(m, options, input_size=_input_size(input_size), num_classes=num_classes,
                           latency=latency, batch_sizes=batches, device=device, repeats=repeats,
                           warmup=warmup).to_dict() for m in models]
    if json_out:
        print(json.dumps(reports[0] if len(reports) == 1 else {"models": reports}))
    elif csv_out:
        import csv
        rows = list(_csv_rows(reports))
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    elif len(reports) == 1:
        _print_profile(reports[0])
    else:
        _print_comparison(reports)


def _floats(text: str, what: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SeifyError(f"{what} must be {count} comma-separated numbers, not {text!r}") from None
    if len(values) != count:
        raise SeifyError(f"{what} must be {count} comma-separated numbers, not {text!r}")
    return values


def _run_log():
    from .finetune.progress import PlainLog, RichLog
    return RichLog if sys.stdout.isatty() else PlainLog


@app.command()
def finetune(model: Model, data: Annotated[str, typer.Argument(help="Image folder: DATA/train/<class>/* and "
                                                                     "DATA/val/<class>/* (or use --val-split).")],
             out: Annotated[str, typer.Option(help="Run folder for checkpoints, metrics and curves.")] = "runs/seify",
             epochs: Annotated[int, typer.Option(help="Epochs in all, SE warm-up included.")] = 10,
             batch_size: Annotated[int, typer.Option(help="Images per step and device.")] = 64,
             lr: Annotated[float, typer.Option(help="Learning rate of SE blocks and the new head.")] = 1e-3,
             backbone_lr_scale: Annotated[float, typer.Option(help="Backbone learning rate = lr x this.")] = 0.1,
             weight_decay: Annotated[float, typer.Option()] = 0.05,
             optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
             warmup_epochs: Annotated[float, typer.Option(help="Linear learning-rate warm-up, then cosine.")] = 1.0,
             se_warmup_epochs: Annotated[int, typer.Option(help="First train only SE and head, backbone and its "
                                                                "BatchNorm statistics frozen.")] = 1,
             label_smoothing: Annotated[float, typer.Option()] = 0.1,
             clip_grad: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).")] = 1.0,
             ema_decay: Annotated[Optional[float], typer.Option(help="Keep an EMA of weights (e.g. 0.999); "
                                                                      "validation and best use it.")] = None,
             img_size: Annotated[Optional[int], typer.Option(help="Train and evaluate at N px.")] = None,
             crop_scale: Annotated[str, typer.Option(help="Random-resized-crop area range.")] = "0.08,1",
             val_split: Annotated[Optional[float], typer.Option(help="Split one DATA/<class> tree (or a train/ "
                                                                     "without val/) by this fraction.")] = None,
             strict_data: Annotated[bool, typer.Option(help="Fail on unreadable files instead of skipping.")] = False,
             seed: Annotated[int, typer.Option(help="Fixes data order, augmentation and initialisation.")] = 0,
             workers: Annotated[Optional[int], typer.Option(help="Data-loading processes.")] = None,
             device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
             precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp16 without bf16, fp32 on CPU), "
                                                         "fp32, bf16, fp16.")] = "auto",
             channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                                   help="Default: on for CUDA.")] = None,
             compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
             save_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: per epoch).")] = 0,
             log_every: Annotated[int, typer.Option(help="In logs, a line every N steps (0: per epoch).")] = 50,
             resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
             force: Annotated[bool, typer.Option("--force", help="Start over in a --out that holds a run.")] = False,
             weights: Weights = None, pretrained: Pretrained = False, at: At = "auto", variant: Variant = "standard",
             reduction: Reduction = 16, divisor: Divisor = 8, min_channels: MinChannels = 8,
             squeeze: Squeeze = "avg", gate: Gate = "sigmoid", stages: Stages = None, include: Include = None,
             exclude: Exclude = None):
    """Fine-tune MODEL with SE on an image folder (converting it first if it has no SE blocks).

    Example: seify finetune resnet50 --weights resnet50.safetensors data/flowers --epochs 10 --out runs/flowers
    Many GPUs: torchrun --nproc_per_node 4 -m seify finetune resnet50-se.safetensors data/flowers
    """
    from .finetune.loop import FinetuneConfig, exit_code, finetune as run
    options = _se_options(at, variant, reduction, divisor, min_channels, squeeze, gate, stages, include, exclude,
                          "identity")
    config = FinetuneConfig(out=out, epochs=epochs, batch_size=batch_size, lr=lr,
                            backbone_lr_scale=backbone_lr_scale, weight_decay=weight_decay, optimizer=optimizer,
                            warmup_epochs=warmup_epochs, se_warmup_epochs=se_warmup_epochs,
                            label_smoothing=label_smoothing, clip_grad=clip_grad or None, ema_decay=ema_decay,
                            img_size=img_size, crop_scale=_floats(crop_scale, "--crop-scale", 2),
                            val_split=val_split, strict_data=strict_data, seed=seed, workers=workers,
                            device=device, precision=precision, channels_last=channels_last, compile=compile,
                            save_every=save_every, log_every=log_every, resume=resume, force=force)
    result = run(model, data, config, options, weights=weights, pretrained=pretrained, log=_run_log())
    if result.stopped_by is None and result.main:
        _table("Fine-tuning done", ["", ""],
               [["best epoch", str(result.best_epoch)], ["best val top-1", f"{result.best_top1:.2f}%"],
                ["last val top-1", f"{result.last_top1:.2f}%"],
                ["best weights", str(result.out / "best.safetensors")],
                ["last weights", str(result.out / "last.safetensors")],
                ["metrics", str(result.out / "metrics.csv")], ["curves", str(result.out / "curves.png")]])
    raise typer.Exit(exit_code(result))


@app.command()
def evaluate(model: Model, data: Annotated[str, typer.Argument(help="DATA/<class>/* or DATA/val/<class>/*.")],
             batch_size: Annotated[int, typer.Option()] = 64,
             img_size: Annotated[Optional[int], typer.Option(help="Evaluate at N px (default: the model's).")]
             = None,
             device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
             workers: Annotated[Optional[int], typer.Option(help="Data-loading processes.")] = None,
             json_out: Json = False):
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix of MODEL on an image folder.

    Example: seify evaluate runs/flowers/best.safetensors data/flowers/val --json
    """
    from .finetune.evaluate import evaluate_folder
    from .profile import check_device
    report = evaluate_folder(model, data, batch_size, img_size, check_device(device), workers)
    if json_out:
        print(json.dumps(report))
        return
    classes = report["classes"]
    _table(f"{model} on {report['data']}", ["class", "accuracy", *[c[:12] for c in classes]],
           [[name, f"{acc:.1f}%", *map(str, row)] for name, acc, row in
            zip(classes, report["per_class"], report["confusion"])])
    print(f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}  "
          f"({report['images']} images" + (f", {len(report['skipped'])} unreadable files skipped)"
                                          if report["skipped"] else ")"))


@app.command()
def demo(out: Annotated[str, typer.Option(help="Folder for the demo's data and results.")] = "seify-demo",
         epochs: Annotated[int, typer.Option()] = 8,
         force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo in --out.")] = False):
    """Draw a small image dataset, then convert, profile, fine-tune and evaluate a resnet18 on it (no downloads).

    Example: seify demo --out /tmp/seify-demo
    """
    from .demo import run
    run(out, epochs=epochs, force=force, log=_run_log())


def main() -> None:
    try:
        app(standalone_mode=True)
    except SeifyError as e:
        _fail(e, 2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # an internal error still gets one line; --debug shows where
        _fail(e, 1, hint=" (this is a seify bug; run with --debug for the traceback)")


def _fail(e: Exception, code: int, hint: str = "") -> None:
    if _state["debug"]:
        import traceback
        traceback.print_exception(e)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}{hint}", file=sys.stderr)
    sys.exit(code)
