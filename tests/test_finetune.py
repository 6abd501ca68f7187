"""seify finetune / evaluate / demo on small data drawn by the demo's generator."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import seify
from seify.demo import CLASSES, make_dataset
from seify.errors import SeifyError
from seify.finetune import data as fdata
from seify.finetune.evaluate import evaluate_folder
from seify.finetune.loop import FinetuneConfig, Trainer, finetune
from seify.finetune.progress import PlainLog

from conftest import realistic, save_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=8, val_per_class=4, size=32)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    import timm
    folder = tmp_path_factory.mktemp("m")
    trained = save_weights(realistic(timm.create_model("resnet18")), folder / "r18.safetensors")
    result = seify.convert("resnet18", weights=trained, input_size=(3, 32, 32))
    return str(seify.save(result, folder / "r18-se.safetensors"))


def config(out, **kw):
    base = dict(out=str(out), epochs=2, batch_size=8, img_size=32, workers=0, device="cpu", log_every=0,
                lr=1e-3, warmup_epochs=0.5)
    return FinetuneConfig(**{**base, **kw})


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


# ------------------------------------------------------------------ data


def test_data_layouts_and_errors(tmp_path, tiny):
    classes, train, val = fdata.discover(tiny)
    assert classes == sorted(CLASSES) and len(train.items) == 32 and len(val.items) == 16
    with pytest.raises(SeifyError, match="no train/ folder.*--val-split"):
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


# ------------------------------------------------------------------ training


def test_run_writes_everything(tmp_path, tiny, r18):
    out = tmp_path / "run"
    result = finetune(r18, str(tiny), config(out))
    for name in ("last.safetensors", "best.safetensors", "state.pt", "metrics.jsonl", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["phase"] for r in rows] == ["se_warmup", "full"]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,phase,train_loss")
    assert Image.open(out / "curves.png").size == (900, 360)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 8
    best = seify.load(out / "best.safetensors")
    from seify.checkpoint import read_recipe
    recipe = read_recipe(out / "best.safetensors")
    assert recipe["classes"] == sorted(CLASSES) and recipe["num_classes"] == 4
    assert best.get_classifier().out_features == 4
    # an independent evaluation of the best file reproduces the logged validation accuracy
    again = evaluate_folder(str(out / "best.safetensors"), str(tiny / "val"), device="cpu", workers=0)
    assert again["top1"] == pytest.approx(max(r["val_top1"] for r in rows))
    assert result.best_top1 == pytest.approx(again["top1"])


def test_se_warmup_freezes_backbone_and_its_batchnorm(tmp_path, tiny, r18):
    out = tmp_path / "run"
    finetune(r18, str(tiny), config(out, epochs=1))
    before, after = weights(r18), weights(out / "last.safetensors")
    assert torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert not torch.equal(before["layer1.0.se.fc2.weight"], after["layer1.0.se.fc2.weight"])
    assert after["fc.weight"].shape == (4, 512)


def test_seed_makes_runs_identical(tmp_path, tiny, r18):
    a = finetune(r18, str(tiny), config(tmp_path / "a", seed=5)).out
    b = finetune(r18, str(tiny), config(tmp_path / "b", seed=5)).out
    c = finetune(r18, str(tiny), config(tmp_path / "c", seed=6)).out
    wa, wb, wc = (weights(p / "last.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


class _KillAt(PlainLog):
    """Sends this process SIGTERM after a given step, as a scheduler or a user would."""
    at = 6

    def step(self, batch, loss, top1, lr, rate):
        self.count = getattr(self, "count", 0) + 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, tiny, r18):
    straight = finetune(r18, str(tiny), config(tmp_path / "straight", epochs=3))
    out = tmp_path / "cut"
    cut = finetune(r18, str(tiny), config(out, epochs=3), log=_KillAt)
    assert cut.stopped_by == "SIGTERM"
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 3)  # the step in flight completes, mid-epoch 2
    resumed = finetune(r18, str(tiny), config(out, epochs=3, resume=True))
    assert resumed.stopped_by is None
    w1, w2 = weights(straight.out / "last.safetensors"), weights(out / "last.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    rows1 = [json.loads(x) for x in (straight.out / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "phase", "train_loss", "val_loss", "val_top1", "lr")
    assert [[r[k] for k in keys] for r in rows1] == [[r[k] for k in keys] for r in rows2]


def test_existing_run_is_protected(tmp_path, tiny, r18):
    out = tmp_path / "run"
    finetune(r18, str(tiny), config(out, epochs=1))
    with pytest.raises(SeifyError, match="already holds a run; pass --resume .* or --force"):
        Trainer(r18, str(tiny), config(out, epochs=1))
    with pytest.raises(SeifyError, match="nothing to resume"):
        Trainer(r18, str(tiny), config(tmp_path / "fresh", resume=True))


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path, tiny, r18, monkeypatch):
    import seify.finetune.loop as loop
    out = tmp_path / "run"
    finetune(r18, str(tiny), config(out, epochs=1, save_every=1))
    good = weights(out / "last.safetensors")
    real = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SeifyError, match="loss became nan .* last good checkpoint is"):
        finetune(r18, str(tiny), config(out, epochs=2, resume=False, force=True))
    assert all(torch.equal(good[k], v) for k, v in weights(out / "last.safetensors").items())


def test_plain_model_is_converted_first(tmp_path, tiny):
    result = finetune("resnet18", str(tiny), config(tmp_path / "run", epochs=1))
    model = seify.load(result.out / "last.safetensors")
    assert type(model.layer1[0].se).__name__ == "SqueezeExcite"


# ------------------------------------------------------------------ CLI, distributed, demo


def test_cli_finetune_evaluate_profile(cli, tmp_path, tiny, r18):
    out = tmp_path / "run"
    code, stdout, err = cli("finetune", r18, tiny, "--out", out, "--epochs", "1", "--batch-size", "8",
                            "--img-size", "32", "--workers", "0", "--device", "cpu", "--log-every", "2")
    assert code == 0, err
    assert "epoch 1/1: train loss" in stdout and "step 2/4 loss" in stdout and "best val top-1" in stdout
    code, stdout, _ = cli("evaluate", out / "best.safetensors", tiny, "--json", "--workers", "0")
    report = json.loads(stdout)
    assert report["images"] == 16 and len(report["per_class"]) == 4
    assert sum(map(sum, report["confusion"])) == 16
    code, stdout, _ = cli("profile", out / "best.safetensors", "--no-latency", "--json")
    assert code == 0 and json.loads(stdout)["added_params"] > 0
    code, _, err = cli("finetune", r18, tmp_path / "nowhere", "--out", tmp_path / "x")
    assert code == 2 and "does not exist" in err


def test_sigint_from_outside_exits_130(tmp_path, tiny, r18):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "seify", "finetune", r18, str(tiny), "--out", str(out),
                             "--epochs", "200", "--batch-size", "8", "--img-size", "32", "--workers", "0",
                             "--device", "cpu", "--log-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "SIGINT: saved" in stdout and "continue with --resume" in stdout
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] >= 1


def test_two_process_gloo_job(tmp_path, tiny, r18):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "seify", "finetune", r18, str(tiny), "--out", str(out),
                          "--epochs", "2", "--batch-size", "4", "--img-size", "32", "--workers", "0",
                          "--device", "cpu", "--log-every", "0"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("epoch 2/2: train loss") == 1  # only rank 0 speaks
    assert "device cpu x2" in run.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 8  # 32 images / (2 ranks x 4) = 4 steps per epoch
    assert seify.load(out / "best.safetensors") is not None


def test_demo_reaches_90_percent(tmp_path):
    from seify.demo import run
    start = time.perf_counter()
    result = run(tmp_path / "demo")
    seconds = time.perf_counter() - start
    print(f"demo: {result['top1']:.1f}% in {seconds:.0f}s")
    assert result["top1"] >= 90.0
    assert seconds < 180
    for key in ("best", "curves", "metrics", "converted"):
        assert Path(result[key]).is_file()


def test_ema_weights_are_judged_and_kept(tmp_path, tiny, r18):
    out = tmp_path / "run"
    finetune(r18, str(tiny), config(out, ema_decay=0.9))
    state = torch.load(out / "state.pt", weights_only=True)
    assert "ema" in state
    best, last = weights(out / "best.safetensors"), weights(out / "last.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in last)  # best holds the average, last the raw weights
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    again = evaluate_folder(str(out / "best.safetensors"), str(tiny / "val"), device="cpu", workers=0)
    assert again["top1"] == pytest.approx(max(r["val_top1"] for r in rows))


def test_sigkill_then_resume_loses_at_most_the_epoch(tmp_path, tiny, r18):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "seify", "finetune", r18, str(tiny), "--out", str(out), "--epochs", "4",
            "--batch-size", "8", "--img-size", "32", "--workers", "0", "--device", "cpu", "--log-every", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 4
    run = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]
    assert f"resuming {out} at epoch {done + 1}" in run.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_torchvision_model_gets_a_new_head(tmp_path, tiny):
    result = finetune("torchvision:mobilenet_v2", str(tiny), config(tmp_path / "run", epochs=1))
    model = seify.load(result.out / "best.safetensors")
    assert model.classifier[1].out_features == 4
    again = evaluate_folder(str(result.out / "best.safetensors"), str(tiny), device="cpu", workers=0)
    assert again["top1"] == pytest.approx(result.best_top1)
