"""The fine-tuning loop: two phases, mixed precision, DDP, checkpoints that survive anything but lost epochs."""
from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..errors import SeifyError
from ..models import classifier_name, reset_classifier
from ..se import SqueezeExcite
from ..surgery import SEOptions
from . import artifacts, data
from .dist import Dist, setup, teardown
from .evaluate import evaluate
from .progress import PlainLog

STATE = "state.pt"
LAST = "last.safetensors"
BEST = "best.safetensors"


@dataclass
class FinetuneConfig:
    out: str = "runs/seify"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    se_warmup_epochs: int = 1
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    ema_decay: float | None = None
    img_size: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    val_split: float | None = None
    strict_data: bool = False
    seed: int = 0
    workers: int | None = None
    device: str | None = None
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    save_every: int = 0
    log_every: int = 50
    resume: bool = False
    force: bool = False

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise SeifyError("--epochs and --batch-size must be at least 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise SeifyError(f"--optimizer must be adamw or sgd, not {self.optimizer!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise SeifyError(f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if not self.lr > 0 or self.se_warmup_epochs < 0 or self.warmup_epochs < 0:
            raise SeifyError("--lr must be > 0 and the warm-up epochs at least 0")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise SeifyError(f"--crop-scale must be two fractions 0 < min <= max <= 1, not {self.crop_scale}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise SeifyError("--ema-decay must be between 0 and 1")


@dataclass
class RunResult:
    out: Path
    best_epoch: int
    best_top1: float
    last_top1: float
    epochs_run: int
    stopped_by: str | None = None
    main: bool = True  # False on the other ranks of a distributed run, which print nothing


class _Stop:
    """SIGINT/SIGTERM ask the loop to save and leave at the next step."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def prepare_model(spec: str, options: SEOptions, classes: list[str], *, weights=None, pretrained=False,
                  img_size=None):
    """(model with SE and a head for ``classes``, recipe): a plain model is converted first."""
    from ..api import convert
    from ..models import create, is_seify_file
    if is_seify_file(spec):
        loaded = create(spec)
        model, recipe = loaded.model, copy.deepcopy(loaded.recipe)
    else:
        result = convert(spec, options, weights=weights, pretrained=pretrained)
        model, recipe = result.model, result.recipe()
    if recipe.get("classes") != classes:
        reset_classifier(model, len(classes))
    recipe.update(num_classes=len(classes), classes=classes)
    if img_size is not None:
        recipe["data_config"] = {**recipe["data_config"], "input_size": [3, img_size, img_size]}
    return model, recipe


def _param_groups(model: nn.Module):
    """(backbone, SE + classifier) parameters: the second group trains from the first step."""
    head = classifier_name(model)
    fresh_ids = {id(p) for m in model.modules() if isinstance(m, SqueezeExcite) for p in m.parameters()}
    if head:
        fresh_ids |= {id(p) for p in model.get_submodule(head).parameters()}
    backbone = [p for p in model.parameters() if id(p) not in fresh_ids]
    fresh = [p for p in model.parameters() if id(p) in fresh_ids]
    return backbone, fresh


def _freeze_backbone(model: nn.Module, frozen: bool) -> None:
    backbone, _ = _param_groups(model)
    for p in backbone:
        p.requires_grad_(not frozen)


def _set_train_mode(model: nn.Module, backbone_frozen: bool) -> None:
    """Training mode, except that a frozen backbone's BatchNorm keeps its running statistics."""
    model.train()
    if backbone_frozen:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(id(p) in trainable for p in
                                                                           m.parameters()):
                m.eval()


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _precision(config: FinetuneConfig, device: torch.device):
    """(autocast factory, dtype or None, needs a grad scaler)."""
    wanted = config.precision
    if wanted == "auto":
        wanted = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if wanted == "fp32":
        return contextlib.nullcontext, None, False
    dtype = torch.bfloat16 if wanted == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype, wanted == "fp16" and device.type == "cuda"


def _check_out(out: Path, config: FinetuneConfig) -> None:
    has_run = out.exists() and any((out / f).exists() for f in (LAST, BEST, STATE, "metrics.jsonl"))
    if config.resume and not (out / STATE).exists():
        raise SeifyError(f"nothing to resume in {out}: it has no {STATE}; start without --resume")
    if has_run and not config.resume and not config.force:
        raise SeifyError(f"{out} already holds a run; pass --resume to continue it or --force to start over")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, spec: str, data_dir: str, config: FinetuneConfig, options: SEOptions = SEOptions(), *,
                 weights=None, pretrained=False, log=None):
        config.check()
        self.config, self.out = config, Path(config.out)
        self.dist, self.device = setup(config.device)
        self.log = (log or PlainLog)(self.dist.main, config.log_every)
        if self.dist.main:
            _check_out(self.out, config)
        _seed_everything(config.seed + self.dist.rank)  # DDP then broadcasts rank 0's initial weights
        self.classes, train, val = data.discover(data_dir, config.val_split, config.seed, config.strict_data)
        self.skipped = train.skipped + val.skipped
        if config.resume:
            self.model, self.recipe = checkpoint.load_with_recipe(self.out / LAST)
        else:
            self.model, self.recipe = prepare_model(spec, options, self.classes, weights=weights,
                                                    pretrained=pretrained, img_size=config.img_size)
        if self.recipe.get("classes") != self.classes:
            raise SeifyError(f"{self.out / LAST} was trained on other classes than {data_dir} holds")
        self.model.to(self.device)
        cuda = self.device.type == "cuda"
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.autocast, self.amp_dtype, scaled = _precision(config, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if scaled else None
        cfg = self.recipe["data_config"]
        workers = data.default_workers() if config.workers is None else config.workers
        self.train_set = data.ImageDataset(train.items, data.transforms(cfg, config.img_size, training=True,
                                                                       crop_scale=config.crop_scale))
        self.val_set = data.ImageDataset(val.items, data.transforms(cfg, config.img_size, training=False))
        self.train_sampler = data.EpochSampler(len(self.train_set), True, config.seed, self.dist.rank,
                                               self.dist.world)
        self.val_sampler = data.EpochSampler(len(self.val_set), False, config.seed, self.dist.rank, self.dist.world)
        self.workers, self.pin = workers, cuda
        self.steps_per_epoch = max(1, len(self.train_sampler) // config.batch_size)
        backbone, fresh = _param_groups(self.model)
        groups = [{"params": backbone, "lr": config.lr * config.backbone_lr_scale},
                  {"params": fresh, "lr": config.lr}]
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay, nesterov=True)
        total = config.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total, round(config.warmup_epochs * self.steps_per_epoch)))
        self.ema = None
        if config.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                                     use_buffers=True)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of the epoch in progress
        self.best_top1, self.best_epoch = -1.0, 0  # best_epoch counts from 1
        self.history: list[dict] = []
        if config.resume:
            self._restore()

    # ------------------------------------------------------------ state

    def _state(self) -> dict:
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                 "partial": self.partial, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": _rng_state(self.device), "config": asdict(self.config)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _restore(self) -> None:
        state = torch.load(self.out / STATE, map_location="cpu", weights_only=True)
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.partial, self.best_top1, self.best_epoch = state["partial"], state["best_top1"], state["best_epoch"]
        _freeze_backbone(self.model, self.epoch < self.config.se_warmup_epochs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.device)
        self.history = [r for r in artifacts.read_metrics(self.out) if r["epoch"] <= self.epoch]
        self.log.line(f"resuming {self.out} at epoch {self.epoch + 1}, batch {self.batch_in_epoch} "
                      f"(step {self.step})")

    def _save(self, top1: float | None = None) -> None:
        """last (and best) weights, then the state that points at them: a kill between leaves a valid pair."""
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.model, self.out / LAST, self.recipe, force=True)
        if top1 is not None and top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, self.epoch
            best = self.ema.module if self.ema is not None else self.model
            checkpoint.save(best, self.out / BEST, {**self.recipe, "top1": top1, "epoch": self.epoch},
                            force=True)
        checkpoint.atomic_write(self.out / STATE, lambda tmp: torch.save(self._state(), tmp), force=True)

    # ------------------------------------------------------------ training

    def _wrapped(self) -> nn.Module:
        model = self.model
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if self.config.compile else model

    def _batch(self, images, labels):
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _train_step(self, net, images, labels, stop: _Stop) -> tuple[float, int, bool]:
        with self.autocast():
            logits = net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        local_loss = loss.item()
        loss_value, stop_flag = self.dist.all_sum([local_loss, float(stop.signum is not None)], self.device)
        if not math.isfinite(loss_value):
            raise SeifyError(f"loss became {loss_value} at epoch {self.epoch + 1}, step {self.step}; stopped. "
                             f"The last good checkpoint is {self.out / LAST}; lower --lr or use --precision fp32")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.config.clip_grad:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.config.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        correct = (logits.argmax(dim=1) == labels).sum().item()
        return local_loss * len(labels), correct, stop_flag > 0

    def run(self) -> RunResult:
        stop = _Stop()
        try:
            with stop.installed():
                return self._run(stop)
        finally:
            teardown(self.dist)

    def _run(self, stop: _Stop) -> RunResult:
        config = self.config
        self._announce()
        net, frozen = None, None
        for epoch in range(self.epoch, config.epochs):
            self.epoch = epoch
            phase_frozen = epoch < config.se_warmup_epochs
            if phase_frozen != frozen:
                frozen = phase_frozen
                _freeze_backbone(self.model, frozen)
                net = self._wrapped()
            _set_train_mode(self.model, frozen)
            self.train_sampler.set_epoch(epoch, self.batch_in_epoch * config.batch_size)
            batches = data.loader(self.train_set, config.batch_size, self.train_sampler, self.workers, self.pin,
                                  drop_last=True)
            start, seen = time.perf_counter(), 0
            self.log.epoch_start(epoch, config.epochs, self.steps_per_epoch, self.batch_in_epoch,
                                 "SE + head (backbone frozen)" if frozen else "all layers")
            for images, labels in batches:
                images, labels = self._batch(images, labels)
                loss_sum, correct, stopping = self._train_step(net, images, labels, stop)
                self.partial = [self.partial[0] + loss_sum, self.partial[1] + correct,
                                self.partial[2] + len(labels)]
                self.batch_in_epoch += 1
                self.step += 1
                seen += len(labels)
                rate = seen * self.dist.world / (time.perf_counter() - start)
                self.log.step(self.batch_in_epoch, self.partial[0] / self.partial[2],
                              100 * self.partial[1] / self.partial[2], self.scheduler.get_last_lr()[1], rate)
                if stopping:
                    return self._interrupted(stop)
                if config.save_every and self.step % config.save_every == 0:
                    self._save()
            self._end_epoch(frozen, seen, time.perf_counter() - start)
        self.log.done()
        return RunResult(self.out, self.best_epoch, self.best_top1, self.history[-1]["val_top1"],
                         len(self.history), main=self.dist.main)

    def _end_epoch(self, frozen: bool, seen: int, seconds: float) -> None:
        cfg = self.config
        self.val_sampler.set_epoch(0)
        val_batches = data.loader(self.val_set, cfg.batch_size, self.val_sampler, self.workers, self.pin,
                                  drop_last=False)
        judged = self.ema.module if self.ema is not None else self.model
        metrics = evaluate(judged, val_batches, self.device, len(self.classes), self.autocast, self.dist,
                           self.channels_last)
        loss_sum, correct, images = self.dist.all_sum(self.partial, self.device)
        row = {"epoch": self.epoch + 1, "phase": "se_warmup" if frozen else "full",
               "train_loss": loss_sum / max(images, 1), "train_top1": 100 * correct / max(images, 1),
               "val_loss": metrics["loss"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
               "lr": self.scheduler.get_last_lr()[1], "lr_backbone": self.scheduler.get_last_lr()[0],
               "images_per_sec": seen * self.dist.world / max(seconds, 1e-9), "seconds": seconds}
        self.history.append(row)
        self.epoch += 1
        self.batch_in_epoch, self.partial = 0, [0.0, 0.0, 0.0]
        self._save(metrics["top1"])
        if self.dist.main:
            artifacts.write_metrics(self.out, self.history)
        self.log.epoch_end(row)

    def _interrupted(self, stop: _Stop) -> RunResult:
        self._save()
        name = signal.Signals(stop.signum).name
        self.log.done()
        self.log.line(f"{name}: saved {self.out / LAST} and {self.out / STATE} at epoch {self.epoch + 1}, batch "
                      f"{self.batch_in_epoch}; continue with --resume")
        return RunResult(self.out, self.best_epoch, self.best_top1, float("nan"), len(self.history),
                         stopped_by=name, main=self.dist.main)

    def _announce(self) -> None:
        n_skipped = len(self.skipped)
        self.log.line(f"{len(self.train_set)} training and {len(self.val_set)} validation images, "
                      f"{len(self.classes)} classes" + (f"; skipped {n_skipped} unreadable files (first: "
                                                        f"{self.skipped[0]})" if n_skipped else ""))
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self.log.line(f"device {self.device} x{self.dist.world}, {amp}"
                      f"{', channels_last' if self.channels_last else ''}{', compiled' if self.config.compile else ''}"
                      f", {self.steps_per_epoch} steps per epoch")


def finetune(spec: str, data_dir: str, config: FinetuneConfig, options: SEOptions = SEOptions(), **kwargs):
    """Fine-tune ``spec`` (converted to SE first if it has none) on ``data_dir``; see ``FinetuneConfig``."""
    return Trainer(spec, data_dir, config, options, **kwargs).run()


def exit_code(result: RunResult) -> int:
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.stopped_by, 0)



