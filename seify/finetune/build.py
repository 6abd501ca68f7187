"""What a run trains with, built in one place: ``build`` returns the model, the data, the optimizer, the schedule,
the EMA and the precision as one ``Training``.

Two names for two warm-ups: ``se_warmup_epochs`` train only what is new (the SE blocks just inserted, a new head)
with the rest frozen, the metrics' "warmup" phase; ``lr_warmup_epochs`` ramp the learning rate up before the
cosine schedule (``--warmup-epochs``, as in timm).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import read_recipe
from ..device import native_bf16
from ..errors import SeifyError
from ..images import folders
from ..images.scoring import name_digest
from ..models import resolve
from ..models.spec import names_files
from ..se import SiteBlock
from . import device_data
from .config import FinetuneConfig, Source
from .dist import Dist
from .model import Prepared, parameter_names, prepare
from .state import LAST


@dataclass
class Precision:
    autocast: Callable  # a factory of autocast contexts
    dtype: torch.dtype | None  # None: fp32
    scaler: torch.amp.GradScaler | None  # fp16 on CUDA

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


@dataclass
class Data:
    """The images a run trains and validates on, and how they reach the model."""
    classes: list[str]
    img_size: int
    augmentation: folders.Augmentation
    train_set: folders.ImageDataset | device_data.EncodedDataset
    val_set: folders.ImageDataset | device_data.EncodedDataset
    train_sampler: folders.EpochSampler
    val_sampler: folders.EpochSampler
    workers: int
    pin: bool
    channels_last: bool
    device_transform: device_data.DeviceTransform | None  # --decode gpu
    skipped: list[str]  # files of DATA that are not readable images
    batch_size: int
    steps_per_epoch: int = field(init=False)  # whole batches of a full epoch (the sampler shrinks mid-epoch)

    def __post_init__(self):
        self.steps_per_epoch = len(self.train_sampler) // self.batch_size


@dataclass
class Training:
    """Everything a run trains with."""
    prepared: Prepared
    data: Data
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.optim.swa_utils.AveragedModel | None
    precision: Precision
    device: torch.device
    dist: Dist
    se_warmup_epochs: int  # epochs that train only what is new: none when nothing is, or everything is

    @property
    def model(self) -> nn.Module:
        return self.prepared.model

    @property
    def judged(self) -> nn.Module:
        """The weights validation scores and ``best`` keeps: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def lrs(self) -> dict[str, float]:
        return {g["name"]: float(lr) for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(),
                                                      strict=True)}


