"""Decoding and augmenting on the training device (``--decode gpu``), for GPUs that CPU workers cannot keep fed.

Loading processes only read file bytes (PNG and other formats they decode themselves); the JPEGs of a batch are
decoded together on the device (``torchvision.io.decode_jpeg(device="cuda")``, nvJPEG), and the transforms of the
CPU path run on the decoded tensors: random-resized-crop, flip and colour jitter in training, resize and centre
crop for validation, then normalisation. Each image's random draws come from (seed, epoch, index) alone, so a
resumed run sees the same images, and so does a run with a different number of loading processes.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import io
from torchvision.transforms.v2 import functional as TF

from ..errors import first_line
from ..images.folders import Augmentation, fill_failed, read_rgb, sample_seed

JPEG_START = (0xFF, 0xD8)
RGB = io.ImageReadMode.RGB


def _torchvision_io(name: str):
    """A torchvision.io function that does not warn on every call that TorchCodec will replace it (0.29 on).

    TorchCodec's decoders are the successor; until their CUDA JPEG path is checked here, torchvision's stays.
    """
    function = getattr(io, name)

    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            return function(*args, **kwargs)
    return quiet


read_file, decode_jpeg = _torchvision_io("read_file"), _torchvision_io("decode_jpeg")


class EncodedDataset(torch.utils.data.Dataset):
    """(JPEG bytes, label, index); other formats decoded here as the CPU path decodes them (PIL), as a uint8 CHW
    tensor; (None, (path, reason), index) for a file that cannot be read or decoded."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            raw = read_file(path)
        except RuntimeError as e:
            return None, (path, first_line(e)), i
        if tuple(raw[:2].tolist()) == JPEG_START:
            return raw, label, i
        rgb, reason = read_rgb(path)
        return (TF.pil_to_tensor(rgb), label, i) if rgb is not None else (None, (path, reason), i)


def collate_encoded(batch: list) -> tuple[list, torch.Tensor, list[int], list]:
    """(images, labels, indices, failures): images stay a list (their sizes differ)."""
    good = [item for item in batch if item[0] is not None]
    failures = [item[1] for item in batch if item[0] is None]
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    return [item[0] for item in good], labels, [item[2] for item in good], failures


