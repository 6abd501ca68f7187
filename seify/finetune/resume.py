"""Continuing a run: the command that started it plus ``--resume`` continues it, whatever it was given.

A run is made of its source (MODEL, ``--weights``, ``--pretrained``, ``--se/--no-se`` and the SE options) and
its config (every ``FinetuneConfig`` field), recorded together in every checkpoint. On ``--resume`` each option
this command names is compared with the run's: one that may change (``CHANGEABLE_ON_RESUME``) is taken, one whose
value differs is refused in one line naming the flag and both values, and the rest come from the run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import SeifyError, first_line, flag, shown
from ..models import files_read
from ..options import SEOptions
from . import rng
from .build import Training, schedule
from .config import CHANGEABLE_ON_RESUME, FinetuneConfig, Source, resolved_file
from .dist import Dist
from .state import Progress, RunFolder

SE_OPTIONS = frozenset(f.name for f in dataclasses.fields(SEOptions))
CONFIG_OPTIONS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig))


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
    asked = given_options(source, config) if given is None else set(given)
    names = asked - CHANGEABLE_ON_RESUME
    saved = state["source"]
    saved_config = FinetuneConfig.from_dict(state["config"])
    if not _same_file(source.model, saved["model"], saved.get("model_file")):
        raise SeifyError(f"{{resume}}: this run fine-tunes {saved['model']}, not {source.model}; pass the same "
                         "MODEL, or start a new run in another folder", "resume")
    for name in sorted(names - {"model"}):
        _check_same(name, source, config, saved, saved_config)
    merged = dataclasses.replace(saved_config, resume=True, force=False, extend=config.extend)
    for name in sorted(asked & CHANGEABLE_ON_RESUME & CONFIG_OPTIONS - {"resume", "force", "extend"}):
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


# ---------------------------------------------------------------- the run folder and the state it holds


@dataclass
class Saved:
    """The committed checkpoint a run resumes from."""
    state: dict
    rows: list[dict]
    folder: Path

    def recorded(self, name: str):
        """What the run chose where the user did not say (``threads``, ``workers``): chosen again under another
        load, a resume would not continue the run exactly."""
        return self.state.get(name)


def open_folder(folder: RunFolder, config: FinetuneConfig, source: Source, dist: Dist,
                lock: Callable[[], object]) -> Saved | None:
    """The checkpoint to resume from, or None for a new run; refuses to mix runs or to lose files. Rank 0 takes the
    ``lock``, clears and decides; every rank gets its decision, or its error, before reading the folder."""
    committed = dist.decided(lambda: _decide(folder, config, source, lock))
    if committed is None:
        return None
    state, rows = folder.read(Path(committed))
    return Saved(state, rows, Path(committed))


def _decide(folder: RunFolder, config: FinetuneConfig, source: Source, lock: Callable[[], object]) -> str | None:
    """The committed checkpoint's folder to resume from, or None: what rank 0 decides for every rank."""
    lock()
    out = folder.out
    if out.is_dir():
        _check_not_an_input(out, source)
        if config.force:
            folder.clear()
        folder.remove_leftovers()
    committed = folder.committed()
    outputs = folder.holds_outputs()
    if config.resume:
        if committed is None and not outputs:
            raise SeifyError(f"nothing to resume in {out}: start without {{resume}}", "resume")
        if committed is None:  # stopped before its first checkpoint: nothing to lose, so it starts over
            folder.clear()
        return str(committed) if committed is not None else None
    if outputs:
        what = "a run" if committed is not None or "run.json" in outputs else \
            f"files a run writes ({', '.join(outputs)})"
        raise SeifyError(f"{out} already holds {what}; pass {{resume}} to continue it or {{force}} to replace it, "
                         "or choose another folder", "resume", "force")
    return None


def _check_not_an_input(out: Path, source: Source) -> None:
    """--force clears the run's outputs: never when MODEL or --weights (however spelt) is one of them."""
    for path in files_read(source.model, source.weights):
        if path.resolve() == out.resolve() or out.resolve() in path.resolve().parents:
            raise SeifyError(f"{path} is inside {out}, which this run writes; copy it elsewhere or choose another "
                             "{out}", "out")


