"""The fine-tuning loop: a warm-up of what is new, then everything; mixed precision, DDP, exact resume."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..errors import SeifyError
from ..models import resolve
from ..options import SEOptions
from . import artifacts, data, device_data, rng
from .config import FinetuneConfig, Source
from .dist import choose_threads, setup, teardown
from .evaluate import evaluate
from .model import Prepared, prepare
from .progress import PlainLog
from .resume import SE_OPTIONS, given_options, resumed_config
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


# ---------------------------------------------------------------- phases and schedule


def _freeze(model: nn.Module, trainable: set[str] | None) -> None:
    """Only ``trainable`` parameters get gradients (all when None); frozen BatchNorm keeps its statistics."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)


def _set_train_mode(model: nn.Module) -> None:
    """Training mode, except for BatchNorm layers whose parameters are all frozen."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and \
                not any(p.requires_grad for p in m.parameters()):
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


def _versions() -> dict:
    import timm
    import torchvision
    return {"seify": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------- resuming


def decodes_on_device(decode: str, device: torch.device) -> bool:
    """``gpu`` needs a CUDA device. ``auto`` stays on the CPU path until the GPU path has been measured faster on
    a GPU (issue 11); it is then to choose the GPU wherever the run is on CUDA."""
    if decode == "gpu" and device.type != "cuda":
        raise SeifyError(f"{{decode}} gpu needs a CUDA device, and this run is on {device.type}; use {{decode}} cpu",
                         "decode")
    return decode == "gpu"


# ---------------------------------------------------------------- the trainer


class Trainer:
    """One fine-tuning run in ``config.out``; ``options`` None trains the plain model (``--no-se``)."""

    def __init__(self, spec: str, data_dir: str, config: FinetuneConfig, options: SEOptions | None = SEOptions(),
                 *, weights: str | None = None, pretrained: bool = False, log=None, explicit: set[str] | None = None,
                 split: tuple | None = None):
        config.check()
        self.source = Source(spec, options, weights, pretrained)
        self.explicit = explicit
        self.data_dir = data_dir
        self.folder = RunFolder(config.out)
        self.out = self.folder.out
        self.dist, self.device = setup(config.device)
        self.log = (log or PlainLog)(self.dist.main, config.log_every)
        self._lock = contextlib.ExitStack()
        try:
            if self.dist.main:
                self._lock.enter_context(self.folder.locked())
            self._build(spec, data_dir, config, explicit, split)
        except BaseException:
            self.close()
            self.folder.abandon()
            raise

    def close(self) -> None:
        self._lock.close()
        teardown(self.dist)

    # ------------------------------------------------------------ builders

    def _build(self, spec, data_dir, config: FinetuneConfig, explicit, split) -> None:
        saved = self._check_folder(config, explicit)
        # what the run chose where the user did not say: chosen again, a resume would not continue it exactly
        self.recorded = {k: saved["state"][k] for k in ("threads", "workers") if k in saved["state"]} if saved else {}
        self.config = config = resumed_config(saved["state"], self.source, config, explicit) if saved else config
        self.threads, self.threads_why = choose_threads(config.threads, self.device, self.dist.world,
                                                        self.recorded.get("threads"))
        torch.set_num_threads(self.threads)
        rng.seed_everything(config.seed + self.dist.rank)  # DDP then broadcasts rank 0's initial weights
        self.classes: list[str]
        self.classes, train, val = split or data.discover(data_dir, config.val_split, config.seed, config.strict_data)
        self.skipped = train.skipped + val.skipped
        self.prepared = self._build_model(saved)
        self.img_size = config.img_size or int(self.prepared.recipe["data_config"]["input_size"][-1])
        self._build_data(train, val)
        self._build_precision()
        self._build_optimizer()
        self.progress = Progress()
        if saved:
            self._restore(saved)
        elif self.dist.main:
            self._write_info(data_dir)

    def _check_folder(self, config: FinetuneConfig, explicit) -> dict | None:
        """The saved state to resume from, or None for a new run; refuses to mix runs or lose files."""
        folder = self.folder
        if self.dist.main and folder.out.is_dir():
            self._check_not_an_input()
            if config.force:
                folder.clear()
            folder.remove_leftovers()
        committed = folder.committed()
        outputs = folder.holds_outputs()
        if config.resume:
            if committed is None:
                hint = "the run there stopped before its first checkpoint; start it again with {force}" \
                    if outputs else "start without {resume}"
                raise SeifyError(f"nothing to resume in {self.out}: {hint}", "force", "resume")
            state, rows = folder.read(committed)
            return {"state": state, "rows": rows, "folder": committed}
        if outputs:
            what = "a run" if committed is not None or "run.json" in outputs else f"files a run writes " \
                                                                                    f"({', '.join(outputs)})"
            raise SeifyError(f"{self.out} already holds {what}; pass {{resume}} to continue it or {{force}} to "
                             "replace it, or choose another folder", "resume", "force")
        return None

    def _check_not_an_input(self) -> None:
        """--force clears the run's outputs: never when MODEL or --weights is one of them."""
        for path in (self.source.model, self.source.weights):
            if path and Path(path).exists() and (Path(path).resolve().parent == self.out.resolve()
                                                 or self.out.resolve() in Path(path).resolve().parents):
                raise SeifyError(f"{path} is inside {self.out}, which this run writes; copy it elsewhere or "
                                 "choose another {out}", "out")

    def _build_model(self, saved: dict | None) -> Prepared:
        if saved:
            loaded = resolve(str(saved["folder"] / LAST))
            assert loaded.recipe is not None
            prepared = Prepared(loaded.model, loaded.recipe, set(saved["state"]["fresh"]))
        else:
            src = self.source
            given = given_options(src, self.config) if self.explicit is None else self.explicit
            prepared = prepare(src.model, self.classes, src.se, weights=src.weights, pretrained=src.pretrained,
                               new_head=self.config.new_head, given=given & SE_OPTIONS)
        if prepared.recipe.get("classes") != self.classes:
            raise SeifyError(f"the run in {self.out} was trained on other classes than the data holds")
        prepared.model.to(self.device)
        return prepared

    @staticmethod
    def _all_params(model: nn.Module) -> set[str]:
        return {name for name, _ in model.named_parameters()}

    def _build_data(self, train, val) -> None:
        config, cuda = self.config, self.device.type == "cuda"
        cfg = self.prepared.recipe["data_config"]
        self.augmentation = data.Augmentation.choose(config.aug, self.img_size, config.crop_scale, config.hflip)
        self.prepared.recipe["data_config"] = {**cfg, "input_size": [3, self.img_size, self.img_size]}
        # where the validation images came from, so that evaluate scores the same ones by default
        held_out = None if data.has_val_folder(self.data_dir) else config.val_split
        self.prepared.recipe["finetune"] = {"img_size": self.img_size, "augmentation": self.augmentation.preset,
                                            "data": str(Path(self.data_dir).resolve()), "val_split": held_out,
                                            "seed": config.seed}
        self.device_transform = None
        self.train_set: data.ImageDataset | device_data.EncodedDataset
        self.val_set: data.ImageDataset | device_data.EncodedDataset
        if decodes_on_device(config.decode, self.device):
            self.device_transform = device_data.DeviceTransform.from_config(cfg, self.img_size, self.augmentation,
                                                                            config.seed)
            self.train_set, self.val_set = device_data.EncodedDataset(train.items), device_data.EncodedDataset(
                val.items)
        else:
            self.train_set = data.ImageDataset(train.items, data.transforms(cfg, self.img_size, self.augmentation))
            self.val_set = data.ImageDataset(val.items, data.transforms(cfg, self.img_size))
        self.train_sampler = data.EpochSampler(len(self.train_set), True, config.seed, self.dist.rank,
                                               self.dist.world)
        self.val_sampler = data.EpochSampler(len(self.val_set), False, config.seed, self.dist.rank, self.dist.world)
        self.workers = config.workers if config.workers is not None else \
            self.recorded.get("workers", data.default_workers(self.device))
        self.pin = cuda
        self.steps_per_epoch = len(self.train_sampler) // config.batch_size
        if self.steps_per_epoch == 0:
            raise SeifyError(f"{{batch_size}} {config.batch_size} is larger than the {len(self.train_sampler)} "
                             f"training images{' per process' if self.dist.enabled else ''}; lower it",
                             "batch_size")
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        if self.channels_last:
            self.prepared.model.to(memory_format=torch.channels_last)

    def _build_precision(self) -> None:
        self.autocast, self.amp_dtype, scaled = _precision(self.config, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if scaled else None

    @property
    def model(self) -> nn.Module:
        return self.prepared.model

    @property
    def recipe(self) -> dict:
        return self.prepared.recipe

    @property
    def frozen_epochs(self) -> int:
        """Epochs that train only what is new: none when nothing is, or when everything is (random weights)."""
        fresh = self.prepared.fresh
        return self.config.se_warmup_epochs if fresh and fresh != self._all_params(self.model) else 0

    def _build_optimizer(self) -> None:
        config, fresh = self.config, self.prepared.fresh
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if n not in fresh], "lr": config.lr * config.backbone_lr_scale,
                   "name": "trained"},
                  {"params": [p for n, p in named if n in fresh], "lr": config.lr, "name": "new"}]
        groups = [g for g in groups if g["params"]]
        self.optimizer: torch.optim.Optimizer
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay, nesterov=config.momentum > 0)
        self.scheduler = self._schedule(config.epochs)
        self.ema = None
        if config.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                                     use_buffers=True)

    def _schedule(self, epochs: int):
        warmup = round(self.config.lr_warmup_epochs * self.steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(epochs * self.steps_per_epoch, warmup))

    def _lrs(self) -> dict[str, float]:
        return {g["name"]: lr for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True)}

    # ------------------------------------------------------------ state

    def _state(self) -> dict:
        state = {"progress": dataclasses.asdict(self.progress), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng.capture(self.device),
                 "config": self.config.to_dict(), "source": self.source.to_dict(), "fresh": sorted(self.prepared.fresh),
                 "steps_per_epoch": self.steps_per_epoch, "threads": self.threads, "workers": self.workers}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _restore(self, saved: dict) -> None:
        state = saved["state"]
        self.progress = Progress(**state["progress"])
        self.progress.history = saved["rows"]
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise SeifyError(f"{{resume}}: the data now gives {self.steps_per_epoch} steps per epoch where the run "
                             f"had {state['steps_per_epoch']}; resume with the same data and batch size", "resume")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        rng.restore(state["rng"], self.device)
        if self.dist.main:  # a kill between a commit and the refresh of the files users open left them behind
            self._publish(saved["folder"])
        planned = state["config"]["epochs"]
        if self.config.epochs != planned:
            self._replan(planned)
        self.complete = self.progress.epoch >= self.config.epochs
        if self.complete:
            return
        self.progress.resumes.append(self.progress.position(self.steps_per_epoch))
        self.log.line(f"resuming {self.out} at epoch {self.progress.epoch + 1}, batch "
                      f"{self.progress.batch_in_epoch} (step {self.progress.step})")

    def _replan(self, planned: int) -> None:
        """A resume with another --epochs: refused unless --extend, which re-plans the cosine schedule."""
        epochs, done = self.config.epochs, self.progress.position(self.steps_per_epoch)
        if epochs < done:
            raise SeifyError(f"{{epochs}} {epochs}: the run in {self.out} has already trained {done:g} epochs",
                             "epochs")
        before = self.scheduler.get_last_lr()[-1]
        replanned = self._schedule(epochs)
        replanned.load_state_dict({**self.scheduler.state_dict(), "lr_lambdas": [None] * len(replanned.lr_lambdas)})
        factor = replanned.lr_lambdas[0](self.progress.step)
        after = replanned.base_lrs[-1] * factor
        change = (f"the run was planned for {planned} epochs; {{epochs}} {epochs} stretches its cosine schedule to "
                  f"end at step {epochs * self.steps_per_epoch}, so the learning rate at step {self.progress.step} "
                  f"goes from {before:.3g} to {after:.3g}")
        if not self.config.extend:
            raise SeifyError(f"{{resume}}: {change}; pass {{extend}} to continue that way", "resume", "epochs",
                             "extend")
        for group, base in zip(self.optimizer.param_groups, replanned.base_lrs, strict=True):
            group["initial_lr"], group["lr"] = base, base * factor
        self.scheduler = replanned
        self.log.line(SeifyError(change, "epochs").render(lambda n: "--" + n.replace("_", "-")))

    def _write_info(self, data_dir: str) -> None:
        self.folder.write_info({
            "versions": _versions(), "source": self.source.to_dict(), "config": self.config.to_dict(),
            "data": str(data_dir), "classes": self.classes, "train_images": len(self.train_set),
            "val_images": len(self.val_set), "skipped_files": len(self.skipped), "img_size": self.img_size,
            "augmentation": dataclasses.asdict(self.augmentation), "device": str(self.device),
            "world_size": self.dist.world, "threads": self.threads, "workers": self.workers,
            "frozen_epochs": self.frozen_epochs, "lr_warmup_epochs": self.config.lr_warmup_epochs,
            "new_parameters": len(self.prepared.fresh),
            "parameters": len(self._all_params(self.model)), "notes": self.prepared.notes,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _commit(self, best_changed: bool, epoch_end: bool = False) -> None:
        """Commit a checkpoint (rank 0); at the end of an epoch also redraw the metrics table and curves."""
        if not self.dist.main:
            return
        best = None
        if best_changed:
            model = self.ema.module if self.ema is not None else self.model
            best = (model, {**self.recipe, "top1": self.progress.best_top1, "epoch": self.progress.best_epoch})
        folder = self.folder.commit(self.model, self.recipe, best, self._state(), self.progress.history,
                                    advice=self._unstable())
        self._publish(folder, views=epoch_end)

    def _publish(self, folder: Path, views: bool = True) -> None:
        self.folder.publish(folder)
        if views:
            artifacts.write_views(self.out, self.progress.history, self.progress.resumes, self.out.name)

    # ------------------------------------------------------------ training

    def _wrapped(self) -> Callable:
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
            raise SeifyError(f"loss became {loss_value} at epoch {self.progress.epoch + 1}, step {self.progress.step};"
                             f" stopped. {self._last_good()}; {self._unstable()}", "lr", "precision")
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

    def _unstable(self) -> str:
        """What to try when the numbers blow up: a lower learning rate, and full precision if the run is not in it."""
        return "lower {lr}" + (" or use {precision} fp32" if self.amp_dtype is not None else "")

    def _last_good(self) -> str:
        if self.folder.committed() is None:
            return "Nothing was saved"
        return f"The last good checkpoint is {self.out / LAST}"

    def run(self) -> RunResult:
        stop = _Stop()
        try:
            if getattr(self, "complete", False):
                return self._already_complete()
            with stop.installed():
                return self._run(stop)
        finally:
            self.close()

    def _already_complete(self) -> RunResult:
        p = self.progress
        self.log.line(f"the run in {self.out} is complete ({p.epoch} epochs, best val top-1 {p.best_top1:.2f}% at "
                      f"epoch {p.best_epoch}); nothing to do. To train longer pass a larger --epochs with --extend")
        return self._result()

    def _result(self, stopped_by: str | None = None) -> RunResult:
        p = self.progress
        trained = [r for r in p.history if r["epoch"] > 0]
        start = next((r["val_top1"] for r in p.history if r["epoch"] == 0), None)
        return RunResult(self.out, p.best_epoch, p.best_top1, trained[-1]["val_top1"] if trained else float("nan"),
                         len(trained), stopped_by=stopped_by, main=self.dist.main, start_top1=start,
                         skipped=self.skipped)

    def _run(self, stop: _Stop) -> RunResult:
        config, p = self.config, self.progress
        self._announce()
        if not p.history and self.prepared.head_kept:
            self._evaluate_start()
        net, phase = None, None
        for epoch in range(p.epoch, config.epochs):
            p.epoch = epoch
            warming = epoch < self.frozen_epochs
            if warming != phase:
                phase = warming
                _freeze(self.model, self.prepared.fresh if warming else None)
                net = self._wrapped()
            _set_train_mode(self.model)
            self.train_sampler.set_epoch(epoch, p.batch_in_epoch * config.batch_size)
            batches = self._batches(self.train_set, self.train_sampler, training=True)
            failures = []
            start, seen = time.perf_counter(), 0
            self.log.epoch_start(epoch, config.epochs, self.steps_per_epoch, p.batch_in_epoch,
                                 "new parts only (the rest frozen)" if warming else "all layers")
            for images, labels, failed in batches:
                failures += self._undecodable(failed)
                images, labels = self._batch(images, labels)
                loss_sum, correct, stopping = self._train_step(net, images, labels, stop)
                p.partial = [p.partial[0] + loss_sum, p.partial[1] + correct, p.partial[2] + len(labels)]
                p.batch_in_epoch += 1
                p.step += 1
                seen += len(labels)
                rate = seen * self.dist.world / (time.perf_counter() - start)
                self.log.step(p.batch_in_epoch, p.partial[0] / p.partial[2], 100 * p.partial[1] / p.partial[2],
                              self._lrs().get("new", self._lrs().get("trained")), rate)
                if stopping:
                    return self._interrupted(stop)
                if config.save_every and p.step % config.save_every == 0:
                    self._commit(best_changed=False)
            self._end_epoch("warmup" if warming else "full", seen, time.perf_counter() - start, failures)
        self.log.done()
        return self._result()

    def _evaluate_start(self) -> None:
        """The starting model's val accuracy: what fine-tuning has to keep (epoch 0 in the metrics)."""
        metrics = self._validate()
        self.progress.history.append({"epoch": 0, "phase": "start", "step": 0, "val_loss": metrics["loss"],
                                      "val_top1": metrics["top1"], "val_top5": metrics["top5"]})
        self.log.line(f"before fine-tuning: val top-1 {metrics['top1']:.2f}%, loss {metrics['loss']:.4f}")

    def _validate(self) -> dict:
        self.val_sampler.set_epoch(0)
        batches = self._batches(self.val_set, self.val_sampler, training=False)
        judged = self.ema.module if self.ema is not None else self.model
        return evaluate(judged, batches, self.device, len(self.classes), self.autocast, self.dist,
                        self.channels_last)

    def _batches(self, dataset, sampler: data.EpochSampler, training: bool):
        """(images, labels, failures) per step, decoded by the loading processes or on the device."""
        if self.device_transform is None:
            return data.loader(dataset, self.config.batch_size, sampler, self.workers, self.pin, training)
        encoded = data.loader(dataset, self.config.batch_size, sampler, self.workers, self.pin, training,
                              collate_fn=device_data.collate_encoded)
        return device_data.DeviceBatches(encoded, self.device_transform, self.device, sampler.epoch, training,
                                         dataset.items)

    def _undecodable(self, failed: list) -> list:
        if failed and self.config.strict_data:
            path, reason = failed[0]
            raise SeifyError(f"{path} cannot be decoded ({reason}); remove it, or drop {{strict_data}} to skip such "
                             "files", "strict_data")
        return failed

    def _end_epoch(self, phase: str, seen: int, seconds: float, failures: list) -> None:
        p = self.progress
        metrics = self._validate()
        failures = self._undecodable([tuple(f) for f in metrics["undecodable"]]) + failures
        if failures:
            path, reason = failures[0]
            self.log.line(f"skipped {len(failures)} image(s) that could not be decoded this epoch (first: {path}: "
                          f"{reason})")
        if not math.isfinite(metrics["loss"]):
            raise SeifyError(f"the validation loss became {metrics['loss']} after epoch {p.epoch + 1}; stopped "
                             f"without saving. {self._last_good()}; {self._unstable()}", "lr", "precision")
        loss_sum, correct, images = self.dist.all_sum(p.partial, self.device)
        lrs = self._lrs()
        row = {"epoch": p.epoch + 1, "phase": phase, "step": p.step,
               "train_loss": loss_sum / max(images, 1), "train_top1": 100 * correct / max(images, 1),
               "val_loss": metrics["loss"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
               "lr": lrs.get("new", lrs.get("trained")), "lr_backbone": lrs.get("trained", lrs.get("new")),
               "images_per_sec": seen * self.dist.world / max(seconds, 1e-9), "seconds": seconds,
               "undecodable": len(failures)}
        p.history.append(row)
        p.epoch += 1
        p.batch_in_epoch, p.partial = 0, [0.0, 0.0, 0.0]
        improved = metrics["top1"] > p.best_top1
        if improved:
            p.best_top1, p.best_epoch = metrics["top1"], p.epoch
        self._commit(best_changed=improved, epoch_end=True)
        self.log.epoch_end(row)

    def _interrupted(self, stop: _Stop) -> RunResult:
        self._commit(best_changed=False)
        name = signal.Signals(stop.signum).name
        self.log.done()
        self.log.line(f"{name}: saved a checkpoint in {self.out} at epoch {self.progress.epoch + 1}, batch "
                      f"{self.progress.batch_in_epoch}")
        return self._result(stopped_by=name)

    def _announce(self) -> None:
        n_skipped = len(self.skipped)
        self.log.line(f"{len(self.train_set)} training and {len(self.val_set)} validation images, "
                      f"{len(self.classes)} classes" + (f"; skipped {n_skipped} unreadable files (first: "
                                                        f"{self.skipped[0]})" if n_skipped else ""))
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self.log.line(f"device {self.device} x{self.dist.world}, {amp}"
                      f"{', channels_last' if self.channels_last else ''}{', compiled' if self.config.compile else ''}"
                      f", {self.threads} CPU threads ({self.threads_why}), {self.steps_per_epoch} steps per epoch")
        self.log.line(f"model: {'plain (no SE)' if self.source.se is None else 'with SE'}, "
                      f"{self.img_size} px; augmentation: {self.augmentation.describe()}")
        if self.config.val_split is not None and data.has_val_folder(self.data_dir):
            self.log.line(f"--val-split {self.config.val_split:g} is not used: {self.data_dir} has train/ and val/")
        for note in self.prepared.notes:
            self.log.line(note)
        self.log.line(self._plan())

    def _plan(self) -> str:
        c, fresh = self.config, self.prepared.fresh
        if fresh == self._all_params(self.model):
            return f"plan: random weights, so everything trains from the start at lr {c.lr:g}"
        if not fresh:
            return f"plan: nothing new to warm up; everything trains at lr {c.lr * c.backbone_lr_scale:g}"
        count = sum(p.numel() for n, p in self.model.named_parameters() if n in fresh)
        if self.frozen_epochs >= c.epochs:
            return (f"plan: all {c.epochs} epoch(s) train only the new parts ({count:,} parameters) at lr {c.lr:g}; "
                    f"the trained layers stay frozen (--epochs {c.epochs} is not more than --se-warmup-epochs "
                    f"{c.se_warmup_epochs})")
        warm = f"{self.frozen_epochs} epoch(s) train only the new parts ({count:,} parameters), then " \
            if self.frozen_epochs else ""
        return (f"plan: {warm}everything trains, the new parts at lr {c.lr:g} and the trained ones at "
                f"{c.lr * c.backbone_lr_scale:g}")


def finetune(spec: str, data_dir: str, config: FinetuneConfig, options: SEOptions | None = SEOptions(),
             **kwargs) -> RunResult:
    """Fine-tune ``spec`` on ``data_dir`` (adding SE first where it has none; ``options=None``: plain)."""
    return Trainer(spec, data_dir, config, options, **kwargs).run()


def exit_code(result: RunResult) -> int:
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.stopped_by or "", 0)
