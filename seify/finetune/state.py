"""A run folder whose checkpoints are whole or absent, whatever kills the process, and the state they hold.

A checkpoint is one folder, ``checkpoints/ckpt-<step>``, holding the weights (``last.safetensors``), the best
weights so far (``best.safetensors``, a hard link when they did not change), the optimizer, schedule, counters
and random state (``state.pt``) and every metrics row so far (``metrics.jsonl``). It is written under a temporary
name and renamed; then ``checkpoint.json``, the pointer, is replaced (the commit). Only then are the files users
open refreshed from it: ``last.safetensors``, ``best.safetensors``, ``metrics.jsonl``/``.csv`` and ``curves.png``
in the run folder. A kill at any instant leaves the previous commit or the new one, never a mix; leftovers of an
interrupted write are removed when the next run in the folder starts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save
from ..errors import SeifyError, first_line
from ..writes import atomic_write, check_folder_writable, write_error

POINTER = "checkpoint.json"
CHECKPOINTS = "checkpoints"
LAST, BEST, STATE, METRICS = "last.safetensors", "best.safetensors", "state.pt", "metrics.jsonl"
RUN_INFO = "run.json"
LOCK = ".lock"
# What a run writes in its folder: a folder holding any of these but no run is the user's, not ours.
OUTPUTS = (POINTER, CHECKPOINTS, LAST, BEST, METRICS, "metrics.csv", "curves.png", RUN_INFO)
_HELD: set[str] = set()  # lock files this process holds


def _in_use(out: Path, holder: str) -> SeifyError:
    return SeifyError(f"{out} is in use by a running fine-tune (pid {holder or 'unknown'}); wait for it to end or "
                      "choose another output folder")


@dataclass
class Progress:
    """Where a run is: the counters, the best so far, the metrics of finished epochs, and its resumes."""
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0
    step: int = 0
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, images
    best_top1: float = -1.0
    best_epoch: int = 0  # counts from 1
    history: list[dict] = field(default_factory=list)
    resumes: list[float] = field(default_factory=list)  # where in epochs (fractional) the run was resumed
    # per validation image, 1 where the judged model was right after the last finished epoch (one process only):
    # what compare pairs two arms on
    val_correct: list[int] = field(default_factory=list)

    def position(self, steps_per_epoch: int) -> float:
        return self.epoch + self.batch_in_epoch / max(steps_per_epoch, 1)


class RunFolder:
    """The ``--out`` folder of one run: locked while a run writes it, checkpoints committed atomically."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    @property
    def pointer(self) -> Path:
        return self.out / POINTER

    def committed(self) -> Path | None:
        """The folder of the last committed checkpoint, or None."""
        try:
            name = json.loads(self.pointer.read_text())["checkpoint"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SeifyError(f"{self.pointer} is damaged ({e}); start the run again with {{force}}", "force") from e
        folder = self.out / CHECKPOINTS / Path(name).name
        if not (folder / STATE).is_file():
            raise SeifyError(f"{self.pointer} names {folder}, which is missing; start again with {{force}}",
                             "force")
        return folder

    def holds_outputs(self) -> list[str]:
        return [name for name in OUTPUTS if (self.out / name).exists()] if self.out.is_dir() else []

    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock on the folder while this process writes it.

        A POSIX record lock (``lockf``): the kernel drops it the moment this process dies, and the processes it
        forks (data loaders) do not inherit it, so a killed run's folder is free at once even while its loading
        processes wind down. Such a lock does not exclude its own process, and closing any descriptor of the lock
        file would drop it, so this process's own holdings are kept in ``_HELD`` and checked before opening.
        """
        if self.out.exists() and not self.out.is_dir():
            raise SeifyError(f"{{out}} {self.out} is a file; name a folder for the run", "out")
        existing = next(p for p in (self.out, *self.out.parents) if p.exists())
        check_folder_writable(existing)
        key = str(self.out.resolve() / LOCK)
        if key in _HELD:
            raise _in_use(self.out, str(os.getpid()))
        self._created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise _in_use(self.out, os.pread(fd, 64, 0).decode(errors="replace").strip()) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _HELD.add(key)
            try:
                yield self
            finally:
                _HELD.discard(key)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """After a refused start: remove the folders ``locked`` created, where nothing but the lock is in them."""
        for folder in getattr(self, "_created", []):
            if [p.name for p in folder.iterdir()] in ([], [LOCK]):
                (folder / LOCK).unlink(missing_ok=True)
                folder.rmdir()
        self._created = []

    def remove_leftovers(self) -> None:
        """Temporary files of an interrupted write, and checkpoints that were never committed."""
        keep = self.committed()
        for tmp in self.out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        folder = self.out / CHECKPOINTS
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry != keep:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def clear(self) -> None:
        """Start over (``--force``): the previous run's outputs go, anything else in the folder stays."""
        for name in OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def commit(self, model: nn.Module, recipe: dict, best: tuple[nn.Module, dict] | None, state: dict,
               history: list[dict], advice: str = "lower {lr}") -> Path:
        """Write one checkpoint folder and point at it. ``best`` is None when the best weights did not change;
        ``advice`` is what the message of non-finite weights suggests."""
        _check_finite(model, "the weights", advice)
        if best is not None:
            _check_finite(best[0], "the best weights", advice)
        previous = self.committed()
        number = int(previous.name.split("-")[1]) + 1 if previous is not None else 1
        folder = self.out / CHECKPOINTS / f"ckpt-{number:06d}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save(model, tmp / LAST, recipe)
            if best is not None:
                save(best[0], tmp / BEST, best[1])
            elif previous is not None and (previous / BEST).exists():
                _link_or_copy(previous / BEST, tmp / BEST)
            torch.save(state, tmp / STATE)
            (tmp / METRICS).write_text("".join(json.dumps(r) + "\n" for r in history))
            _sync_folder(tmp)
            shutil.rmtree(folder, ignore_errors=True)  # an uncommitted folder of that number from a killed run
            os.replace(tmp, folder)
            record = {"checkpoint": folder.name, "step": state["progress"]["step"]}
            atomic_write(self.pointer, lambda t: Path(t).write_text(json.dumps(record) + "\n"), force=True)
        except Exception as e:
            # asked before the partial files go: a full disk may be told only by its free space
            cause = e.__cause__ if isinstance(e, SeifyError) and e.__cause__ is not None else e
            problem = write_error(cause, folder.parent) or (first_line(e) if isinstance(e, SeifyError) else None)
            shutil.rmtree(tmp, ignore_errors=True)
            if problem is None:
                raise
            raise SeifyError(f"{problem}; the previous checkpoint in {self.out} is kept") from e
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return folder

    def publish(self, folder: Path) -> None:
        """Refresh the files users open (last, best, metrics) from a committed checkpoint."""
        for name in (LAST, BEST, METRICS):
            source = folder / name
            if source.exists():
                atomic_write(self.out / name, functools.partial(_link_to, source), force=True)

    def read(self, folder: Path) -> tuple[dict, list[dict]]:
        """(state, metrics rows) of a committed checkpoint; the state loads without running pickled code."""
        try:
            state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SeifyError(f"{folder / STATE} is not a checkpoint seify can read safely ({e.__class__.__name__}); "
                             "start again with {force}", "force") from e
        rows = [json.loads(line) for line in (folder / METRICS).read_text().splitlines() if line.strip()]
        return state, rows

    def write_info(self, info: dict) -> None:
        atomic_write(self.out / RUN_INFO, lambda t: Path(t).write_text(json.dumps(info, indent=2) + "\n"),
                     force=True)

    def read_info(self) -> dict | None:
        path = self.out / RUN_INFO
        return json.loads(path.read_text()) if path.is_file() else None


def _check_finite(model: nn.Module, what: str, advice: str) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SeifyError(f"{what} hold non-finite values ({name}); nothing was saved over the last good "
                             f"checkpoint; {advice}", "lr", "precision")


def _link_to(source: Path, tmp: str) -> None:
    _link_or_copy(source, Path(tmp), replace=True)


def _link_or_copy(src: Path, dst: Path, replace: bool = False) -> None:
    if replace and dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sync_folder(folder: Path) -> None:
    """Flush the files and the folder, so a crash of the machine (not just the process) keeps them too."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
