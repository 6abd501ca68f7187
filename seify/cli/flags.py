"""The commands' flags: built from the API's option dataclasses (SEOptions, FinetuneConfig), each in its group of
``--help``, and the few that belong to one command; text parsed into the API's types and limits."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Annotated, Optional

import typer

from ..errors import SeifyError, flag
from ..limits import MAX_CHANNELS, MAX_IMAGE_SIZE
from ..options import DEVICE_HELP, DEVICES, OUTPUT, SE_BLOCK, SOURCE, parse_value

_CLI_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "str | None": Optional[str],
              "int | None": Optional[int], "float | None": Optional[float], "bool | None": Optional[bool],
              "tuple[int, ...] | None": Optional[str], "tuple[float, float] | None": Optional[str]}


def _parameter(f: dataclasses.Field, default_owner) -> inspect.Parameter:
    kind = _CLI_TYPES[str(f.type)]
    flags = f.metadata.get("flags") or ((flag(f.name),) if str(f.type) == "bool" else ())
    default = getattr(default_owner, f.name)
    if str(f.type).startswith("tuple") and default is not None:
        default = ",".join(map(str, default))
    option = typer.Option(*flags, help=f.metadata["help"], rich_help_panel=f.metadata["panel"])
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, option])


def _from_text(f: dataclasses.Field, value):
    """A flag's value in the dataclass's own type: comma lists become tuples."""
    return parse_value(str(f.type), f.name, value) if isinstance(value, str) and str(f.type).startswith("tuple") \
        else value


def with_options(cls, into: str, skip: tuple[str, ...] = ()):
    """Add ``cls``'s fields to a command as flags; the command gets ``into`` = (instance, names passed)."""
    names = [f for f in dataclasses.fields(cls) if f.name not in skip]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        wants_context = "ctx" in signature.parameters

        @functools.wraps(func)
        def wrapper(**kwargs):
            ctx = kwargs["ctx"] if wants_context else kwargs.pop("ctx")
            values = {f.name: _from_text(f, kwargs.pop(f.name)) for f in names}
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


# Flags shared by several commands.
Model = Annotated[str, typer.Argument(help="timm name (resnet50, resnet50.a1_in1k, hf-hub:...), "
                                           "torchvision:NAME, or a file written by seify.")]
Data = Annotated[str, typer.Argument(help="Image folder: DATA/train/<class>/* and DATA/val/<class>/* (or use "
                                          "--val-split).")]
Weights = Annotated[Optional[str], typer.Option(help="Checkpoint to load: .safetensors, or .pth/.pt/.bin "
                                                     "state_dict (also under state_dict/model/state_dict_ema).",
                                                rich_help_panel=SOURCE)]
Pretrained = Annotated[bool, typer.Option(help="Use timm's or torchvision's pretrained weights (needs network).",
                                          rich_help_panel=SOURCE)]
NumClasses = Annotated[Optional[int], typer.Option(help="Classifier size (default: taken from the weights).",
                                                   rich_help_panel=SOURCE)]
WithSE = Annotated[bool, typer.Option("--se/--no-se", help="--no-se fine-tunes the plain model with the same "
                                                           "settings: the baseline.", rich_help_panel=SOURCE)]
Device = Annotated[Optional[str], typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICES)]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.",
                                    rich_help_panel=OUTPUT)]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.", rich_help_panel=OUTPUT)]
Include = Annotated[Optional[str], typer.Option(help="Only the gates whose module path matches this regex.",
                                                rich_help_panel=SE_BLOCK)]
Exclude = Annotated[Optional[str], typer.Option(help="Leave out the gates whose module path matches this regex.",
                                                rich_help_panel=SE_BLOCK)]


def whole_numbers(text: str, what: str) -> tuple[int, ...]:
    """``1,32`` as (1, 32): positive whole numbers, comma-separated."""
    values = parse_value("tuple[int, ...]", what, text)
    if any(v <= 0 for v in values):
        raise SeifyError(f"{{{what}}} must be positive, not {text!r}", what)
    return values


def input_size(text: str | None) -> tuple[int, int, int] | None:
    """``3,224,224`` as (C, H, W), within seify's limits."""
    if text is None:
        return None
    size = whole_numbers(text, "input_size")
    if len(size) != 3:
        raise SeifyError(f"{{input_size}} is C,H,W (three numbers), not {text!r}", "input_size")
    if size[0] > MAX_CHANNELS or max(size[1:]) > MAX_IMAGE_SIZE:
        raise SeifyError(f"{{input_size}} {text} is too large (at most {MAX_CHANNELS} channels and "
                         f"{MAX_IMAGE_SIZE} px a side)", "input_size")
    return size[0], size[1], size[2]
