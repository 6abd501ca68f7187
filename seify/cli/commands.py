"""Each command: its flags, one call into the Python API, its output. Errors are one line with exit code 2 (a
bug's exit code is 1); ``--debug``, anywhere on the line, shows the traceback."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import SeifyError
from ..finetune.config import FinetuneConfig
from ..options import COMPARISON, DATA, DEVICES, EXPORTER, FOLD_LATENCY, OUTPUT, SE_BLOCK, SOURCE, SEOptions
from . import output
from .flags import (
    Data,
    Device,
    Exclude,
    Force,
    Include,
    Json,
    Model,
    NumClasses,
    Pretrained,
    Weights,
    WithSE,
    input_size,
    passed,
    whole_numbers,
    with_options,
)

app = typer.Typer(
    help="Add Squeeze-and-Excitation blocks to trained PyTorch CNNs without losing their accuracy.\n\n"
         "Examples:\n\n  seify convert resnet50 --weights r50.safetensors -o r50-se.safetensors\n"
         "  seify finetune r50-se.safetensors flowers --epochs 10 --out runs/fl\n\n"
         "seify COMMAND --help shows a command's options.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich", add_completion=False)
state = {"debug": False}
ImgSize = Annotated[Optional[int], typer.Option(help="Run the model at N px (default: the size it was trained at, "
                                                   "else the architecture's).", rich_help_panel=DATA)]
InputSize = Annotated[Optional[str], typer.Option("--input-size", help="C,H,W the model works at (default: the "
                                                                       "size it was trained or converted at).",
                                                  rich_help_panel=DATA)]


def _version(value: bool):
    if value:
        typer.echo(f"seify {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (also after the "
                                                              "command).")] = False):
    state["debug"] = debug


@app.command("convert")
@with_options(SEOptions, "se")
def convert_command(
        model: Model, weights: Weights = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
        out: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to write (default: "
                                                   "MODEL-se.safetensors).", rich_help_panel=OUTPUT)] = None,
        force: Force = False, size: InputSize = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="List the sites and write nothing.",
                                              rich_help_panel=OUTPUT)] = False,
        json_out: Json = False, se=None):
    """Insert SE blocks into MODEL and save it as a seify .safetensors file.

    Examples:

      seify convert resnet50 --weights r50.safetensors -o r50-se.safetensors
      seify convert torchvision:vgg16_bn --weights vgg16.pth --at activation
      seify convert resnet50 --pretrained --reduction 8 --stages 3,4 --dry-run

    Until it is trained, the converted model computes what the original did.
    """
    from .. import api
    from ..models import files_read
    from ..writes import check_writable
    options, _ = se
    out = out or api.default_output(model)
    inputs = files_read(model, weights)
    if not dry_run:
        check_writable(out, force=force, inputs=inputs)
    result = api.convert(model, options, weights=weights, pretrained=pretrained, num_classes=num_classes,
                         input_size=input_size(size), dry_run=dry_run)
    if not dry_run:
        api.save(result, out, force=force, inputs=inputs)
    output.document(result.report()) if json_out else output.conversion(result)


@app.command("profile")
@with_options(SEOptions, "se", skip=("init",))
def profile_command(
        models: Annotated[list[str], typer.Argument(help="One or more MODELs (names or seify files).")],
        weights: Weights = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
        size: InputSize = None,
        batch_size: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.",
                                                rich_help_panel=DEVICES)] = "1",
        device: Device = None,
        latency: Annotated[bool, typer.Option(help="Measure latency and memory (--no-latency: count only).",
                                              rich_help_panel=DEVICES)] = True,
        repeats: Annotated[int, typer.Option(help="Timed runs per model (median reported).",
                                             rich_help_panel=DEVICES)] = 10,
        warmup: Annotated[int, typer.Option(help="Untimed runs first.", rich_help_panel=DEVICES)] = 3,
        json_out: Json = False,
        csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV rows instead of tables.",
                                              rich_help_panel=OUTPUT)] = False,
        se=None):
    """Count what SE costs (parameters, MACs) and time it (latency, memory) against the base model.

    Examples:

      seify profile resnet50 resnet101 torchvision:vgg16 --no-latency
      seify profile r50-se.safetensors --batch-size 1,32 --device cuda --json

    MACs are multiply-adds, the paper's FLOPs.
    """
    from ..profile import profile
    options, _ = se
    if json_out and csv_out:
        raise SeifyError("pass {json} or {csv}, not both", "json", "csv")
    measured = [profile(m, options, input_size=input_size(size), num_classes=num_classes, latency=latency,
                        batch_sizes=whole_numbers(batch_size, "batch_size"), device=device, repeats=repeats,
                        warmup=warmup, weights=weights, pretrained=pretrained) for m in models]
    if json_out:
        reports = [p.to_dict() for p in measured]
        output.document(reports[0] if len(reports) == 1 else {"models": reports})
    elif csv_out:
        output.profile_csv(measured)
    elif len(measured) == 1:
        output.profile(measured[0])
    else:
        output.profiles(measured)


@app.command("finetune")
@with_options(SEOptions, "se")
@with_options(FinetuneConfig, "config")
def finetune_command(ctx: typer.Context, model: Model, data: Data, weights: Weights = None,
                     pretrained: Pretrained = False, with_se: WithSE = True, config=None, se=None):
    """Fine-tune MODEL on an image folder, adding SE blocks first where it has none (--no-se: the baseline).

    Examples:

      seify finetune resnet50 --weights r50.safetensors flowers --out runs/fl
      seify finetune r50-se.safetensors flowers --epochs 10 --out runs/fl
      seify finetune r50-se.safetensors flowers --epochs 10 --out runs/fl --resume
      torchrun --nproc_per_node 4 -m seify finetune r50-se.safetensors flowers

    The command that started a run, plus --resume, continues it.
    """
    from ..finetune.loop import finetune
    from ..finetune.signals import exit_code
    settings, given = config
    options, se_given = se
    given |= se_given | passed(ctx, ("weights", "pretrained")) | ({"se"} if passed(ctx, ("with_se",)) else set())
    result = finetune(model, data, settings, options if with_se else None, weights=weights, pretrained=pretrained,
                      log=output.run_log(), explicit=given)
    if result.main:
        output.run(result)
    raise typer.Exit(exit_code(result.stopped_by))


@app.command("compare")
@with_options(FinetuneConfig, "config", skip=("out", "resume", "force", "own_gates"))
def compare_command(
        model: Model, data: Data,
        out: Annotated[str, typer.Option(help="Folder for every run (DIR/<arm>/seed-<n>) and the comparison.",
                                         rich_help_panel=OUTPUT)],
        weights: Weights = None, pretrained: Pretrained = False,
        arms: Annotated[str, typer.Option(help="Arms to compare: plain (no SE), se, se:name=value[:...] (e.g. "
                                               "se:reduction=8, se:variant=pre, se:stages=4,5), scale[:...] (a "
                                               "static scale and shift where se puts SE), probe (the head alone "
                                               "on the frozen base), gates (the network's own gates and the head), "
                                               "paper:TABLE.",
                                          rich_help_panel=COMPARISON)] = "plain,se",
        seeds: Annotated[int, typer.Option(help="Runs per arm, seeds --seed, --seed+1, ...",
                                           rich_help_panel=COMPARISON)] = 3,
        json_out: Json = False, config=None):
    """Does SE pay on my data? Fine-tune each arm under one budget over several seeds and compare.

    Examples:

      seify compare resnet18 flowers --weights r18.pth --epochs 5 --out cmp
      seify compare resnet50 flowers --arms plain,se,se:reduction=8 --out cmp8

    Rerunning the same command skips finished runs and resumes a stopped one.
    """
    from ..compare import compare, parse_arms
    from ..finetune.progress import SilentLog
    from ..finetune.signals import exit_code
    settings, _ = config
    report = compare(model, data, parse_arms(arms), dataclasses.replace(settings, out=out), seeds=seeds,
                     weights=weights, pretrained=pretrained, log=SilentLog if json_out else output.run_log(),
                     say=(lambda text: None) if json_out else print)
    if "stopped_by" in report:
        if not json_out:
            print("continue with the same command: finished runs are skipped and the stopped one resumes")
        raise typer.Exit(exit_code(report["stopped_by"]))
    output.document(report) if json_out else output.comparison(report, out)


@app.command("evaluate")
def evaluate_command(
        model: Model,
        data: Annotated[str, typer.Argument(help="DATA/train + DATA/val (val/ is scored), or one DATA/<class> "
                                                 "tree.")],
        weights: Weights = None, pretrained: Pretrained = False,
        batch_size: Annotated[int, typer.Option(help="Images per batch.", rich_help_panel=DEVICES)] = 64,
        img_size: ImgSize = None,
        val_split: Annotated[Optional[float], typer.Option(help="Score the part of a DATA/<class> tree that "
                                                                "finetune --val-split F held out (default: the "
                                                                "model's own split where it was fine-tuned on this "
                                                                "tree).", rich_help_panel=DATA)] = None,
        seed: Annotated[Optional[int], typer.Option(help="The --seed of that split (default: the run's, else 0).",
                                                    rich_help_panel=DATA)] = None,
        all_images: Annotated[bool, typer.Option("--all-images", help="Score every image of DATA, training "
                                                                      "images included.", rich_help_panel=DATA)]
        = False,
        device: Device = None,
        workers: Annotated[Optional[int], typer.Option(help="Data-loading processes.", rich_help_panel=DEVICES)]
        = None,
        json_out: Json = False):
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix of MODEL on an image folder.

    Examples:

      seify evaluate runs/fl/best.safetensors flowers --json
      seify evaluate resnet18 flowers --weights r18-flowers.pth --val-split 0.1

    Scores DATA/val, or the images a run held out with --val-split.
    """
    from ..images.scoring import evaluate_folder
    report = evaluate_folder(model, data, batch_size, img_size, device, workers, weights=weights,
                             val_split=val_split, seed=seed, all_images=all_images, pretrained=pretrained)
    output.document(report) if json_out else output.evaluation(report, model)


