"""The figures seify writes: a run's training curves and a comparison of fine-tuning arms.

Drawn with matplotlib's object API on an Agg canvas (no global backend, no display needed).
"""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    """matplotlib is imported when the first figure is drawn, not when seify is."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)

_PHASE_COLOUR, _RESUME_COLOUR = "0.35", "tab:purple"


def _axes(fig: Figure, count: int):
    axes = fig.subplots(1, count)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("epoch")
    return axes


def _mark_events(ax, rows: list[dict], resumes: list[float]) -> None:
    """The phase boundary (end of the warm-up) and where the run was resumed."""
    warmup = [r["epoch"] for r in rows if r.get("phase") == "warmup"]
    if warmup and any(r.get("phase") == "full" for r in rows):
        ax.axvline(max(warmup), color=_PHASE_COLOUR, linestyle=":", linewidth=1, label="end of warm-up")
    for i, at in enumerate(resumes):
        ax.axvline(at, color=_RESUME_COLOUR, linestyle="--", linewidth=1, label="resumed" if i == 0 else None)


def _series(ax, rows: list[dict], key: str, label: str, **style) -> None:
    points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label, **style)


def training_curves(rows: list[dict], resumes: list[float], title: str) -> Figure:
    """Loss, accuracy and learning rate per epoch; epoch 0 is the model before fine-tuning."""
    fig = _figure(figsize=(15, 4.2), layout="constrained")
    loss, accuracy, lr = _axes(fig, 3)
    _series(loss, rows, "train_loss", "train")
    _series(loss, rows, "val_loss", "val")
    loss.set_title("loss")
    _series(accuracy, rows, "train_top1", "train top-1")
    _series(accuracy, rows, "val_top1", "val top-1")
    _series(accuracy, rows, "val_top5", "val top-5", linestyle="--")
    accuracy.set_title("accuracy (%)")
    _series(lr, rows, "lr", "new parts")
    if any(r.get("lr_backbone") != r.get("lr") for r in rows):
        _series(lr, rows, "lr_backbone", "trained parts")
    lr.set_title("learning rate (end of epoch)")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss, accuracy, lr):
        _mark_events(ax, rows, resumes)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return fig


def comparison(arms: list[dict]) -> Figure:
    """Left: val top-1 per epoch (0: before fine-tuning), mean over seeds with a min-max band, per arm.
    Right: final top-1 against multiply-adds per image."""
    fig = _figure(figsize=(13, 4.6), layout="constrained")
    curves, cost = _axes(fig, 2)
    giga = max(arm["macs"] for arm in arms) >= 1e9
    cost_key, cost_scale = "macs", 1e-9 if giga else 1e-6
    cost.set_xlabel(f"multiply-adds per image ({'G' if giga else 'M'})")
    for i, arm in enumerate(arms):
        colour = f"C{i}"
        per_epoch: dict[int, list[float]] = {}
        for run in arm["runs"]:
            for epoch, top1 in zip(run["epochs"], run["val_top1"], strict=True):
                per_epoch.setdefault(epoch, []).append(top1)
        epochs = sorted(per_epoch)
        mean = [statistics.fmean(per_epoch[e]) for e in epochs]
        curves.plot(epochs, mean, marker="o", markersize=3, color=colour, label=arm["name"])
        curves.fill_between(epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                            color=colour, alpha=0.18, linewidth=0)
        finals = arm["final_top1"]
        cost.errorbar([arm[cost_key] * cost_scale], [finals["mean"]], yerr=[finals["std"] or 0], fmt="o",
                      color=colour, capsize=4, label=arm["name"])
        cost.annotate(arm["name"], (arm[cost_key] * cost_scale, finals["mean"]), textcoords="offset points",
                      xytext=(6, 4), fontsize="small")
    curves.set_title("val top-1 (%) per epoch: mean over seeds, band min-max")
    cost.set_title("final val top-1 (%) against cost: mean +/- std")
    curves.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    curves.xaxis.get_major_locator().set_params(integer=True)
    return fig


def save_png(fig: Figure, path) -> None:
    fig.savefig(path, format="png", dpi=100)


def excitations(sites: list, classes: list[str], shown_classes: int = 4, panels: int = 6) -> Figure:
    """The paper's Fig. 6 for your data: per site, the mean gate of each channel for a few classes and over all
    images; ``panels`` sites spread from the first to the last."""
    picked = sorted({round(i * (len(sites) - 1) / max(panels - 1, 1)) for i in range(min(panels, len(sites)))})
    columns = min(3, len(picked))
    rows = -(-len(picked) // columns)
    fig = _figure(figsize=(5.2 * columns, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, index in zip(axes, picked, strict=False):
        site = sites[index]
        channels = range(site.channels)
        for k, name in enumerate(classes[:shown_classes]):
            ax.plot(channels, site.class_mean[k].tolist(), linewidth=0.8, label=name)
        ax.plot(channels, site.mean.tolist(), color="black", linewidth=1.2, label="all")
        ax.set_title(f"{site.path} (stage {site.stage})", fontsize=9)
        ax.set_xlabel("channel index")
        ax.set_ylabel("mean gate")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(picked):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle("Mean excitation per channel, by class (the paper's Fig. 6)")
    return fig


def gate_summary(sites: list) -> Figure:
    """Class specificity and saturation of every site against its depth."""
    fig = _figure(figsize=(12, 4), layout="constrained")
    specificity, saturation = fig.subplots(1, 2)
    depth = range(1, len(sites) + 1)
    specificity.plot(depth, [min(s.specificity, 1e6) for s in sites], marker="o")
    specificity.set_yscale("symlog", linthresh=0.01)
    specificity.set_title("class specificity (between-class / within-class spread)")
    saturation.plot(depth, [100 * s.saturation for s in sites], marker="o", color="tab:red")
    saturation.set_title("saturation (% of gates within 0.05 of 0 or 1)")
    for ax in (specificity, saturation):
        ax.set_xlabel("SE site, input to output")
        ax.grid(True, alpha=0.3)
    return fig