def build(source: Source, data_dir: str, config: FinetuneConfig, dist: Dist, device: torch.device, *,
          resumed_from: Path | None, fresh: set[str], workers: int | None, given: set[str], split=None) -> Training:
    """The model (``source`` prepared, or the committed checkpoint ``resumed_from`` with its ``fresh`` parameters),
    the data, the optimizer and schedule, the EMA and the precision of a run."""
    classes, train, val = split or folders.discover(data_dir, config.val_split, config.seed, config.strict_data)
    prepared = _model(source, classes, config, resumed_from, fresh, given)
    prepared.model.to(device)
    images = _data(prepared, classes, train, val, data_dir, config, dist, device, workers)
    if images.channels_last:
        prepared.model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(prepared, config)
    ema = None
    if config.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(prepared.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    everything = parameter_names(prepared.model)
    warms_up = prepared.fresh and prepared.fresh != everything and prepared.trains is None
    return Training(prepared, images, optimizer, schedule(optimizer, config, config.epochs, images.steps_per_epoch),
                    ema, precision(config, device), device, dist, config.se_warmup_epochs if warms_up else 0)


def _model(source: Source, classes: list[str], config: FinetuneConfig, resumed_from: Path | None, fresh: set[str],
           given: set[str]) -> Prepared:
    if resumed_from is not None:
        recipe = read_recipe(resumed_from / LAST)
        assert recipe is not None
        loaded = resolve(str(resumed_from / LAST), **adapter_base(source)) if recipe.get("adapter") else \
            resolve(str(resumed_from / LAST))
        prepared = Prepared(loaded.model, recipe, fresh)
    else:
        prepared = prepare(source.model, classes, source.se, weights=source.weights, pretrained=source.pretrained,
                           new_head=config.new_head, given=given, adapter=config.adapter,
                           own_gates=config.own_gates)
    if prepared.recipe.get("classes") != classes:
        raise SeifyError(f"the run in {config.out} was trained on other classes than the data holds")
    return prepared


def adapter_base(source: Source) -> dict:
    """How a run's adapter files are given their base: MODEL itself where it is a whole model (a seify file or a
    folder), else its weights."""
    if names_files(source.model):
        return {"weights": source.model}
    return {"weights": source.weights, "pretrained": source.pretrained}


def decodes_on_device(decode: str, device: torch.device) -> bool:
    """``gpu`` needs a CUDA device. ``auto`` stays on the CPU path until the GPU path has been measured faster on
    a GPU (issue 11); it is then to choose the GPU wherever the run is on CUDA."""
    if decode == "gpu" and device.type != "cuda":
        raise SeifyError(f"{{decode}} gpu needs a CUDA device, and this run is on {device.type}; use {{decode}} cpu",
                         "decode")
    return decode == "gpu"


def _data(prepared: Prepared, classes, train, val, data_dir: str, config: FinetuneConfig, dist: Dist,
          device: torch.device, workers: int | None) -> Data:
    """The datasets and samplers; the model's recipe learns the size it trains at and where its validation came
    from, so that evaluate and profile default to them."""
    cfg = prepared.recipe["data_config"]
    img_size = config.img_size or int(cfg["input_size"][-1])
    augmentation = folders.Augmentation.choose(config.aug, img_size, config.crop_scale, config.hflip)
    prepared.recipe["data_config"] = {**cfg, "input_size": [3, img_size, img_size]}
    prepared.recipe["finetune"] = {"img_size": img_size, "augmentation": augmentation.preset,
                                   "data_fingerprint": folders.fingerprint(data_dir, classes, train, val),
                                   "seed": config.seed, "config": config.portable(),
                                   "val_split": None if folders.has_val_folder(data_dir) else config.val_split,
                                   "held_out": None if folders.has_val_folder(data_dir) else
                                   sorted(name_digest(data_dir, path) for path, _ in val.items)}
    transform = None
    train_set: folders.ImageDataset | device_data.EncodedDataset
    val_set: folders.ImageDataset | device_data.EncodedDataset
    if decodes_on_device(config.decode, device):
        transform = device_data.DeviceTransform.from_config(cfg, img_size, augmentation, config.seed)
        train_set, val_set = device_data.EncodedDataset(train.items), device_data.EncodedDataset(val.items)
    else:
        train_set = folders.ImageDataset(train.items, folders.transforms(cfg, img_size, augmentation), config.seed)
        val_set = folders.ImageDataset(val.items, folders.transforms(cfg, img_size))
    cuda = device.type == "cuda"
    images = Data(classes, img_size, augmentation, train_set, val_set,
                  folders.EpochSampler(len(train_set), True, config.seed, dist.rank, dist.world),
                  folders.EpochSampler(len(val_set), False, config.seed, dist.rank, dist.world),
                  workers if workers is not None else folders.default_workers(device), cuda,
                  cuda if config.channels_last is None else config.channels_last, transform,
                  train.skipped + val.skipped, config.batch_size)
    if images.steps_per_epoch == 0:
        raise SeifyError(f"{{batch_size}} {config.batch_size} is larger than the {len(images.train_sampler)} "
                         f"training images{' per process' if dist.enabled else ''}; lower it", "batch_size")
    return images


def _optimizer(prepared: Prepared, config: FinetuneConfig) -> torch.optim.Optimizer:
    """What is new trains at ``lr``, seify's new blocks at ``lr * se_lr_scale``, what was trained at
    ``lr * backbone_lr_scale``; an adapter run's optimizer holds what it trains alone, all of it at ``lr``. As in
    timm, biases, norms and other 1-d parameters, seify's blocks and what the model exempts (``no_weight_decay``)
    are not decayed."""
    model = prepared.model
    new = prepared.fresh if prepared.trains is None else prepared.trains
    blocks = {n for path, m in model.named_modules() if isinstance(m, SiteBlock)
              for n, _ in m.named_parameters(prefix=path)}
    faster = blocks if prepared.trains is None else set()
    listed = getattr(model, "no_weight_decay", None)  # timm's models name what must not decay
    exempt = set(listed()) if callable(listed) else set()
    lrs = {"trained": config.lr * config.backbone_lr_scale, "new": config.lr, "blocks": config.lr * config.se_lr_scale}
    grouped: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if prepared.trains is not None and name not in new:
            continue
        role = "trained" if name not in new else "blocks" if name in faster else "new"
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in blocks or name in exempt)
        grouped.setdefault((role, decays), []).append(p)
    groups = [{"params": params, "name": role, "lr": lrs[role], "weight_decay": config.weight_decay * decays}
              for (role, decays), params in grouped.items()]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.momentum > 0)


def schedule(optimizer: torch.optim.Optimizer, config: FinetuneConfig, epochs: int, steps_per_epoch: int):
    """Linear learning-rate warm-up over ``lr_warmup_epochs``, then cosine to zero at the end of ``epochs``."""
    warmup, total = round(config.lr_warmup_epochs * steps_per_epoch), epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def precision(config: FinetuneConfig, device: torch.device) -> Precision:
    """auto: bf16 on a GPU that computes it natively, fp16 with a grad scaler on one that would emulate bf16 (T4,
    V100), fp32 on a CPU."""
    wanted = config.precision
    if wanted == "auto":
        wanted = ("bf16" if native_bf16(device) else "fp16") if device.type == "cuda" else "fp32"
    if wanted == "fp32":
        return Precision(contextlib.nullcontext, None, None)
    dtype = torch.bfloat16 if wanted == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if wanted == "fp16" and device.type == "cuda" else None
    return Precision(lambda: torch.autocast(device.type, dtype=dtype), dtype, scaler)
