"""seify finetune / evaluate on small data drawn by the demo's generator."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import seify
from conftest import ARCH, KillAt, config, rows_of, save_weights, weights
from seify.checkpoint import read_recipe
from seify.cli.demo import run
from seify.errors import SeifyError
from seify.finetune.loop import Trainer, finetune
from seify.finetune.progress import PlainLog, SilentLog
from seify.images import folders as fdata
from seify.images.scoring import evaluate_folder
from seify.images.synthetic import CLASSES
from seify.se import SqueezeExcite

# ------------------------------------------------------------------ data


def test_data_layouts_and_errors(tmp_path, tiny):
    classes, train, val = fdata.discover(tiny)
    assert classes == sorted(CLASSES) and len(train.items) == 32 and len(val.items) == 16
    with pytest.raises(SeifyError, match="no train/ folder.*val_split"):
        fdata.discover(tiny / "train")
    c1, t1, v1 = fdata.discover(tiny / "train", val_split=0.25, seed=3)
    c2, t2, v2 = fdata.discover(tiny / "train", val_split=0.25, seed=3)
    assert v1.items == v2.items and len(v1.items) == 8 and not set(v1.items) & set(t1.items)
    one = tmp_path / "one" / "train" / "only"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    with pytest.raises(SeifyError, match="1 class folder"):
        fdata.discover(tmp_path / "one")
    (tmp_path / "one" / "train" / "empty").mkdir()
    with pytest.raises(SeifyError, match="class 'empty' has no readable images"):
        fdata.discover(tmp_path / "one", val_split=0.5)


def test_unreadable_files_are_skipped_or_fatal(tmp_path, tiny):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(tiny, root)
    (root / "train" / CLASSES[0] / "broken.jpg").write_bytes(b"not an image")
    (root / "train" / CLASSES[1] / "notes.txt").write_text("hello")
    _, train, _ = fdata.discover(root)
    assert len(train.items) == 32 and sorted(Path(p).name for p in train.skipped) == ["broken.jpg", "notes.txt"]
    with pytest.raises(SeifyError, match="2 files are not readable images"):
        fdata.discover(root, strict=True)


def test_sampler_resumes_mid_epoch_and_shards():
    full = list(fdata.EpochSampler(10, True, seed=1))
    s = fdata.EpochSampler(10, True, seed=1)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:]
    ranks = [list(fdata.EpochSampler(10, True, seed=1, rank=r, world=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and set(sum(ranks, [])) == set(range(10))
    assert sorted(sum([list(fdata.EpochSampler(10, False, rank=r, world=3)) for r in range(3)], [])) == list(range(10))


@pytest.mark.parametrize("preset,size,scale,flip", [("auto", 32, (0.8, 1.0), 0.0), ("auto", 224, (0.08, 1.0), 0.5),
                                                    ("none", 64, (1.0, 1.0), 0.0), ("light", 300, (0.8, 1.0), 0.0)])
def test_augmentation_presets_fit_the_image_size(preset, size, scale, flip):
    aug = fdata.Augmentation.choose(preset, size)
    assert (aug.crop_scale, aug.hflip) == (scale, flip)
    assert aug.preset == ("imagenet" if size >= 160 else "light") if preset == "auto" else aug.preset == preset
    cfg = {"input_size": [3, 224, 224], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
           "crop_pct": 0.875, "crop_mode": "center"}
    steps = [type(t).__name__ for t in fdata.transforms(cfg, size, aug).transforms]
    assert ("RandomHorizontalFlip" in steps) == (flip > 0)
    assert ("ColorJitter" in steps) == (aug.preset == "imagenet")
    flipped = fdata.Augmentation.choose(preset, size, hflip=0.5)
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in fdata.transforms(cfg, size, flipped).transforms]
    assert fdata.Augmentation.choose(preset, size, crop_scale=(0.3, 0.9)).crop_scale == (0.3, 0.9)


# ------------------------------------------------------------------ a run


def test_run_writes_everything(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    result = finetune(se_file, str(tiny), config(out))
    for name in ("last.safetensors", "best.safetensors", "checkpoint.json", "metrics.jsonl", "metrics.csv",
                 "curves.png", "run.json"):
        assert (out / name).is_file(), name
    rows = rows_of(out)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["phase"] for r in rows] == ["warmup", "full"]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,phase,step,train_loss")
    assert Image.open(out / "curves.png").size[0] >= 1000
    info = json.loads((out / "run.json").read_text())
    assert info["classes"] == sorted(CLASSES) and info["img_size"] == 32 and info["config"]["batch_size"] == 8
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["timm"] == timm.__version__
    assert info["augmentation"]["preset"] == "light" and info["source"]["model"] == se_file
    recipe = read_recipe(out / "best.safetensors")
    assert recipe["classes"] == sorted(CLASSES) and recipe["num_classes"] == 4
    assert recipe["data_config"]["input_size"] == [3, 32, 32]  # the size it was trained at
    assert seify.load(out / "best.safetensors").get_classifier().out_features == 4
    # an independent evaluation of the best file reproduces the logged validation accuracy, at the trained size
    again = evaluate_folder(str(out / "best.safetensors"), str(tiny / "val"), device="cpu", workers=0)
    assert again["img_size"] == 32 and again["top1"] == pytest.approx(max(r["val_top1"] for r in rows))
    assert result.best_top1 == pytest.approx(again["top1"])
    for name in ("metrics.csv", "curves.png", "run.json", "best.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_warmup_trains_only_the_new_parts(tmp_path, tiny, se_file):
    """A converted trained model with a new head: epoch 1 trains SE blocks and the head, nothing else."""
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    before, after = weights(se_file), weights(out / "last.safetensors")
    assert torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert not torch.equal(before["layer1.0.se.fc2.weight"], after["layer1.0.se.fc2.weight"])
    assert after["fc.weight"].shape == (4, 96)


def test_seed_makes_runs_identical(tmp_path, tiny, se_file):
    a = finetune(se_file, str(tiny), config(tmp_path / "a", seed=5)).out
    b = finetune(se_file, str(tiny), config(tmp_path / "b", seed=5)).out
    c = finetune(se_file, str(tiny), config(tmp_path / "c", seed=6)).out
    wa, wb, wc = (weights(p / "last.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


# ------------------------------------------------------------------ the trained head


def test_head_with_matching_size_is_kept_and_warmup_trains_se_only(tmp_path, tiny, plain4):
    out = tmp_path / "run"
    log = []
    result = finetune(ARCH, str(tiny), config(out, epochs=1), weights=plain4, log=_collect(log))
    before, after = weights(plain4), weights(out / "last.safetensors")
    assert torch.equal(before["fc.weight"], after["fc.weight"])  # kept, and frozen during the warm-up
    assert not torch.equal(after["layer4.0.se.fc2.weight"], torch.zeros_like(after["layer4.0.se.fc2.weight"]))
    assert any("keeping the trained 4-way head" in line and "sorted order" in line for line in log)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 0 and first["phase"] == "start"  # the accuracy it started from
    original = timm.create_model(ARCH, num_classes=4)
    original.load_state_dict(weights(plain4))
    assert result.start_top1 == pytest.approx(_accuracy(original, tiny))


def _accuracy(model, folder, size=32):
    cfg = timm.data.resolve_model_data_config(model)
    transform = fdata.transforms(cfg, size)
    _, _, val = fdata.discover(folder)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in val.items])
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    return 100.0 * (pred == torch.tensor([label for _, label in val.items])).float().mean().item()


def _collect(lines):
    class Log(PlainLog):
        def line(self, text):
            lines.append(text)
            super().line(text)
    return Log


def test_recorded_class_names_reorder_the_head_or_are_refused(tmp_path, tiny, plain4):
    import shutil

    from seify.checkpoint import save
    best = finetune(ARCH, str(tiny), config(tmp_path / "first", epochs=1), weights=plain4).out / \
        "best.safetensors"
    recipe = read_recipe(best)
    assert recipe["classes"] == sorted(CLASSES)
    same = Trainer(str(best), str(tiny), config(tmp_path / "same", epochs=1))
    same.close()
    assert any("same classes" in line for line in same.prepared.notes)
    # a file whose recorded names run the other way, its rows flipped to match: the head must follow the names
    model = seify.load(best)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    save(model, tmp_path / "flipped.safetensors", {**recipe, "classes": recipe["classes"][::-1]})
    trainer = Trainer(str(tmp_path / "flipped.safetensors"), str(tiny), config(tmp_path / "re", epochs=1))
    trainer.close()
    assert torch.equal(trainer.model.get_classifier().weight, seify.load(best).get_classifier().weight)
    assert any("rows reordered" in line for line in trainer.prepared.notes)
    renamed = tmp_path / "renamed"
    for split in ("train", "val"):
        for c in CLASSES:
            shutil.copytree(tiny / split / c, renamed / split / f"new_{c}")
    with pytest.raises(SeifyError, match="trained on other classes .* new_head"):
        Trainer(str(best), str(renamed), config(tmp_path / "x", epochs=1))
    trainer = Trainer(str(best), str(renamed), config(tmp_path / "y", epochs=1, new_head=True))
    assert "fc.weight" in trainer.prepared.fresh
    trainer.close()


def test_random_weights_train_everything_from_the_start(tmp_path, tiny):
    out = tmp_path / "run"
    log = []
    finetune(ARCH, str(tiny), config(out, epochs=1), log=_collect(log))
    assert any("random weights, so everything trains from the start" in line for line in log)
    assert [r["phase"] for r in rows_of(out)] == ["full"]
    first = timm.create_model(ARCH)
    after = weights(out / "last.safetensors")
    assert not torch.equal(after["layer1.0.conv1.weight"], first.state_dict()["layer1.0.conv1.weight"])
    recipe = read_recipe(out / "last.safetensors")
    assert recipe["options"]["init"] == "paper"


# ------------------------------------------------------------------ the plain baseline


def test_no_se_is_the_same_recipe_on_the_plain_model(tmp_path, tiny, plain4, monkeypatch):
    seen = {}
    real = fdata.ImageDataset.__getitem__

    def record(self, i):
        seen.setdefault(current[0], []).append(self.items[i][0])
        return real(self, i)
    monkeypatch.setattr(fdata.ImageDataset, "__getitem__", record)
    current = ["se"]
    finetune(ARCH, str(tiny), config(tmp_path / "se", seed=3), weights=plain4)
    current[0] = "plain"
    plain = finetune(ARCH, str(tiny), config(tmp_path / "plain", seed=3), weights=plain4, options=None)
    assert seen["se"] == seen["plain"] and len(seen["se"]) > 32  # same images, same order, start eval included
    model = seify.load(plain.out / "best.safetensors")
    assert not any(isinstance(m, SqueezeExcite) for m in model.modules())
    recipe = read_recipe(plain.out / "best.safetensors")
    assert recipe["options"] is None and recipe["sites"] == []
    again = evaluate_folder(str(plain.out / "best.safetensors"), str(tiny), device="cpu", workers=0)
    assert again["top1"] == pytest.approx(plain.best_top1)
    from seify.profile import profile
    report = profile(str(plain.out / "best.safetensors"), latency=False).to_dict()
    assert report["input_size"] == [3, 32, 32]
    assert report["base"]["params"] == sum(p.numel() for p in timm.create_model(ARCH, num_classes=4).parameters())
    with pytest.raises(SeifyError, match="already has SE blocks"):
        finetune(str(tmp_path / "se" / "best.safetensors"), str(tiny), config(tmp_path / "z"), options=None)


def test_evaluate_scores_a_plain_checkpoint(cli, tmp_path, tiny, plain4):
    code, stdout, err = cli("evaluate", ARCH, tiny, "--weights", plain4, "--img-size", "32", "--json",
                            "--workers", "0")
    assert code == 0, err
    report = json.loads(stdout)
    model = timm.create_model(ARCH, num_classes=4)
    model.load_state_dict(weights(plain4))
    assert report["top1"] == pytest.approx(_accuracy(model, tiny))
    assert "sorted order" in report["notes"][0]
    code, _, err = cli("evaluate", ARCH, tiny, "--weights", save_weights(timm.create_model(ARCH),
                                                                                tmp_path / "r1000.safetensors"))
    assert code == 2 and "1000 outputs but" in err


# ------------------------------------------------------------------ resuming


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, tiny, se_file):
    straight = finetune(se_file, str(tiny), config(tmp_path / "straight", epochs=3))
    out = tmp_path / "cut"
    cut = finetune(se_file, str(tiny), config(out, epochs=3), log=KillAt)
    assert cut.stopped_by == "SIGTERM"
    from seify.finetune.state import RunFolder
    folder = RunFolder(out)
    state, _ = folder.read(folder.committed())
    assert (state["progress"]["epoch"], state["progress"]["batch_in_epoch"]) == (1, 3)  # mid-epoch 2
    resumed = finetune(se_file, str(tiny), config(out, epochs=3, resume=True))
    assert resumed.stopped_by is None
    w1, w2 = weights(straight.out / "last.safetensors"), weights(out / "last.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    keys = ("epoch", "phase", "train_loss", "val_loss", "val_top1", "lr")
    assert [[r[k] for k in keys] for r in rows_of(straight.out)] == [[r[k] for k in keys] for r in rows_of(out)]


def test_resume_says_what_it_does(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=2))
    log = []
    before = (out / "checkpoint.json").read_text()
    done = finetune(se_file, str(tiny), config(out, resume=True), log=_collect(log))
    assert any("is complete (2 epochs" in line and "nothing to do" in line for line in log)
    assert (out / "checkpoint.json").read_text() == before and done.epochs_run == 2
    with pytest.raises(SeifyError, match=r"planned for 2 epochs; epochs 4 stretches its cosine schedule .* extend"):
        Trainer(se_file, str(tiny), config(out, epochs=4, resume=True))
    log.clear()
    longer = finetune(se_file, str(tiny), config(out, epochs=4, resume=True, extend=True), log=_collect(log))
    assert longer.epochs_run == 4 and [r["epoch"] for r in rows_of(out)] == [1, 2, 3, 4]
    assert any("stretches its cosine schedule" in line for line in log)
    with pytest.raises(SeifyError, match="batch_size 4 differs from the run's 8"):
        Trainer(se_file, str(tiny), config(out, batch_size=4, resume=True))
    with pytest.raises(SeifyError, match="this run fine-tunes"):
        Trainer("resnet34", str(tiny), config(out, resume=True))


def test_existing_run_is_protected(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    with pytest.raises(SeifyError, match="already holds a run; pass resume .* or force"):
        Trainer(se_file, str(tiny), config(out, epochs=1))
    with pytest.raises(SeifyError, match="nothing to resume"):
        Trainer(se_file, str(tiny), config(tmp_path / "fresh", resume=True))


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path, tiny, se_file, monkeypatch):
    import seify.finetune.loop as loop
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    good = weights(out / "last.safetensors")
    real = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SeifyError, match="loss became nan .* last good checkpoint is"):
        finetune(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True))
    assert all(torch.equal(good[k], v) for k, v in weights(out / "last.safetensors").items())


def test_plain_model_is_converted_first(tmp_path, tiny):
    result = finetune(ARCH, str(tiny), config(tmp_path / "run", epochs=1))
    model = seify.load(result.out / "last.safetensors")
    assert type(model.layer1[0].se).__name__ == "SqueezeExcite"


def test_threads_leave_busy_cores_alone(monkeypatch):
    from seify.finetune import dist
    cpu = torch.device("cpu")
    monkeypatch.setattr(dist, "usable_cores", lambda: 4)
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 2.1)
    assert dist.choose_threads(None, cpu, 1)[0] == 2
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 0.1)
    assert dist.choose_threads(None, cpu, 1)[0] == 4 and dist.choose_threads(None, cpu, 2)[0] == 2
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 7.0)
    assert dist.choose_threads(None, cpu, 1)[0] == 1
    assert dist.choose_threads(3, cpu, 1) == (3, "--threads")


# ------------------------------------------------------------------ CLI, distributed


def test_cli_finetune_evaluate_profile(cli, tmp_path, tiny, se_file):
    out = tmp_path / "run"
    code, stdout, err = cli("finetune", se_file, tiny, "--out", out, "--epochs", "1", "--batch-size", "8",
                            "--img-size", "32", "--workers", "0", "--device", "cpu", "--log-every", "2",
                            "--aug", "none", "--threads", "1")
    assert code == 0, err
    assert "epoch 1/1: train loss" in stdout and "step 2/4 loss" in stdout and "best val top-1" in stdout
    assert "augmentation: none" in stdout and "1 CPU threads (--threads)" in stdout
    code, stdout, _ = cli("evaluate", out / "best.safetensors", tiny, "--json", "--workers", "0")
    report = json.loads(stdout)
    assert report["images"] == 16 and len(report["per_class"]) == 4 and report["img_size"] == 32
    assert sum(map(sum, report["confusion"])) == 16
    code, stdout, _ = cli("profile", out / "best.safetensors", "--no-latency", "--json")
    assert code == 0 and json.loads(stdout)["added_params"] > 0 and json.loads(stdout)["input_size"] == [3, 32, 32]
    code, _, err = cli("finetune", se_file, tmp_path / "nowhere", "--out", tmp_path / "x")
    assert code == 2 and "does not exist" in err
    code, _, err = cli("finetune", se_file, tiny, "--out", out, "--resume", "--batch-size", "4")
    assert code == 2 and "--batch-size 4 differs from the run's 8" in err


@pytest.mark.slow
def test_sigint_from_outside_exits_130(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "seify", "finetune", se_file, str(tiny), "--out", str(out),
                             "--epochs", "200", "--batch-size", "8", "--img-size", "32", "--workers", "0",
                             "--device", "cpu", "--log-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "SIGINT: saved a checkpoint" in stdout and "continue with the same command plus --resume" in stdout
    assert rows_of(out)[0]["epoch"] == 1


@pytest.mark.slow
def test_two_process_gloo_job(tmp_path, tiny, se_file):
    out = tmp_path / "ddp"
    here = Path(__file__).parent  # rank_weights.py: seify's command, then each rank's weights written
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here), "RANK_WEIGHTS": str(tmp_path / "rank")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(here / "rank_weights.py"), "finetune", se_file,
                          str(tiny), "--out",
                          str(out), "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--workers", "0",
                          "--device", "cpu", "--log-every", "0"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("epoch 1/1: train loss") == 1  # only rank 0 speaks
    assert "device cpu x2" in run.stdout
    assert len(rows_of(out)) == 1
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4  # 32 images / (2 ranks x 4) per epoch
    assert seify.load(out / "best.safetensors").get_classifier().out_features == 4
    ranks = [weights(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]  # both ranks hold the model rank 0 saved
    saved = weights(out / "last.safetensors")
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], saved[k]) for k in saved)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ema_weights_are_judged_and_kept(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, ema_decay=0.9))
    from seify.finetune.state import RunFolder
    folder = RunFolder(out)
    assert "ema" in folder.read(folder.committed())[0]
    best, last = weights(out / "best.safetensors"), weights(out / "last.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in last)  # best holds the average, last the raw weights
    again = evaluate_folder(str(out / "best.safetensors"), str(tiny / "val"), device="cpu", workers=0)
    assert again["top1"] == pytest.approx(max(r["val_top1"] for r in rows_of(out)))


def test_torchvision_model_gets_a_new_head(tmp_path, tiny):
    result = finetune("torchvision:mobilenet_v2", str(tiny), config(tmp_path / "run", epochs=1))
    model = seify.load(result.out / "best.safetensors")
    assert model.classifier[1].out_features == 4
    again = evaluate_folder(str(result.out / "best.safetensors"), str(tiny), device="cpu", workers=0)
    assert again["top1"] == pytest.approx(result.best_top1)


@pytest.mark.slow
def test_demo_reaches_90_percent(tmp_path):
    # the demo at 40 px, 120 images a class and 3 epochs (it runs 64 px, 160 and 5): 96% here, a fifth of the work
    result = run(tmp_path / "demo", epochs=3, size=40, train_per_class=120)
    assert result["top1"] >= 90.0
    for key in ("best", "curves", "metrics", "converted"):
        assert Path(result[key]).is_file()


def test_evaluate_scores_the_images_the_run_held_out(cli, tmp_path, tiny, plain4):
    """Fine-tuned with --val-split on one DATA/<class> tree, the model is scored on the same held-out images by
    default: what the run reported, not the training images too."""
    tree = tiny / "train"
    out = tmp_path / "run"
    result = finetune(ARCH, str(tree), config(out, epochs=1, val_split=0.25, seed=2), weights=plain4,
                      log=SilentLog)
    code, stdout, err = cli("evaluate", out / "best.safetensors", tree, "--json", "--workers", "0")
    assert code == 0, err
    report = json.loads(stdout)
    _, _, held_out = fdata.discover(tree, 0.25, 2)
    assert report["images"] == len(held_out.items) == 8
    assert report["top1"] == pytest.approx(result.best_top1) and "--val-split 0.25 --seed 2" in report["scored"]
    code, stdout, _ = cli("evaluate", out / "best.safetensors", tree, "--all-images", "--json", "--workers", "0")
    assert json.loads(stdout)["images"] == 32
    code, stdout, _ = cli("evaluate", out / "best.safetensors", tree, "--workers", "0")
    assert "(8 images: the images of " in stdout and "that the run held out" in stdout
    # a plain checkpoint on a single tree: every image unless a split is asked for, and the output says which
    code, stdout, _ = cli("evaluate", ARCH, tree, "--weights", plain4, "--img-size", "32", "--workers", "0")
    assert f"(32 images: every image of {tree})" in stdout
    code, stdout, _ = cli("evaluate", ARCH, tree, "--weights", plain4, "--img-size", "32", "--val-split", "0.5",
                          "--json", "--workers", "0")
    assert json.loads(stdout)["images"] == 16
    code, _, err = cli("evaluate", ARCH, tree, "--weights", plain4, "--val-split", "0.5", "--all-images")
    assert code == 2 and "not both" in err
    code, _, err = cli("evaluate", ARCH, tree, "--weights", plain4, "--batch-size", "100000")
    assert code == 2 and "--batch-size must be a whole number from 1 to 65536" in err


def test_evaluate_names_the_files_it_skipped(cli, tmp_path, tiny, plain4):
    import shutil
    root = tmp_path / "val"
    shutil.copytree(tiny / "val", root)
    (root / CLASSES[0] / "broken.jpg").write_bytes(b"not an image")
    code, stdout, err = cli("evaluate", ARCH, root, "--weights", plain4, "--img-size", "32", "--workers", "0")
    assert code == 0, err
    assert f"(16 images: every image of {root}; 1 unreadable file(s) skipped, first {root / CLASSES[0]}" in stdout


@pytest.mark.parametrize("spec", [ARCH, "torchvision:mobilenet_v2"])
def test_a_fine_tuned_file_tells_timm_how_to_feed_it(tmp_path, tiny, spec):
    """timm's own data-config resolution, on the loaded file, gives the size, classes and normalisation the
    model was fine-tuned with, not its base model's 224 px and 1000 classes."""
    out = tmp_path / "run"
    finetune(spec, str(tiny), config(out, epochs=1, img_size=36), log=SilentLog)
    model = seify.load(out / "best.safetensors")
    data_config = timm.data.resolve_data_config({}, model=model)
    recipe = read_recipe(out / "best.safetensors")
    assert data_config["input_size"] == (3, 36, 36)
    assert data_config["mean"] == tuple(recipe["data_config"]["mean"])
    assert data_config["crop_pct"] == recipe["data_config"]["crop_pct"]
    assert model.pretrained_cfg["num_classes"] == 4 and model.pretrained_cfg["label_names"] == sorted(CLASSES)


def test_a_one_epoch_plan_says_only_the_new_parts_train(tmp_path, tiny, plain4):
    lines = []
    finetune(ARCH, str(tiny), config(tmp_path / "run", epochs=1), weights=plain4, log=_collect(lines))
    plan = next(line for line in lines if line.startswith("plan:"))
    assert "all 1 epoch(s) train only the new parts" in plan and "stay frozen" in plan
    assert "then everything trains" not in plan


def test_the_finetune_summary_names_the_files_it_skipped(cli, tmp_path, tiny, se_file):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(tiny, root)
    (root / "train" / CLASSES[0] / "broken.jpg").write_bytes(b"not an image")
    code, stdout, err = cli("finetune", se_file, root, "--out", tmp_path / "run", "--epochs", "1", "--batch-size",
                            "8", "--workers", "0", "--threads", "1", "--log-every", "0")
    assert code == 0, err
    assert f"unreadable files skipped\t1 (first: {root / 'train' / CLASSES[0] / 'broken.jpg'})" in stdout