@app.command("export")
def export_command(
        model: Model,
        out: Annotated[str, typer.Option("--output", "-o", help="Where to write: a file (onnx, pt2) or a folder "
                                                                "(timm, folder).", rich_help_panel=OUTPUT)],
        format: Annotated[str, typer.Option(help="onnx, pt2 (torch.export), timm (a folder timm loads without "
                                                 "seify), folder (a hub folder seify.load opens), safetensors (one "
                                                 "seify file: an adapter merged onto its base).",
                                            rich_help_panel=OUTPUT)] = "onnx",
        weights: Weights = None, pretrained: Pretrained = False, size: InputSize = None,
        opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).",
                                                     rich_help_panel=EXPORTER)] = None,
        legacy: Annotated[bool, typer.Option("--legacy", help="The TorchScript-based ONNX exporter instead of "
                                                              "dynamo.", rich_help_panel=EXPORTER)] = False,
        dynamic_size: Annotated[bool, typer.Option("--dynamic-size", help="Dynamic height and width too (the "
                                                                          "batch always is).",
                                                   rich_help_panel=EXPORTER)] = False,
        force: Force = False, json_out: Json = False):
    """Write MODEL as ONNX, a torch.export program, or a hub folder, and prove it computes the same.

    Examples:

      seify export runs/fl/best.safetensors -o flowers.onnx
      seify export runs/fl/best.safetensors -o flowers.pt2 --format pt2
      seify export runs/fl/best.safetensors -o flowers-timm --format timm
      seify export runs/fl/best.safetensors -o flowers-se --format folder
      seify export runs/ad/best.safetensors --weights base.pth -o merged.safetensors --format safetensors

    The written model is run against MODEL before it is kept; a difference is an error.
    """
    from ..export import export
    result = export(model, out, format, weights=weights, pretrained=pretrained, input_size=input_size(size),
                    opset=opset, legacy=legacy, dynamic_size=dynamic_size, force=force)
    output.document(result.to_dict()) if json_out else output.exported(result)


