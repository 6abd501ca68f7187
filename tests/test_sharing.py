"""What a shared model carries: no local path in any file that travels, the data's fingerprint instead (evaluate
still finds the held-out images, wherever the tree now lies), and a model card in every exported folder."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

import seify
from conftest import ARCH, config
from seify.export import export
from seify.finetune.loop import finetune
from seify.finetune.progress import SilentLog
from seify.fold import fold


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny, plain4):
    """A run fine-tuned with --val-split on one DATA/<class> tree, as a user in their home folder has it."""
    root = tmp_path_factory.mktemp("home") / "alice" / "projects" / "client-x"
    shutil.copytree(tiny / "train", root / "data")
    out = root / "runs" / "se"
    result = finetune(ARCH, str(root / "data"), config(out, epochs=1, val_split=0.25, seed=2), weights=plain4,
                      log=SilentLog)
    return root, out, result


def _written_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_no_file_that_travels_carries_a_local_path(tmp_path, shared):
    root, out, _ = shared
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    best = str(out / "best.safetensors")
    for name, format in (("m.onnx", "onnx"), ("m.pt2", "pt2"), ("timm", "timm"), ("folder", "folder")):
        export(best, shipped / name, format)
    fold(best, shipped / "folded.safetensors", str(root / "data"), max_gate_std=1.0, latency=False)
    for name in ("best.safetensors", "last.safetensors"):
        shutil.copy(out / name, shipped / name)
    local = [str(root), str(Path(root).resolve()), "client-x", str(Path.home()) + "/"]
    files = _written_bytes(shipped)
    assert len(files) >= 10
    for path, content in files.items():
        for text in local:
            assert text.encode() not in content, f"{path} holds {text}"
    assert b"client-x" in (out / "run.json").read_bytes()  # the local record keeps its paths


def test_evaluate_finds_the_held_out_images_of_a_moved_tree(cli, tmp_path, shared):
    root, out, result = shared
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root / "data", moved)
    code, stdout, err = cli("evaluate", out / "best.safetensors", moved, "--json", "--workers", "0")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["images"] == 8 and "that the run held out" in report["scored"]
    assert report["top1"] == pytest.approx(result.best_top1)
    (moved / sorted(p.name for p in moved.iterdir())[0] / "extra.jpg").write_bytes(
        next((root / "data").rglob("*.jpg")).read_bytes())  # another tree now: what the run held out, said
    code, stdout, _ = cli("evaluate", out / "best.safetensors", moved, "--json", "--workers", "0")
    changed = json.loads(stdout)
    assert changed["images"] == 8 and any("is not the tree the run trained on" in n for n in changed["notes"])
    code, stdout, _ = cli("evaluate", out / "best.safetensors", moved, "--json", "--workers", "0", "--all-images")
    assert json.loads(stdout)["images"] == 33


def test_an_exported_folder_has_a_model_card_from_its_recipe(tmp_path, shared):
    _, out, result = shared
    for format in ("timm", "folder"):
        export(str(out / "best.safetensors"), tmp_path / format, format)
        card = (tmp_path / format / "README.md").read_text()
        header = card.split("---")[1]
        assert f"library_name: {'timm' if format == 'timm' else 'seify'}" in header
        assert f"value: {result.best_top1:.2f}" in header and "top-5 accuracy" in header
        recipe = seify.checkpoint.read_recipe(out / "best.safetensors")
        assert f"{len(recipe['sites'])} SE blocks" in card and f"`{recipe['sites'][0]['path']}`" in card
        ours = sum(p.numel() for p in seify.load(out / "best.safetensors").parameters())
        base = sum(p.numel() for p in timm.create_model(ARCH, num_classes=4).parameters())
        assert f"| base model | {base:,} |" in card and f"| this model | {ours:,} (" in card
        assert recipe["finetune"]["data_fingerprint"]["digest"] in card and "lr 0.001" in card
        assert ('timm.create_model("local-dir:timm", pretrained=True)' in card) == (format == "timm")
        assert f"seify {seify.__version__}" in card
    converted = seify.save(seify.convert(ARCH, input_size=(3, 32, 32)), tmp_path / "c.safetensors")
    export(str(converted), tmp_path / "plain-card", "folder")
    card = (tmp_path / "plain-card" / "README.md").read_text()
    assert "Not fine-tuned by seify" in card and "model-index" not in card
    with torch.no_grad():  # the card changes nothing of what loads
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(seify.load(f"local-dir:{tmp_path / 'plain-card'}")(x), seify.load(converted)(x))
