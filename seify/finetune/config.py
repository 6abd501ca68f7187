"""Every option of a fine-tuning run, checked before any work is done."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import SeifyError
from ..images import AUGMENTATIONS
from ..limits import MAX_BATCH_SIZE, check_choice, check_img_size, check_number, check_whole
from ..options import DATA, DEVICE_HELP, DEVICES, OUTPUT, SCHEDULE, SEOptions, option

# The options a resumed run may change, by name (the flag without its dashes): how it runs, where it writes and
# reads, not what it computes. --epochs changes only with --extend, which re-plans the schedule.
CHANGEABLE_ON_RESUME = frozenset({"data", "workers", "threads", "device", "compile", "log_every", "save_every",
                                  "out", "resume", "force", "extend", "epochs"})
DECODES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Source:
    """What a run fine-tunes: MODEL, its weights, and the SE options (``se`` None: the plain baseline)."""
    model: str
    se: SEOptions | None = SEOptions()
    weights: str | None = None
    pretrained: bool = False

    def to_dict(self) -> dict:
        """As recorded in run.json and every checkpoint; files also by their absolute path, so that a resume from
        another folder, or with the path spelt another way, knows them."""
        return {"model": self.model, "model_file": resolved_file(self.model), "weights": self.weights,
                "weights_file": resolved_file(self.weights), "pretrained": self.pretrained,
                "se": self.se.to_dict() if self.se else None}


def resolved_file(path: str | None) -> str | None:
    """The absolute path of an existing file, else None (a model name is not a file)."""
    return str(Path(path).resolve()) if path and Path(path).is_file() else None


LOCAL_OPTIONS = {"out", "device", "workers", "threads", "decode", "compile", "channels_last", "log_every", "save_every",
                 "resume", "force", "extend", "strict_data"}


@dataclass
class FinetuneConfig:
    """How a run trains and where it writes; each field is a ``seify finetune`` flag with this help."""
    epochs: int = option(10, "Epochs in all, the SE warm-up included.", panel=SCHEDULE)
    batch_size: int = option(64, "Images per step and device.", panel=SCHEDULE)
    lr: float = option(1e-3, "Learning rate of what is new (SE blocks, a new head; everything for random weights).",
                       panel=SCHEDULE)
    backbone_lr_scale: float = option(0.1, "Learning rate of trained layers = lr x this.", panel=SCHEDULE)
    se_lr_scale: float = option(10.0, "Learning rate of seify's new blocks in a full fine-tune = lr x this (at 1, "
                                      "fresh gates barely leave their constant start).", panel=SCHEDULE)
    weight_decay: float = option(0.05, "Weight decay (decoupled, as AdamW's) of weights: not of biases, norms or "
                                       "seify's blocks (as timm).", panel=SCHEDULE)
    optimizer: str = option("adamw", "adamw or sgd.", panel=SCHEDULE)
    momentum: float = option(0.9, "SGD momentum (Nesterov).", panel=SCHEDULE)
    warmup_epochs: float | None = option(None, "Linear learning-rate warm-up, then cosine (default: a tenth of "
                                               "the epochs, at most 1).", panel=SCHEDULE)
    se_warmup_epochs: int = option(1, "First train only what is new (SE blocks, a new head), the rest and its "
                                      "BatchNorm statistics frozen.", panel=SCHEDULE)
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy loss.", panel=SCHEDULE)
    clip_grad: float | None = option(1.0, "Gradient-norm clip (0: off).", panel=SCHEDULE)
    ema_decay: float | None = option(None, "Keep an EMA of weights (e.g. 0.999); validation and best use it.",
                                     panel=SCHEDULE)
    new_head: bool = option(False, "A new classifier even where the trained one has one output per class.",
                            panel=SCHEDULE)
    adapter: bool = option(False, "Train only seify's blocks and the classifier, the whole run: every other weight "
                                  "and BatchNorm statistic stays as loaded. best/last are adapter files (what "
                                  "trained, and the base's identity); with --no-se, a linear probe.", panel=SCHEDULE)
    own_gates: bool = option(False, "With --adapter: train the network's own channel gates too (EfficientNet, "
                                    "MobileNetV3, RegNetY...); with --no-se, the adapter without surgery.",
                             panel=SCHEDULE)
    img_size: int | None = option(None, "Train and evaluate at N px (default: the model's).", panel=DATA)
    aug: str = option("auto", "Augmentation preset: none, light (mild crops, flips), imagenet (timm's), auto "
                              "(imagenet from 160 px, else light).", panel=DATA)
    crop_scale: tuple[float, float] | None = option(None, "Random-resized-crop area range MIN,MAX (default: "
                                                          "the preset's).", panel=DATA)
    hflip: float | None = option(None, "Horizontal-flip probability (0: off; default: the preset's).", panel=DATA)
    val_split: float | None = option(None, "Split one DATA/<class> tree (or a train/ without val/) by this "
                                           "fraction.", panel=DATA)
    strict_data: bool = option(False, "Fail on unreadable files instead of skipping them.", panel=DATA)
    seed: int = option(0, "Fixes data order, augmentation and initialisation.", panel=DATA)
    workers: int | None = option(None, "Data-loading processes (default: 1 on a CPU, up to 8 on a GPU).",
                                 panel=DATA)
    decode: str = option("auto", "Where JPEGs are decoded and augmented: gpu (nvJPEG, transforms on the GPU), cpu "
                                 "(in the loading processes), auto (cpu until the GPU path is measured).",
                         panel=DATA)
    device: str | None = option(None, DEVICE_HELP, panel=DEVICES)
    precision: str = option("auto", "auto (bf16 on CUDA, fp16 without bf16, fp32 on CPU), fp32, bf16, fp16.",
                            panel=DEVICES)
    channels_last: bool | None = option(None, "channels_last memory format (default: on for CUDA).",
                                        "--channels-last/--no-channels-last", panel=DEVICES)
    compile: bool = option(False, "torch.compile the model.", panel=DEVICES)
    threads: int | None = option(None, "CPU threads (default: the cores other processes leave free).",
                                 panel=DEVICES)
    out: str = option("runs/seify", "Run folder for checkpoints, metrics and curves.", panel=OUTPUT)
    save_every: int = option(0, "Also checkpoint every N steps (0: per epoch).", panel=OUTPUT)
    log_every: int = option(50, "In logs, a line every N steps (0: per epoch).", panel=OUTPUT)
    resume: bool = option(False, "Continue the run in --out with its own settings.", panel=OUTPUT)
    extend: bool = option(False, "With --resume and another --epochs: re-plan the schedule for them.",
                          panel=OUTPUT)
    force: bool = option(False, "Start over in an --out that holds a run (the run's files go, nothing else).",
                         panel=OUTPUT)

    def check(self) -> None:
        """Refuse what cannot train (or would train into nonsense) before any model is built."""
        check_whole(self.epochs, "epochs", 1, 100_000)
        check_whole(self.batch_size, "batch_size", 1, MAX_BATCH_SIZE)
        check_whole(self.se_warmup_epochs, "se_warmup_epochs", 0, 100_000)
        check_whole(self.save_every, "save_every", 0, None)
        check_whole(self.log_every, "log_every", 0, None)
        for name in ("workers", "threads"):
            if getattr(self, name) is not None:
                check_whole(getattr(self, name), name, 0 if name == "workers" else 1, 256)
        check_img_size(self.img_size)
        check_number(self.lr, "lr", 0, 10, low_open=True)
        check_number(self.backbone_lr_scale, "backbone_lr_scale", 0, 100)
        check_number(self.se_lr_scale, "se_lr_scale", 0, 1000, low_open=True)
        check_number(self.weight_decay, "weight_decay", 0, 10)
        check_number(self.momentum, "momentum", 0, 1)
        if self.warmup_epochs is not None:
            check_number(self.warmup_epochs, "warmup_epochs", 0, 100_000)
        check_number(self.label_smoothing, "label_smoothing", 0, 1, high_open=True)
        if self.clip_grad is not None:
            check_number(self.clip_grad, "clip_grad", 0, 1e6)
        if self.ema_decay is not None:
            check_number(self.ema_decay, "ema_decay", 0, 1, low_open=True, high_open=True)
        if self.hflip is not None:
            check_number(self.hflip, "hflip", 0, 1)
        if self.val_split is not None:  # checked where val/ makes it unused too: a typo is a typo
            check_number(self.val_split, "val_split", 0, 1, low_open=True, high_open=True)
        if self.crop_scale is not None and not (len(self.crop_scale) == 2 and
                                                0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise SeifyError(f"{{crop_scale}} must be two fractions 0 < min <= max <= 1, not {self.crop_scale}",
                             "crop_scale")
        check_choice(self.optimizer, "optimizer", ("adamw", "sgd"))
        check_choice(self.precision, "precision", ("auto", "fp32", "bf16", "fp16"))
        check_choice(self.aug, "aug", AUGMENTATIONS)
        check_choice(self.decode, "decode", DECODES)
        if self.own_gates and not self.adapter:
            raise SeifyError("{own_gates} chooses what an adapter trains; it goes with {adapter}", "own_gates",
                             "adapter")
        if self.resume and self.force:
            raise SeifyError("pass {resume} to continue the run or {force} to start over, not both",
                             "resume", "force")

    @property
    def lr_warmup_epochs(self) -> float:
        return self.warmup_epochs if self.warmup_epochs is not None else min(1.0, self.epochs / 10)

    def to_dict(self) -> dict:
        return asdict(self)

    def portable(self) -> dict:
        """What the run trained with, as files that travel record it: without the run folder's path and how this
        machine ran it (devices, processes, logging), which mean nothing elsewhere."""
        return {k: v for k, v in self.to_dict().items() if k not in LOCAL_OPTIONS}

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.crop_scale is not None:
            low, high = config.crop_scale
            config.crop_scale = (low, high)
        return config