@dataclass(frozen=True)
class DeviceTransform:
    """timm's transforms for one model, on uint8 CHW tensors already on the device."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    augmentation: Augmentation | None
    seed: int = 0

    @classmethod
    def from_config(cls, data_config: dict, img_size: int | None, augmentation: Augmentation | None, seed: int):
        size = int((data_config["input_size"] if img_size is None else (3, img_size, img_size))[-1])
        return cls(size, tuple(data_config["mean"]), tuple(data_config["std"]), data_config["interpolation"],
                   float(data_config.get("crop_pct") or 0.875), augmentation, seed)

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        return F.interpolate(image[None].float(), size=size, mode=mode, antialias=True, align_corners=False)[0]

    def _evaluation(self, image: torch.Tensor) -> torch.Tensor:
        """Resize the short side to size / crop_pct, then a centre crop (timm's eval transform)."""
        h, w = image.shape[-2:]
        short = math.floor(self.size / self.crop_pct)
        scaled = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        resized = self._resize(image, scaled)
        return TF.center_crop(resized, [self.size, self.size])

    def _draws(self, image: torch.Tensor, seed: int) -> Draws:
        """One training image's random draws, from its own generator, in a fixed order: crop, flip, jitter."""
        augmentation = self.augmentation
        assert augmentation is not None
        generator = torch.Generator().manual_seed(seed)
        box = None if augmentation.preset == "none" else crop_box(image.shape[-2:], augmentation.crop_scale,
                                                                   generator)
        flip = bool(augmentation.hflip) and float(torch.rand((), generator=generator)) < augmentation.hflip
        jitter = jitter_draws(JITTER, generator) if augmentation.preset == "imagenet" else None
        return Draws(box, flip, jitter)

    def _sized(self, image: torch.Tensor, draws: Draws | None) -> torch.Tensor:
        """The image cropped and resized (a view and one resize: the only work done image by image)."""
        if draws is None or draws.box is None:
            return self._evaluation(image)
        top, left, h, w = draws.box
        return self._resize(image[:, top:top + h, left:left + w], (self.size, self.size))

    def __call__(self, images: list[torch.Tensor], indices: list[int], epoch: int, training: bool) -> torch.Tensor:
        """The batch, normalised: each image cropped and resized on its own (sizes differ), then flipped, jittered
        and normalised as one batch, each image by its own draws."""
        augmented = training and self.augmentation is not None
        draws = [self._draws(image, sample_seed(self.seed, epoch, index)) if augmented else None
                 for image, index in zip(images, indices, strict=True)]
        batch = torch.stack([self._sized(image, d) for image, d in zip(images, draws, strict=True)])
        if augmented:
            batch = _flip_and_jitter(batch, [d for d in draws if d is not None])
        batch = batch.clamp_(0, 255).div_(255)
        mean = torch.tensor(self.mean, device=batch.device)[:, None, None]
        std = torch.tensor(self.std, device=batch.device)[:, None, None]
        return (batch - mean) / std


JITTER = 0.4  # timm's colour jitter: brightness, contrast and saturation


@dataclass(frozen=True)
class Draws:
    box: tuple[int, int, int, int] | None  # the crop (top, left, height, width); None: the evaluation transform
    flip: bool
    jitter: tuple[list[float], list[int]] | None  # the three factors and the order they are applied in


def _flip_and_jitter(batch: torch.Tensor, draws: list[Draws]) -> torch.Tensor:
    """Flips and colour jitter of a batch in a few whole-batch operations, each image by its own draws."""
    flips = torch.tensor([d.flip for d in draws], device=batch.device)
    batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
    if draws[0].jitter is None:
        return batch
    factors = torch.tensor([d.jitter[0] for d in draws if d.jitter], dtype=torch.float64)
    orders = torch.tensor([d.jitter[1] for d in draws if d.jitter], device=batch.device)
    return colour_jitter(batch / 255, factors, orders) * 255


def crop_box(shape, scale: tuple[float, float], generator: torch.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm: ten tries, then the centre), drawn from ``generator``."""
    height, width = int(shape[0]), int(shape[1])
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(draws[2] * (height - h + 1)), int(draws[3] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jitter_draws(strength: float, generator: torch.Generator) -> tuple[list[float], list[int]]:
    """torchvision's ColorJitter(strength, strength, strength) draws: a factor for brightness, contrast and
    saturation, and the order they are applied in."""
    factors = (1 - strength + 2 * strength * torch.rand(3, generator=generator, dtype=torch.float64)).tolist()
    return factors, torch.randperm(3, generator=generator).tolist()


def colour_jitter(images: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """ColorJitter on a batch of [0, 1] images (N, 3, H, W), image n adjusted by ``factors[n]`` (brightness,
    contrast, saturation; float64 on the CPU) in the order ``orders[n]``: torchvision's formulas, a blend with a
    factor f and its 1 - f taken in double precision as torchvision takes a Python float."""
    f = factors.to(images.dtype).to(images.device)[:, :, None, None, None]
    rest = (1 - factors).to(images.dtype).to(images.device)[:, :, None, None, None]

    def adjusted(x: torch.Tensor, kind: int) -> torch.Tensor:
        gray = (x[:, 0] * 0.2989 + x[:, 1] * 0.587 + x[:, 2] * 0.114)[:, None]
        other = (torch.zeros_like(x), gray.mean((-3, -2, -1), keepdim=True), gray)[kind]
        return (f[:, kind] * x + rest[:, kind] * other).clamp_(0, 1)
    for position in range(3):
        kind = orders[:, position][:, None, None, None]
        images = torch.where(kind == 0, adjusted(images, 0), torch.where(kind == 1, adjusted(images, 1),
                                                                            adjusted(images, 2)))
    return images


class DeviceBatches:
    """Batches of (images on the device, labels, failures) from a loader of encoded files, like data.loader's.

    A JPEG the device cannot decode is retried on the CPU (nvJPEG lacks some formats, such as CMYK) and counted
    as undecodable only if that fails too. In training it is replaced by a good image of the same batch, as the
    CPU path does, so that every process of a distributed run takes a step of the same size.
    """

    def __init__(self, batches, transform: DeviceTransform, device: torch.device, epoch: int, training: bool,
                 items: list[tuple[str, int]]):
        self.batches, self.transform, self.device = batches, transform, device
        self.epoch, self.training, self.items = epoch, training, items

    def _decode(self, images: list[torch.Tensor], indices: list[int]) -> tuple[list, list]:
        encoded = [k for k, image in enumerate(images) if image.dim() == 1]
        decoded: list = [image.to(self.device, non_blocking=True) if image.dim() == 3 else None for image in images]
        failures = []
        if encoded:
            try:
                for k, image in zip(encoded, decode_jpeg([images[k] for k in encoded], mode=RGB, device=self.device),
                                    strict=True):
                    decoded[k] = image
            except RuntimeError:  # one bad file fails the whole batch call: find it one by one
                for k in encoded:
                    decoded[k], failure = self._decode_one(images[k], indices[k])
                    if failure:
                        failures.append(failure)
        return decoded, failures

    def _decode_one(self, raw: torch.Tensor, index: int):
        for device in (self.device, torch.device("cpu")):
            try:
                return decode_jpeg(raw, mode=RGB, device=device).to(self.device), None
            except RuntimeError as e:
                reason = first_line(e)
        return None, (self.items[index][0], reason)

    def __iter__(self):
        for images, labels, indices, failures in self.batches:
            decoded, more = self._decode(images, indices)
            keep = fill_failed([k for k, image in enumerate(decoded) if image is not None], failures + more,
                               len(images) + len(failures), self.training)
            if keep is None:
                yield None, None, failures + more
                continue
            tensors = self.transform([decoded[k] for k in keep], [indices[k] for k in keep], self.epoch,
                                     self.training)
            yield tensors, labels[keep], failures + more
