"""The SE design space as one frozen value: the paper's options (Sec. 6, Tables 10-15) with timm's rounding.

Declared here once, with each option's help text: the CLI builds its flags from these fields, and recipes
store them. Importing this module does not import torch, so ``seify --help`` stays fast.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import SeifyError
from .limits import check_choice, check_pattern

PLACEMENTS = ("auto", "residual", "module", "activation")
VARIANTS = ("standard", "pre", "post", "identity", "3x3")
SQUEEZES = ("avg", "max")
GATES = ("sigmoid", "hard-sigmoid", "tanh", "relu")
INITS = ("identity", "identity-gate", "paper")
PRESERVING = ("identity", "identity-gate")  # the inits whose converted model computes what the original did
BLOCKS = ("se", "scale")
SE_ONLY = ("reduction", "divisor", "min_channels", "squeeze", "gate", "init")  # what a scale block has none of
# The groups of a command's --help that options are shown in.
SOURCE, SE_BLOCK, DATA, SCHEDULE = "Source", "SE block", "Data and augmentation", "Schedule"
DEVICES, OUTPUT, COMPARISON = "Precision and devices", "Output and logging", "Comparison"
EXPORTER = "Exporter"
DEVICE_HELP = "cpu or cuda[:N] (default: cuda if present)."
FOLD_LATENCY = True  # seify fold times the model before and after unless told not to: the API's default and the CLI's


def option(default, help: str, *flags: str, panel: str = SE_BLOCK):
    """A dataclass field that the CLI turns into a flag (``flags`` overrides the flag's spelling), shown in its
    ``--help`` under ``panel``."""
    return field(default=default, metadata={"help": help, "flags": flags, "panel": panel})


@dataclass(frozen=True)
class SEOptions:
    """Where SE blocks go and what they are."""
    at: str = option("auto", "Where SE goes: residual (on each residual branch, before the sum), module (on the "
                              "output of each multi-branch module or conv block: Inception, MobileNet), activation "
                              "(after each conv nonlinearity: VGG), auto (residual where the model has residual "
                              "sums, module for Inception-style models, else activation).")
    variant: str = option("standard", "Residual integration: standard, pre, post, identity (paper Table 14), 3x3 "
                                      "(after the bottleneck's 3x3 conv, Table 15).")
    reduction: float = option(16, "Reduction ratio r: the SE block's hidden width is C/r.")
    divisor: int = option(8, "Round the hidden width to a multiple of this (timm: 8).")
    min_channels: int = option(8, "Smallest hidden width.")
    squeeze: str = option("avg", "Squeeze pooling: avg or max.")
    gate: str = option("sigmoid", "Excitation gate: sigmoid, hard-sigmoid, tanh or relu (the paper's Table 12).")
    stages: tuple[int, ...] | None = option(None, "Only these stages, paper numbering: 2,3,4 is conv2_x..conv4_x "
                                                   "(a stage's number is log2 of its stride).")
    include: str | None = option(None, "Only sites whose SE module path matches this regex.")
    exclude: str | None = option(None, "Skip sites whose SE module path matches this regex.")
    init: str = option("identity", "identity: the converted model computes exactly what the original did (the "
                                    "fresh gate's x2 folded into a neighbouring layer); identity-gate: the same, the "
                                    "x2 kept in the gate, the base's tensors untouched (what --adapter uses); paper: "
                                    "plain random init, for training from scratch.")
    block: str = option("se", "The block put at each site: se, or scale (a static per-channel scale and shift, "
                              "identity at the start: SE without input-conditioning, the control for SE).")

    def __post_init__(self):
        for name, allowed in (("at", PLACEMENTS), ("variant", VARIANTS), ("squeeze", SQUEEZES),
                              ("gate", GATES), ("init", INITS), ("block", BLOCKS)):
            check_choice(getattr(self, name), name, allowed)
        for name, low, high in (("reduction", 1, 4096), ("divisor", 1, 1024), ("min_channels", 1, 4096)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise SeifyError(f"{{{name}}} must be a number from {low} to {high}, not {value!r}", name)
        for name in ("divisor", "min_channels"):
            if not isinstance(getattr(self, name), int):
                raise SeifyError(f"{{{name}}} must be a whole number, not {getattr(self, name)!r}", name)
        if self.stages is not None and (not isinstance(self.stages, tuple) or not self.stages or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 12 for s in self.stages)):
            raise SeifyError(f"{{stages}} must be stage numbers from 0 to 12, not {self.stages!r}", "stages")
        if self.variant != "standard" and self.at not in ("auto", "residual"):
            raise SeifyError(f"{{variant}} {self.variant} places SE around residual sums; it needs {{at}} residual",
                             "variant", "at")
        for name in ("include", "exclude"):
            check_pattern(getattr(self, name), name)
        if self.block == "scale":
            for name in SE_ONLY:
                if getattr(self, name) != getattr(SEOptions, name):
                    raise SeifyError(f"{{{name}}} is an option of SE blocks; {{block}} scale has none", name, "block")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages) if self.stages is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SEOptions":
        if not isinstance(d, dict):
            raise SeifyError(f"SE options must be a mapping of option names to values, not {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise SeifyError(f"unknown SE option(s) {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("stages"), list):
            d["stages"] = tuple(d["stages"])
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "SEOptions":
        """Options written ``reduction=8:stages=4,5`` (name=value pairs joined by ':', as in ``--arms``)."""
        return cls(**parse_pairs(text))


def parse_pairs(text: str) -> dict:
    """``reduction=8:stages=4,5`` as {option name: value}, each name checked against ``SEOptions``'s fields."""
    kinds = {f.name: str(f.type) for f in fields(SEOptions)}
    values = {}
    for pair in filter(None, text.split(":")):
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in kinds:
            raise SeifyError(f"{pair!r} is not an SE option; write name=value with a name from {', '.join(kinds)}")
        values[name] = parse_value(kinds[name], name, value.strip())
    return values


def parse_value(kind: str, name: str, text: str):
    """A value of an option declared as ``kind`` (its field's type), from its text as typed on a command line."""
    try:
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("tuple[int"):
            return tuple(int(v) for v in text.split(","))
        if kind.startswith("tuple[float, float]"):
            low, high = (float(v) for v in text.split(","))
            return low, high
    except ValueError:
        what = {"tuple[int": "comma-separated whole numbers", "tuple[flo": "two comma-separated numbers"}.get(
            kind[:9], "a number")
        raise SeifyError(f"{{{name}}} must be {what}, not {text!r}", name) from None
    return text
