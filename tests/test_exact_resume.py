"""A run stopped anywhere (SIGTERM or SIGKILL, loading processes alive, one rank or two) and resumed with the same
command plus --resume ends with the weights of the run that was never stopped, bit for bit."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import KillAt, config, weights
from seify.finetune.loop import Trainer, finetune
from seify.finetune.progress import PlainLog
from seify.finetune.state import RunFolder
from seify.images.folders import ImageDataset, transforms

LOADERS = dict(epochs=2, workers=2, aug="light")  # the default CPU path: loading processes, random crops
FLAGS = ["--epochs", "2", "--batch-size", "8", "--img-size", "32", "--device", "cpu", "--log-every", "0",
         "--lr", "0.001", "--warmup-epochs", "0.5", "--threads", "1", "--aug", "light"]


def same_weights(a: Path, b: Path) -> bool:
    w1, w2 = weights(a / "last.safetensors"), weights(b / "last.safetensors")
    return w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny, se_file):
    """The run that was never stopped."""
    return finetune(se_file, str(tiny), config(tmp_path_factory.mktemp("straight") / "run", **LOADERS)).out


def test_augmentation_is_drawn_per_image_not_per_loader(tiny, monkeypatch):
    """An image's crop depends on (seed, epoch, index): not on which process loads it, nor on what was drawn
    before it. The global random state the training draws from is left as it was, the CUDA generators (dropout on
    a GPU) never seeded nor set."""
    touched = []
    for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **k: touched.append(name))
    import timm
    from timm.data import resolve_data_config

    from seify.images.folders import Augmentation
    cfg = resolve_data_config({}, model=timm.create_model("test_resnet"))
    items = [(str(p), 0) for p in sorted((tiny / "train").rglob("*.jpg"))][:4]
    dataset = ImageDataset(items, transforms(cfg, 32, Augmentation.choose("imagenet", 32)), seed=3)
    before = torch.get_rng_state()
    first = [dataset[i][0] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)
    assert torch.equal(dataset[2][0], first[2])  # another history, the same draw
    dataset.epoch = 1
    assert not torch.equal(dataset[2][0], first[2])  # another epoch, another crop
    assert touched == []


@pytest.mark.slow
def test_sigterm_with_loading_processes_resumes_exactly(tmp_path, tiny, se_file, straight):
    for at in (3, 6):  # mid-epoch 1 and mid-epoch 2 (4 steps an epoch)
        out = tmp_path / f"cut{at}"
        stop = type("Stop", (KillAt,), {"at": at})
        assert finetune(se_file, str(tiny), config(out, **LOADERS), log=stop).stopped_by == "SIGTERM"
        finetune(se_file, str(tiny), config(out, resume=True, **LOADERS))
        assert same_weights(straight, out), f"stopped after step {at}"


def _committed_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill_after(command: list[str], out: Path, step: int, env=None) -> None:
    """Start ``command``, SIGKILL it with everything it started (loaders, ranks) at once, as a scheduler ends a job,
    once a checkpoint at ``step`` or later is committed."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while _committed_step(out) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGSTOP)  # frozen first, so that none of them commits another checkpoint
        except ProcessLookupError:
            pass
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert 0 < _committed_step(out) < 8, "the run must be killed mid-way"


@pytest.mark.slow
def test_sigkill_with_loading_processes_resumes_exactly(tmp_path, tiny, se_file, straight):
    for step in (2, 5):
        out = tmp_path / f"killed{step}"
        command = [sys.executable, "-m", "seify", "finetune", se_file, str(tiny), "--out", str(out), "--workers", "2",
                   "--save-every", "1", *FLAGS]
        _kill_after(command, out, step)
        resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert same_weights(straight, out), f"killed after step {step}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_match_the_run_never_stopped(tmp_path, tiny, se_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "seify", "finetune", se_file, str(tiny), "--out", str(out), *FLAGS,
                "--batch-size", "4", "--workers", "1", *extra]
    whole = tmp_path / "whole"
    assert subprocess.run(torchrun(whole), capture_output=True, env=env, timeout=300).returncode == 0
    out = tmp_path / "cut"
    _kill_after(torchrun(out, "--save-every", "1"), out, 3, env)
    folder = RunFolder(out)
    state, _ = folder.read(folder.committed())
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    resumed = subprocess.run(torchrun(out, "--save-every", "1", "--resume"), capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(whole, out)


def test_a_run_killed_before_its_first_checkpoint_starts_over_on_resume(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    Trainer(se_file, str(tiny), config(out, epochs=1)).close()  # what a kill before the first commit leaves
    assert (out / "run.json").exists() and RunFolder(out).committed() is None
    lines: list[str] = []

    class Collect(PlainLog):
        def line(self, text):
            lines.append(text)
    again = finetune(se_file, str(tiny), config(out, epochs=1, resume=True), log=Collect)
    assert again.epochs_run == 1 and RunFolder(out).committed() is not None
    assert any("stopped before its first checkpoint: starting it from the beginning" in line for line in lines)
    fresh = finetune(se_file, str(tiny), config(tmp_path / "fresh", epochs=1))
    assert same_weights(fresh.out, out)


def test_a_checkpoint_holds_numpys_random_state_too():
    import random

    import numpy

    from seify.finetune import rng
    saved = rng.capture(torch.device("cpu"))
    drawn = numpy.random.rand(3), random.random(), torch.rand(3)
    numpy.random.seed(99)
    rng.restore(saved, torch.device("cpu"))
    again = numpy.random.rand(3), random.random(), torch.rand(3)
    assert numpy.array_equal(drawn[0], again[0]) and drawn[1] == again[1] and torch.equal(drawn[2], again[2])