def state_of(training: Training, progress: Progress, config: FinetuneConfig, source: Source, threads: int,
             random_states: list[dict]) -> dict:
    """What a checkpoint holds besides the weights: enough to continue bit for bit (``random_states``: every
    rank's, in rank order)."""
    state = {"progress": dataclasses.asdict(progress), "optimizer": training.optimizer.state_dict(),
             "scheduler": training.scheduler.state_dict(), "rng": random_states,
             "config": config.to_dict(), "source": source.to_dict(), "fresh": sorted(training.prepared.fresh),
             "steps_per_epoch": training.data.steps_per_epoch, "threads": threads, "workers": training.data.workers}
    if training.ema is not None:
        state["ema"] = training.ema.state_dict()
    if training.precision.scaler is not None:
        state["scaler"] = training.precision.scaler.state_dict()
    return state


def restore(training: Training, saved: Saved, config: FinetuneConfig) -> tuple[Progress, str | None]:
    """(where the run is, a line on a re-planned schedule or None), with the optimizer, schedule, EMA, scaler and
    random state put back as the checkpoint holds them."""
    state, steps = saved.state, training.data.steps_per_epoch
    progress = Progress(**{**state["progress"], "history": saved.rows})
    if state["steps_per_epoch"] != steps:
        raise SeifyError(f"{{resume}}: the data now gives {steps} steps per epoch where the run had "
                         f"{state['steps_per_epoch']}; resume with the same data and batch size", "resume")
    try:
        training.optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # another seify grouped the parameters otherwise
        raise SeifyError(f"{{resume}}: the run's optimizer state does not fit this seify's ({first_line(e)}); resume "
                         "it with the seify that started it, or start again with {force}", "resume", "force") from e
    training.scheduler.load_state_dict(state["scheduler"])
    if training.ema is not None and "ema" in state:
        training.ema.load_state_dict(state["ema"])
    if training.precision.scaler is not None and "scaler" in state:
        training.precision.scaler.load_state_dict(state["scaler"])
    _restore_random_state(state["rng"], training.dist.rank, training.device)
    planned = state["config"]["epochs"]
    replanned = _replan(training, progress, config, planned) if config.epochs != planned else None
    return progress, replanned


def _restore_random_state(saved: list | dict, rank: int, device: torch.device) -> None:
    """This rank's random state; 0.1.0 kept rank 0's alone (a dict), which other ranks must not take."""
    if isinstance(saved, dict):
        saved = [saved]
    if rank < len(saved):
        rng.restore(saved[rank], device)


def _replan(training: Training, progress: Progress, config: FinetuneConfig, planned: int) -> str:
    """A resume with another --epochs: refused unless --extend, which stretches the cosine schedule."""
    epochs, steps, done = config.epochs, training.data.steps_per_epoch, progress.position(training.data.steps_per_epoch)
    if epochs < done:
        raise SeifyError(f"{{epochs}} {epochs}: the run in {config.out} has already trained {done:g} epochs", "epochs")
    before = training.scheduler.get_last_lr()[-1]
    replanned = schedule(training.optimizer, config, epochs, steps)
    replanned.load_state_dict({**training.scheduler.state_dict(), "lr_lambdas": [None] * len(replanned.lr_lambdas)})
    factor = replanned.lr_lambdas[0](progress.step)
    change = (f"the run was planned for {planned} epochs; {{epochs}} {epochs} stretches its cosine schedule to end "
              f"at step {epochs * steps}, so the learning rate at step {progress.step} goes from {before:.3g} to "
              f"{replanned.base_lrs[-1] * factor:.3g}")
    if not config.extend:
        raise SeifyError(f"{{resume}}: {change}; pass {{extend}} to continue that way", "resume", "epochs", "extend")
    for group, base in zip(training.optimizer.param_groups, replanned.base_lrs, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor
    training.scheduler = replanned
    return SeifyError(change, "epochs").render(flag)
