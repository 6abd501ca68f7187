"""The paper's ablations as data: which arms each of its tables compares, and what it measured for them.

Source: Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", TPAMI version (arXiv:1709.01507v4),
Tables 10-15: SE-ResNet-50 on ImageNet, single-crop top-1 / top-5 error (%), and parameters where the paper gives
them. ``seify compare --arms paper:NAME`` runs a table's arms on your data and prints these figures beside yours.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperArm:
    arm: str  # as --arms writes it
    label: str  # as the paper's table names it
    top1_error: float
    top5_error: float | None  # None where ../shared/reference/PAPER.md does not give it
    params_millions: float | None = None


@dataclass(frozen=True)
class PaperTable:
    name: str
    table: str
    what: str
    arms: tuple[PaperArm, ...]


TABLES = {t.name: t for t in (
    PaperTable("reduction", "Table 10", "reduction ratio r", (
        PaperArm("se:reduction=2", "r = 2", 22.29, 6.00, 45.7), PaperArm("se:reduction=4", "r = 4", 22.25, 6.09, 35.7),
        PaperArm("se:reduction=8", "r = 8", 22.26, 5.99, 30.7), PaperArm("se", "r = 16", 22.28, 6.03, 28.1),
        PaperArm("se:reduction=32", "r = 32", 22.72, 6.20, 26.9), PaperArm("plain", "no SE", 23.30, 6.55, 25.6))),
    PaperTable("squeeze", "Table 11", "squeeze operator", (
        PaperArm("se:squeeze=max", "max pooling", 22.57, 6.09), PaperArm("se", "average pooling", 22.28, 6.03))),
    PaperTable("gate", "Table 12", "excitation operator", (
        PaperArm("se:gate=relu", "ReLU", 23.47, 6.98), PaperArm("se:gate=tanh", "tanh", 23.00, 6.38),
        PaperArm("se", "sigmoid", 22.28, 6.03))),
    PaperTable("stages", "Table 13", "stages with SE", (
        PaperArm("plain", "ResNet-50 (no SE, as in Table 10)", 23.30, 6.55, 25.6),
        PaperArm("se:stages=2", "SE stage 2", 23.03, None, 25.6),
        PaperArm("se:stages=3", "SE stage 3", 23.04, None, 25.7),
        PaperArm("se:stages=4", "SE stage 4", 22.68, None, 26.4), PaperArm("se", "SE all", 22.28, 6.03, 28.1))),
    PaperTable("integration", "Table 14", "integration of the SE block", (
        PaperArm("se", "SE", 22.28, 6.03), PaperArm("se:variant=pre", "SE-PRE", 22.23, 6.00),
        PaperArm("se:variant=post", "SE-POST", 22.78, 6.35),
        PaperArm("se:variant=identity", "SE-Identity", 22.20, 6.15))),
    PaperTable("3x3", "Table 15", "SE after the bottleneck's 3x3 convolution", (
        PaperArm("se", "SE", 22.28, 6.03, 28.1), PaperArm("se:variant=3x3", "SE 3x3", 22.48, 6.02, 25.8))),
)}
PREFIX = "paper:"


def figures(arm: str, table: str | None = None) -> PaperArm | None:
    """The paper's figures for an arm written as --arms writes it: from ``table`` where the arm came from one of
    the paper's tables (``se`` is "average pooling" in Table 11, "sigmoid" in Table 12), else from the first table
    that has it."""
    tables = [TABLES[table]] if table in TABLES else list(TABLES.values())
    return next((a for t in tables for a in t.arms if a.arm == arm), None)
