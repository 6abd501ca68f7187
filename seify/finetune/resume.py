"""Continuing a run: the command that started it plus ``--resume`` continues it, whatever it was given.

A run is made of its source (MODEL, ``--weights``, ``--pretrained``, ``--se/--no-se`` and the SE options) and
its config (every ``FinetuneConfig`` field), recorded together in every checkpoint. On ``--resume`` each option
this command names is compared with the run's: one that may change (``CHANGEABLE_ON_RESUME``) is taken, one whose
value differs is refused in one line naming the flag and both values, and the rest come from the run.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import SeifyError, shown
from ..options import SEOptions
from .config import CHANGEABLE_ON_RESUME, FinetuneConfig, Source, resolved_file

SE_OPTIONS = frozenset(f.name for f in dataclasses.fields(SEOptions))
CONFIG_OPTIONS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig))
SOURCE_OPTIONS = frozenset({"model", "weights", "pretrained", "se"})


def given_options(source: Source, config: FinetuneConfig) -> set[str]:
    """The options that differ from their defaults: what a caller of the Python API asked for."""
    default_source, default_config = Source(source.model), FinetuneConfig()
    names = {name for name in ("weights", "pretrained") if getattr(source, name) != getattr(default_source, name)}
    names |= {"se"} if source.se is None else {n for n in SE_OPTIONS if getattr(source.se, n) != getattr(
        SEOptions(), n)}
    return names | {n for n in CONFIG_OPTIONS if getattr(config, n) != getattr(default_config, n)}


def resumed_config(state: dict, source: Source, config: FinetuneConfig, given: set[str] | None) -> FinetuneConfig:
    """The run's own config, with the changeable options this command gives; refuses any other that differs.

    ``state`` is the committed checkpoint's; ``given`` names the options the user passed (None: those that
    differ from their defaults).
    """
    names = (given_options(source, config) if given is None else set(given)) - CHANGEABLE_ON_RESUME
    saved = state["source"]
    saved_config = FinetuneConfig.from_dict(state["config"])
    if not _same_file(source.model, saved["model"], saved.get("model_file")):
        raise SeifyError(f"{{resume}}: this run fine-tunes {saved['model']}, not {source.model}; pass the same "
                         "MODEL, or start a new run in another folder", "resume")
    for name in sorted(names - {"model"}):
        _check_same(name, source, config, saved, saved_config)
    merged = dataclasses.replace(saved_config, resume=True, force=False, extend=config.extend)
    changed = (given_options(source, config) if given is None else set(given)) & CHANGEABLE_ON_RESUME
    for name in sorted(changed & CONFIG_OPTIONS - {"resume", "force", "extend"}):
        setattr(merged, name, getattr(config, name))
    return merged


def _check_same(name: str, source: Source, config: FinetuneConfig, saved: dict, saved_config: FinetuneConfig):
    if name in CONFIG_OPTIONS:
        new, old = getattr(config, name), getattr(saved_config, name)
    elif name == "weights":
        if _same_file(source.weights, saved["weights"], saved.get("weights_file")):
            return
        new, old = source.weights, saved["weights"]
    elif name in ("pretrained", "se"):
        new = source.pretrained if name == "pretrained" else source.se is not None
        old = saved["pretrained"] if name == "pretrained" else saved["se"] is not None
    elif name in SE_OPTIONS:
        if source.se is None or saved["se"] is None:  # a plain run has no SE options to keep
            return
        new, old = getattr(source.se, name), getattr(SEOptions.from_dict(saved["se"]), name)
    else:
        raise AssertionError(f"{name} is not a fine-tuning option")
    if new != old:
        raise _differs(name, new, old)


def _differs(name: str, new, old) -> SeifyError:
    """``--resume: --name X differs from the run's Y``: one line naming the flag and both values."""
    if isinstance(new, bool) or isinstance(old, bool):
        what = f"{{{name}}} is {_on(new)} here and {_on(old)} in the run"
    else:
        what = f"{{{name}}} {shown(new)} differs from the run's {shown(old)}"
    return SeifyError(f"{{resume}}: {what}; drop it to continue with the run's settings, or start a new run in "
                      "another folder", "resume", name)


def _on(value) -> str:
    return "on" if value else "off"


def _same_file(given: str | None, recorded: str | None, recorded_file: str | None) -> bool:
    """The same MODEL or weights: the same name, or the same file however its path is spelt."""
    if given == recorded:
        return True
    if given is None or recorded is None:
        return False
    here = resolved_file(given)
    there = recorded_file or resolved_file(recorded)
    if here is None or there is None:
        return False
    return here == there or (Path(there).exists() and os.path.samefile(here, there))
