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
    console = _console()
    columns = ("path", "after", "stage", "channels", "reduced_channels", "params", "compensation")
    rows = [[str(site[c]) for c in columns] for site in report["sites"]]
    if console.is_terminal:
        from rich.table import Table
        table = Table(title=f"SE sites in {report['model']} ({report['placement']})")
        for c in columns:
            table.add_column(c.replace("_", " "), justify="right" if c in ("stage", "channels", "reduced_channels",
                                                                           "params") else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))
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
