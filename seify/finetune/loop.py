"""The fine-tuning loop, shaped like timm's train.py: ``train_one_epoch`` and ``validate`` are free functions over
one ``Training`` (see ``build``), and a ``Trainer`` opens a run folder, builds or resumes the run, and runs the
plan it prints: the starting model scored, then per epoch its phase, a pass over the data, validation, a commit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SeifyError
from ..images import folders
from ..images.scoring import evaluate
from ..options import SEOptions
from . import artifacts, device_data, rng
from .build import Training, build
from .config import FinetuneConfig, Source
from .dist import choose_threads, setup, teardown
from .phases import PHASES, enter_phase, phase_of, train_mode
from .plan import describe, run_info
from .progress import PlainLog
from .resume import SE_OPTIONS, Saved, given_options, open_folder, restore, resumed_config, state_of
from .signals import Stop
from .state import LAST, Progress, RunFolder


@dataclass
class RunResult:
    out: Path
    best_epoch: int
    best_top1: float
    last_top1: float
    epochs_run: int
    stopped_by: str | None = None
    main: bool = True  # False on the other ranks of a distributed run, which print nothing
    start_top1: float | None = None  # the model's val top-1 before fine-tuning (trained models only)
    skipped: list[str] = dataclasses.field(default_factory=list)  # files of DATA that are not readable images


# ---------------------------------------------------------------- one epoch


@dataclass
class Epoch:
    """What one pass over the training data saw."""
    seen: int = 0
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)
    stopped: bool = False


SYNC_EVERY = 25  # steps between host synchronisations on a GPU when --log-every is 0 (per epoch)


def sync_interval(training: Training, config: FinetuneConfig) -> int:
    """Steps between host synchronisations: reading the loss, the accuracy and the ranks' stop flags waits for the
    GPU's queue to drain, so on CUDA it happens every ``--log-every`` steps (as nanoGPT logs); on a CPU, where it
    costs nothing, every step."""
    return (config.log_every or SYNC_EVERY) if training.device.type == "cuda" else 1


def train_one_epoch(net: Callable, training: Training, progress: Progress, config: FinetuneConfig, stop: Stop,
                    log, commit: Callable[[], None], last_good: Callable[[], str], phase: str = "full") -> Epoch:
    """One pass from ``progress``'s batch on, counting into ``progress``; ``commit`` saves every ``save_every``
    steps, and the pass ends early when a signal asks (``stopped``). Loss and accuracy are summed on the device and
    read every ``sync_interval`` steps, when the ranks also agree whether to stop and whether a loss went
    non-finite."""
    images_data, p = training.data, progress
    train_mode(training.model, phase)
    images_data.train_sampler.set_epoch(p.epoch, p.batch_in_epoch * config.batch_size)
    epoch, start, every = Epoch(), time.perf_counter(), sync_interval(training, config)
    tally = Tally(training.device, p.step)
    for images, labels, failed in batches(training, images_data.train_set, images_data.train_sampler, True):
        epoch.failures += undecodable(failed, config.strict_data)
        tally.add(*_train_step(net, training, config, *to_device(training, images, labels)))
        p.batch_in_epoch, p.step, epoch.seen = p.batch_in_epoch + 1, p.step + 1, epoch.seen + len(labels)
        saves = bool(config.save_every) and p.step % config.save_every == 0
        if p.step % every and not saves and not (stop.signum is not None and not training.dist.enabled):
            continue
        epoch.stopped = tally.settle(training, p, stop, last_good)
        lrs = training.lrs()
        log.step(p.batch_in_epoch, p.partial[0] / p.partial[2], 100 * p.partial[1] / p.partial[2],
                 lrs.get("new", lrs.get("trained")), epoch.seen * training.dist.world / (time.perf_counter() - start))
        if epoch.stopped:
            break
        if saves:
            commit()
    if not epoch.stopped:
        tally.settle(training, p, stop, last_good)
    epoch.seconds = time.perf_counter() - start
    return epoch


class Tally:
    """The training loss and correct predictions since the last synchronisation, summed on the device, the first
    step whose loss was not finite (the step counted on the device too), and the images, counted here. Nothing is
    copied to the device per step: a copy from host memory would wait for the GPU's queue."""

    def __init__(self, device: torch.device, step: int):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.step = torch.tensor(float(step), dtype=torch.float64, device=device)
        self.bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)  # (step, loss) or (-1, 0)
        self.images = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        self.step += 1
        self.sums += torch.stack([loss.double() * images, correct.double()])
        first = (self.bad[0] < 0) & ~torch.isfinite(loss)
        self.bad = torch.where(first, torch.stack([self.step, loss.double()]), self.bad)
        self.images += images

    def settle(self, training: Training, p: Progress, stop: Stop, last_good: Callable[[], str]) -> bool:
        """Add the sums into ``p.partial``; refuse a non-finite loss (on any rank); whether any rank must stop."""
        loss_sum, correct, bad_step, bad_loss = torch.cat([self.sums, self.bad]).tolist()
        images, self.images = self.images, 0
        asked, failed = training.dist.all_sum([float(stop.signum is not None), float(bad_step >= 0)],
                                              training.device)
        if failed:
            where = f"at epoch {p.epoch + 1}, step {int(bad_step)}" if bad_step >= 0 else "on another rank"
            raise SeifyError(f"loss became {bad_loss if bad_step >= 0 else 'non-finite'} {where}; stopped. "
                             f"{last_good()}; {unstable(training)}", "lr", "precision")
        p.partial = [p.partial[0] + loss_sum, p.partial[1] + correct, p.partial[2] + images]
        self.sums.zero_()
        return asked > 0