@app.command("analyze")
def analyze_command(
        model: Model, data: Data, weights: Weights = None, pretrained: Pretrained = False,
        out: Annotated[Optional[str], typer.Option(help="Folder for analysis.json, gates.safetensors and the "
                                                        "pictures (default: MODEL-analysis).",
                                                   rich_help_panel=OUTPUT)] = None,
        max_images: Annotated[Optional[int], typer.Option(help="A fixed random subset of this many images "
                                                               "(default: all).", rich_help_panel=DATA)] = None,
        val_split: Annotated[Optional[float], typer.Option(help="The part of a DATA/<class> tree to use, as "
                                                                "evaluate --val-split (default: the run's split).",
                                                           rich_help_panel=DATA)] = None,
        img_size: ImgSize = None, include: Include = None, exclude: Exclude = None,
        device: Device = None, force: Force = False, json_out: Json = False):
    """What did SE learn? Every channel gate over DATA's images: per site and class, specificity and saturation.

    The gates are seify's SE blocks, or those a network ships (EfficientNet, MobileNetV3, RegNetY, SE-ResNet...).

    Examples:

      seify analyze runs/fl/best.safetensors flowers --out fl-analysis
      seify analyze efficientnet_b0 --pretrained flowers --max-images 500 --json

    Images are grouped by DATA's own classes, whatever the model's head. Sites are ranked by how little their
    gates move per parameter they cost: candidates for seify fold.
    """
    from ..analyze import analyze
    result = analyze(model, data, weights=weights, pretrained=pretrained, out=out, max_images=max_images, device=device,
                     val_split=val_split, force=force, include=include, exclude=exclude, img_size=img_size)
    output.document(result.to_dict()) if json_out else output.analysis(result)


