"""--decode gpu: decoding and augmenting on the training device, exercised here on the CPU through the same code."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import KillAt, config, rows_of, weights
from seify.errors import SeifyError
from seify.finetune import build, device_data
from seify.finetune.loop import Trainer, finetune
from seify.images import folders as data

DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225], "crop_pct": 0.875}


@pytest.fixture
def on_device(monkeypatch):
    """Runs take the device path although they train on the CPU."""
    monkeypatch.setattr(build, "decodes_on_device", lambda decode, device: True)


def decoded(path):
    image, _, _ = device_data.EncodedDataset([(str(path), 0)])[0]
    return torchvision_decode(image) if image.dim() == 1 else image


def torchvision_decode(raw):
    return device_data.decode_jpeg(raw, mode=device_data.RGB)


def test_validation_images_match_the_cpu_path(tiny):
    paths = sorted((tiny / "val").rglob("*.jpg"))[:8]
    cpu = data.transforms(DATA_CONFIG, 28)
    transform = device_data.DeviceTransform.from_config(DATA_CONFIG, 28, None, seed=0)
    ours = transform([decoded(p) for p in paths], list(range(len(paths))), epoch=0, training=False)
    theirs = torch.stack([cpu(Image.open(p).convert("RGB")) for p in paths])
    assert ours.shape == theirs.shape == (8, 3, 28, 28)
    # the same resize and centre crop; PIL's and torch's antialiasing filters differ by a level or two of 255
    assert (ours - theirs).abs().mean() < 0.03
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.99


def test_training_draws_depend_on_seed_epoch_and_index_only(tiny):
    paths = sorted((tiny / "train").rglob("*.jpg"))[:4]
    images = [decoded(p) for p in paths]
    aug = data.Augmentation.choose("imagenet", 32, hflip=0.5)
    transform = device_data.DeviceTransform.from_config(DATA_CONFIG, 32, aug, seed=3)
    first = transform(images, [0, 1, 2, 3], epoch=1, training=True)
    assert torch.equal(first[2:], transform(images[2:], [2, 3], epoch=1, training=True))  # any batch split
    assert not torch.equal(first, transform(images, [0, 1, 2, 3], epoch=2, training=True))
    again = device_data.DeviceTransform.from_config(DATA_CONFIG, 32, aug, seed=4)
    assert not torch.equal(first, again(images, [0, 1, 2, 3], epoch=1, training=True))


def test_crop_boxes_follow_the_scale_range_and_the_image():
    generator = torch.Generator().manual_seed(0)
    for shape in ((40, 60), (32, 32), (300, 20)):
        for _ in range(200):
            top, left, h, w = device_data.crop_box(shape, (0.5, 1.0), generator)
            assert 0 <= top and top + h <= shape[0] and 0 <= left and left + w <= shape[1]
            if shape != (300, 20):  # an extreme aspect falls back to the centre crop, as torchvision's does
                assert 0.45 <= h * w / (shape[0] * shape[1]) <= 1.0


def test_device_decoding_trains_resumes_exactly_and_counts_bad_files(tmp_path, tiny, se_file, on_device):
    folder = tmp_path / "data"
    for split in ("train", "val"):
        for source in (tiny / split).rglob("*.jpg"):
            target = folder / split / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    first = sorted((folder / "train" / "gradient").glob("*.jpg"))
    for path, suffix in ((first[0], ".png"), (first[2], ".bmp")):  # decoded by the loading process, with PIL
        Image.open(path).save(path.with_suffix(suffix))
        path.unlink()
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(first[1])
    first[1].write_bytes(first[1].read_bytes()[: first[1].stat().st_size * 6 // 10])  # header fine, data cut
    straight = finetune(se_file, str(folder), config(tmp_path / "straight", epochs=3))
    assert straight.best_top1 > 0
    rows = rows_of(tmp_path / "straight")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["undecodable"] == 1 for r in rows)
    out = tmp_path / "cut"
    assert finetune(se_file, str(folder), config(out, epochs=3), log=KillAt).stopped_by == "SIGTERM"
    finetune(se_file, str(folder), config(out, epochs=3, resume=True))
    w1, w2 = weights(straight.out / "last.safetensors"), weights(out / "last.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_decode_gpu_without_cuda_is_refused(tmp_path, tiny, se_file):
    with pytest.raises(SeifyError, match="decode.* gpu needs a CUDA device"):
        Trainer(se_file, str(tiny), config(tmp_path / "run", decode="gpu"))
    with pytest.raises(SeifyError, match="decode.* must be one of auto, cpu, gpu"):
        Trainer(se_file, str(tiny), config(tmp_path / "run", decode="nvjpeg"))