def _train_step(net: Callable, training: Training, config: FinetuneConfig, images, labels
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the batch's mean loss, its correct predictions, its images), the first two on the device."""
    scaler = training.precision.scaler
    with training.precision.autocast():
        logits = net(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    training.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(training.optimizer)
    else:
        loss.backward()
    if config.clip_grad:
        nn.utils.clip_grad_norm_([p for p in training.model.parameters() if p.requires_grad], config.clip_grad)
    if scaler is not None:
        scaler.step(training.optimizer)
        scaler.update()
    else:
        training.optimizer.step()
    training.scheduler.step()
    if training.ema is not None:
        training.ema.update_parameters(training.model)
    return loss.detach(), (logits.argmax(dim=1) == labels).sum(), len(labels)


def validate(training: Training) -> dict:
    """Loss, top-1, top-5 and the confusion matrix of the judged weights (the EMA where there is one) on the
    validation images, summed over the ranks."""
    images = training.data
    images.val_sampler.set_epoch(0)
    return evaluate(training.judged, batches(training, images.val_set, images.val_sampler, False), training.device,
                    len(images.classes), training.precision.autocast, training.dist, images.channels_last)


def batches(training: Training, dataset, sampler: folders.EpochSampler, train: bool):
    """(images, labels, failures) per step, decoded by the loading processes or on the device."""
    images = training.data
    if images.device_transform is None:
        return folders.loader(dataset, images.batch_size, sampler, images.workers, images.pin, train)
    encoded = folders.loader(dataset, images.batch_size, sampler, images.workers, images.pin, train,
                          collate_fn=device_data.collate_encoded)
    return device_data.DeviceBatches(encoded, images.device_transform, training.device, sampler.epoch, train,
                                     dataset.items)


def to_device(training: Training, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(training.device, non_blocking=True)
    if training.data.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(training.device, non_blocking=True)


def undecodable(failed: list, strict: bool) -> list:
    """Images that passed the start-up check but cannot be decoded: skipped, or fatal with ``--strict-data``."""
    if failed and strict:
        path, reason = failed[0]
        raise SeifyError(f"{path} cannot be decoded ({reason}); remove it, or drop {{strict_data}} to skip such "
                         "files", "strict_data")
    return failed


def unstable(training: Training) -> str:
    """What to try when the numbers blow up: a lower learning rate, and full precision if the run is not in it."""
    return "lower {lr}" + (" or use {precision} fp32" if training.precision.dtype is not None else "")


# ---------------------------------------------------------------- a run


class Trainer:
    """One fine-tuning run in ``config.out``, opened (locked, built or resumed) and ready to ``run``;
    ``options`` None trains the plain model (``--no-se``)."""

    def __init__(self, spec: str, data_dir: str, config: FinetuneConfig, options: SEOptions | None = SEOptions(),
                 *, weights: str | None = None, pretrained: bool = False, log=None, explicit: set[str] | None = None,
                 split: tuple | None = None):
        config.check()
        self.source, self.data_dir = Source(spec, options, weights, pretrained), data_dir
        self.folder = RunFolder(config.out)
        self.out = self.folder.out
        self.dist, self.device = setup(config.device)
        self.log = (log or PlainLog)(self.dist.main, config.log_every)
        self._lock = contextlib.ExitStack()
        try:
            self._open(config, explicit, split)
        except BaseException:
            self.close()
            self.folder.abandon()
            raise

    def _open(self, config: FinetuneConfig, explicit: set[str] | None, split) -> None:
        saved = open_folder(self.folder, config, self.source, self.dist,
                            lambda: self._lock.enter_context(self.folder.locked()))
        self.config = config = resumed_config(saved.state, self.source, config, explicit) if saved else config
        self.threads, self.threads_why = choose_threads(config.threads, self.device, self.dist.world,
                                                        saved.recorded("threads") if saved else None)
        torch.set_num_threads(self.threads)
        rng.seed_everything(config.seed + self.dist.rank)  # DDP then broadcasts rank 0's initial weights
        given = given_options(self.source, config) if explicit is None else explicit
        workers = config.workers if config.workers is not None else saved.recorded("workers") if saved else None
        self.training = build(self.source, self.data_dir, config, self.dist, self.device, split=split,
                              resumed_from=saved.folder if saved else None, workers=workers,
                              fresh=set(saved.state["fresh"]) if saved else set(), given=given & SE_OPTIONS)
        self.progress, self.resumed = Progress(), saved is not None
        self.replanned: str | None = None
        if saved:
            self._resume(saved)
        elif self.dist.main:
            self._write_info()

    def _resume(self, saved: Saved) -> None:
        self.progress, self.replanned = restore(self.training, saved, self.config)
        if self.dist.main:  # a kill between a commit and the refresh of the files users open left them behind
            self._publish(saved.folder)
        if not self.complete:
            self.progress.resumes.append(self.progress.position(self.training.data.steps_per_epoch))

    @property
    def model(self) -> nn.Module:
        return self.training.model

    @property
    def prepared(self):
        return self.training.prepared

    @property
    def complete(self) -> bool:
        return self.progress.epoch >= self.config.epochs

    def close(self) -> None:
        self._lock.close()
        teardown(self.dist)

    def run(self) -> RunResult:
        """Score the starting model, then per epoch: enter its phase, train, validate, commit."""
        config, p, log = self.config, self.progress, self.log
        try:
            if self.complete:
                log.line(f"the run in {self.out} is complete ({p.epoch} epochs, best val top-1 {p.best_top1:.2f}% "
                         f"at epoch {p.best_epoch}); nothing to do. To train longer pass a larger --epochs with "
                         "--extend")
                return self._result()
            if self.replanned:
                log.line(self.replanned)
            if self.resumed:
                log.line(f"resuming {self.out} at epoch {p.epoch + 1}, batch {p.batch_in_epoch} (step {p.step})")
            elif config.resume:
                log.line(f"the run in {self.out} stopped before its first checkpoint: starting it from the beginning")
            for line in describe(self.training, self.source, config, self.data_dir,
                                 f"{self.threads} CPU threads ({self.threads_why})"):
                log.line(line)
            with Stop().installed() as stop:
                if not p.history and self.prepared.head_kept:
                    self._score_start()
                net: Callable = self.model
                phase = None
                for epoch_number in range(p.epoch, config.epochs):
                    p.epoch = epoch_number
                    entered = phase_of(self.training, epoch_number)
                    if entered != phase:
                        net, phase = enter_phase(self.training, entered, config.compile), entered
                    log.epoch_start(p.epoch, config.epochs, self.training.data.steps_per_epoch, p.batch_in_epoch,
                                    PHASES[phase])
                    epoch = train_one_epoch(net, self.training, p, config, stop, log, self._commit, self._last_good,
                                            phase)
                    if epoch.stopped:
                        return self._interrupted(stop)
                    self._end_epoch(phase, epoch)
            log.done()
            return self._result()
        finally:
            self.close()

    def _score_start(self) -> None:
        """The starting model's val accuracy: what fine-tuning has to keep (epoch 0 in the metrics)."""
        metrics = validate(self.training)
        self.progress.history.append({"epoch": 0, "phase": "start", "step": 0, "val_loss": metrics["loss"],
                                      "val_top1": metrics["top1"], "val_top5": metrics["top5"]})
        self.log.line(f"before fine-tuning: val top-1 {metrics['top1']:.2f}%, loss {metrics['loss']:.4f}")

    def _end_epoch(self, phase: str, epoch: Epoch) -> None:
        """Validate, add the epoch's metrics row, and commit (the best weights too, where they improved)."""
        p, training = self.progress, self.training
        training.dist.same_buffers(*{id(m): m for m in (training.model, training.judged)}.values())
        metrics = validate(training)
        failures = undecodable([tuple(f) for f in metrics["undecodable"]], self.config.strict_data) + epoch.failures
        if failures:
            self.log.line(f"skipped {len(failures)} image(s) that could not be decoded this epoch (first: "
                          f"{failures[0][0]}: {failures[0][1]})")
        if not math.isfinite(metrics["loss"]):
            raise SeifyError(f"the validation loss became {metrics['loss']} after epoch {p.epoch + 1}; stopped "
                             f"without saving. {self._last_good()}; {unstable(training)}", "lr", "precision")
        loss_sum, correct, images = training.dist.all_sum(p.partial, training.device)
        lrs = training.lrs()
        row = {"epoch": p.epoch + 1, "phase": phase, "step": p.step,
               "train_loss": loss_sum / max(images, 1), "train_top1": 100 * correct / max(images, 1),
               "val_loss": metrics["loss"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
               "lr": lrs.get("new", lrs.get("trained")), "lr_backbone": lrs.get("trained", lrs.get("new")),
               "images_per_sec": epoch.seen * training.dist.world / max(epoch.seconds, 1e-9),
               "seconds": epoch.seconds, "undecodable": len(failures)}
        p.history.append(row)
        p.val_correct = metrics["correct"] or []
        p.epoch, p.batch_in_epoch, p.partial = p.epoch + 1, 0, [0.0, 0.0, 0.0]
        improved = metrics["top1"] > p.best_top1
        if improved:
            p.best_top1, p.best_epoch = metrics["top1"], p.epoch
        self._commit(best_changed=improved, epoch_end=True)
        self.log.epoch_end(row)

    def _commit(self, best_changed: bool = False, epoch_end: bool = False) -> None:
        """Commit a checkpoint (rank 0, with every rank's random state); at the end of an epoch also redraw the
        metrics table and curves."""
        random_states = self.dist.gather(rng.capture(self.device))
        if not self.dist.main:
            return
        recipe, p = self.prepared.recipe, self.progress
        best = (self.training.judged, {**recipe, "top1": p.best_top1, "top5": p.history[-1]["val_top5"],
                                       "epoch": p.best_epoch}) if best_changed else None
        state = state_of(self.training, p, self.config, self.source, self.threads, random_states)
        folder = self.folder.commit(self.model, recipe, best, state, p.history, advice=unstable(self.training))
        self._publish(folder, views=epoch_end)

    def _publish(self, folder: Path, views: bool = True) -> None:
        self.folder.publish(folder)
        if views:
            artifacts.write_views(self.out, self.progress.history, self.progress.resumes, self.out.name)

    def _last_good(self) -> str:
        if self.folder.committed() is None:
            return "Nothing was saved"
        return f"The last good checkpoint is {self.out / LAST}"

    def _interrupted(self, stop: Stop) -> RunResult:
        self._commit()
        name = signal.Signals(stop.signum).name
        self.log.done()
        self.log.line(f"{name}: saved a checkpoint in {self.out} at epoch {self.progress.epoch + 1}, batch "
                      f"{self.progress.batch_in_epoch}")
        return self._result(stopped_by=name)

    def _result(self, stopped_by: str | None = None) -> RunResult:
        p = self.progress
        trained = [r for r in p.history if r["epoch"] > 0]
        start = next((r["val_top1"] for r in p.history if r["epoch"] == 0), None)
        return RunResult(self.out, p.best_epoch, p.best_top1, trained[-1]["val_top1"] if trained else float("nan"),
                         len(trained), stopped_by=stopped_by, main=self.dist.main, start_top1=start,
                         skipped=self.training.data.skipped)

    def _write_info(self) -> None:
        self.folder.write_info(run_info(self.training, self.source, self.config, self.data_dir, self.threads))


def finetune(spec: str, data_dir: str, config: FinetuneConfig, options: SEOptions | None = SEOptions(),
             **kwargs) -> RunResult:
    """Fine-tune ``spec`` on ``data_dir`` (adding SE first where it has none; ``options=None``: plain)."""
    return Trainer(spec, data_dir, config, options, **kwargs).run()