@app.command("fold")
def fold_command(
        model: Model,
        data: Annotated[Optional[str], typer.Argument(help="Images to measure the gates on (without: only gates "
                                                           "that are constant by their weights are folded).")]
        = None,
        *, out: Annotated[str, typer.Option("--output", "-o", help="Where to write the folded seify file.",
                                            rich_help_panel=OUTPUT)],
        weights: Weights = None, pretrained: Pretrained = False,
        max_gate_std: Annotated[Optional[float], typer.Option(
            help="With DATA: fold a gate that varies by at most this (default 0.01) over the images, in every "
                 "channel.", rich_help_panel=SE_BLOCK)] = None,
        max_top1_drop: Annotated[Optional[float], typer.Option(
            help="With DATA: fold the least harmful gates first, re-measured after each, while top-1 drops by at "
                 "most this many points (instead of --max-gate-std).", rich_help_panel=SE_BLOCK)] = None,
        include: Include = None, exclude: Exclude = None,
        max_images: Annotated[Optional[int], typer.Option(help="A fixed random subset of DATA's images.",
                                                          rich_help_panel=DATA)] = 512,
        img_size: ImgSize = None,
        latency: Annotated[bool, typer.Option(help="Time the model before and after (batch 1, one thread, eager "
                                                   "and onnxruntime).", rich_help_panel=OUTPUT)] = FOLD_LATENCY,
        device: Device = None, force: Force = False, json_out: Json = False):
    """Take channel gates out where they do nothing: a constant gate folded into a neighbouring layer, for free.

    Examples:

      seify fold r50-se.safetensors -o r50-again.safetensors
      seify fold best.safetensors flowers -o folded.safetensors --max-gate-std 0.02
      seify fold mobilenetv3_small_100 --pretrained imagenette -o mnv3-lite.safetensors --max-top1-drop 0.5

    Without DATA the result computes exactly what MODEL did; with DATA the change is measured and reported.
    """
    from ..fold import fold
    result = fold(model, out, data, weights=weights, pretrained=pretrained, max_gate_std=max_gate_std,
                  max_top1_drop=max_top1_drop, include=include, exclude=exclude, max_images=max_images, device=device,
                  latency=latency, force=force, img_size=img_size)
    output.document(result.to_dict()) if json_out else output.folded(result)


@app.command("demo")
def demo_command(
        out: Annotated[Optional[str], typer.Option(help="Folder for the demo's data and results (default: a new "
                                                        "temporary folder).", rich_help_panel=OUTPUT)] = None,
        epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.", rich_help_panel=SOURCE)] = 5,
        force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo in --out.",
                                            rich_help_panel=OUTPUT)] = False):
    """Draw a small image dataset, then convert, profile, fine-tune and evaluate a resnet18 on it (no downloads).

    Examples:

      seify demo --out /tmp/seify-demo

    Nothing is downloaded.
    """
    from .demo import run
    run(out, epochs=epochs, force=force, log=output.run_log())
