"""Never lose or corrupt a run: whole checkpoints whatever kills the process, one writer per folder, finite weights
only, data that fails soft, and every bad input answered in one line with exit code 2."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import seify
from conftest import ARCH, KillAt, config, rows_of, save_weights, weights
from seify.errors import SeifyError
from seify.finetune.loop import Trainer, finetune
from seify.finetune.state import RunFolder

# A driver that imports torch once and forks a child per run, so a SIGKILL before the Nth rename costs a fork,
# not an interpreter start. The parent runs no torch op before forking (no thread pool to inherit).
KILL_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import matplotlib.backends.backend_agg, timm.models  # imported once here, not in every child
    from conftest import config
    from seify.finetune.loop import finetune
    from seify.finetune.progress import SilentLog
    from seify.finetune.state import RunFolder
    data, root = sys.argv[2], sys.argv[3]
    RUN = dict(epochs=1, batch_size=8, save_every=3, img_size=32, seed=1)  # commits at step 3 and at the end (4)

    def child(out, kill_at, **extra):
        pid = os.fork()
        if pid == 0:
            count, real = [0], os.replace

            def replace(src, dst):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst)
            os.replace = replace
            finetune("test_resnet", data, config(out, **RUN, **extra), log=SilentLog)
            with open(os.path.join(root, "renames"), "w") as f:
                f.write(str(count[0]))
            os._exit(0)
        return os.waitpid(pid, 0)[1]

    assert child(os.path.join(root, "straight"), 0) == 0
    total = int(open(os.path.join(root, "renames")).read())
    outcomes = []
    for n in range(1, total + 1):
        out = os.path.join(root, f"kill-{n}")
        killed = child(out, n)
        committed = RunFolder(out).committed() is not None
        again = child(out, 0, resume=committed, force=not committed)
        outcomes.append({"n": n, "killed": os.WIFSIGNALED(killed), "resumed": committed, "status": again})
    print(json.dumps({"total": total, "outcomes": outcomes}))
""")


@pytest.mark.slow
def test_sigkill_before_every_rename_then_resume_is_exact(tmp_path, tiny):
    run = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(Path(__file__).parent), str(tiny), str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["total"] >= 15  # run.json, then per commit: weights, folder, pointer, the files users open
    straight = weights(tmp_path / "straight" / "last.safetensors")
    straight_rows = rows_of(tmp_path / "straight")
    for outcome in report["outcomes"]:
        out = tmp_path / f"kill-{outcome['n']}"
        assert outcome["killed"] and outcome["status"] == 0, outcome
        got = weights(out / "last.safetensors")
        assert all(torch.equal(straight[k], got[k]) for k in straight), outcome
        rows = rows_of(out)
        assert [r["epoch"] for r in rows] == [1], outcome  # the epoch's row exactly once
        assert [r["val_top1"] for r in rows] == [r["val_top1"] for r in straight_rows], outcome
        assert not list(out.glob(".*.tmp")) and len(list((out / "checkpoints").iterdir())) == 1, outcome
    assert any(o["resumed"] for o in report["outcomes"]) and any(not o["resumed"] for o in report["outcomes"])


def test_leftovers_of_a_killed_write_are_removed(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    (out / ".last.safetensors.abc.tmp").write_bytes(b"x" * 1000)
    (out / "checkpoints" / ".ckpt-000009.tmp").mkdir()
    (out / "checkpoints" / "ckpt-000009").mkdir()  # renamed, but its pointer never written
    finetune(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True))
    assert not list(out.glob(".*.tmp"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [RunFolder(out).committed().name]


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    first = Trainer(se_file, str(tiny), config(out, epochs=1))
    try:
        with pytest.raises(SeifyError, match=f"{out} is in use by a running fine-tune \\(pid {os.getpid()}\\)"):
            Trainer(se_file, str(tiny), config(out, epochs=1, force=True))
    finally:
        first.close()
    (out / ".lock").write_text("999999")  # a lock file left by a dead process is not a lock
    Trainer(se_file, str(tiny), config(out, epochs=1, force=True)).close()


def test_a_second_process_gets_one_line_and_exit_2(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    holder = Trainer(se_file, str(tiny), config(out, epochs=1))
    try:
        run = subprocess.run([sys.executable, "-m", "seify", "finetune", se_file, str(tiny), "--out", str(out),
                              "--force", "--workers", "0"], capture_output=True, text=True, timeout=300)
    finally:
        holder.close()
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "in use by a running fine-tune" in run.stderr


def test_non_finite_weights_are_never_saved(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    good = weights(out / "last.safetensors")
    trainer = Trainer(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(SeifyError, match="non-finite values .* nothing was saved"):
        trainer._commit(best_changed=True)
    trainer.close()
    assert all(torch.equal(good[k], v) for k, v in weights(out / "last.safetensors").items())
    assert all(torch.isfinite(v).all() for v in weights(out / "best.safetensors").values())
    assert not list(out.glob(".*.tmp"))


def test_a_run_that_saved_nothing_says_so(tmp_path, tiny, se_file, monkeypatch):
    import seify.finetune.loop as loop
    real = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(SeifyError, match="loss became .* Nothing was saved"):
        finetune(se_file, str(tiny), config(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.safetensors").exists()


@pytest.fixture
def damaged(tmp_path, tiny):
    """The tiny data with three files that pass the header check but cannot be decoded."""
    import shutil
    root = tmp_path / "damaged"
    shutil.copytree(tiny, root)
    import numpy as np
    cut = root / "train" / "gradient" / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.6)])
    import struct
    import zlib
    png = root / "train" / "stripes_vertical" / "corrupt.png"
    Image.new("RGB", (32, 32), "red").save(png)
    raw = bytearray(png.read_bytes())
    at = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[at - 4:at])[0]
    raw[at + 6:at + 4 + length] = b"\xff" * (length - 2)  # garbage after the zlib header, with a valid CRC
    raw[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(raw[at:at + 4 + length]))
    png.write_bytes(bytes(raw))
    bomb = root / "train" / "stripes_diagonal" / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)
    return root


def test_undecodable_images_are_skipped_counted_and_reported(tmp_path, damaged, se_file):
    from seify.images import folders as fdata
    _, train, _ = fdata.discover(damaged)
    assert any(p.endswith("bomb.png") for p in train.skipped)  # refused by its size before training
    assert {Path(p).name for p, _ in train.items} >= {"cut.jpg", "corrupt.png"}  # their headers read fine
    lines = []

    class Log(seify.finetune.progress.PlainLog):
        def line(self, text):
            lines.append(text)
    result = finetune(se_file, str(damaged), config(tmp_path / "run", epochs=1, batch_size=17), log=Log)  # all 34
    assert result.epochs_run == 1
    assert any("could not be decoded this epoch" in line for line in lines)
    assert rows_of(tmp_path / "run")[0]["undecodable"] == 2
    (damaged / "train" / "stripes_diagonal" / "bomb.png").unlink()  # else --strict-data stops at the start
    with pytest.raises(SeifyError, match="cannot be decoded .* strict_data"):
        finetune(se_file, str(damaged), config(tmp_path / "strict", epochs=1, batch_size=17, strict_data=True))


def test_disk_full_is_an_input_problem_and_keeps_the_last_checkpoint(tmp_path, tiny, se_file, monkeypatch):
    import errno

    import safetensors.torch
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    before = (out / "checkpoint.json").read_text()
    real = safetensors.torch.save_model

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(SeifyError, match="no space left on device.*previous checkpoint .* is kept"):
        finetune(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True))
    monkeypatch.setattr(safetensors.torch, "save_model", real)
    assert (out / "checkpoint.json").read_text() == before and not list((out / "checkpoints").glob(".*"))
    assert finetune(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True)).epochs_run == 2


def test_output_folders_and_files_are_checked_first(cli, tmp_path, tiny, se_file):
    own = tmp_path / "own"
    own.mkdir()
    (own / "metrics.csv").write_text("my numbers")
    code, _, err = cli("finetune", se_file, tiny, "--out", own, "--workers", "0")
    assert code == 2 and "holds files a run writes (metrics.csv)" in err
    assert (own / "metrics.csv").read_text() == "my numbers"
    run = tmp_path / "run"
    finetune(se_file, str(tiny), config(run, epochs=1))
    code, _, err = cli("finetune", run / "best.safetensors", tiny, "--out", run, "--force", "--workers", "0")
    assert code == 2 and "is inside" in err and (run / "best.safetensors").is_file()
    assert seify.load(run / "best.safetensors").get_classifier().out_features == 4
    afile = tmp_path / "a-file"
    afile.write_text("x")
    code, _, err = cli("finetune", se_file, tiny, "--out", afile)
    assert code == 2 and "is a file" in err
    for target, message in ((tmp_path, "it is a folder"), (afile / "x.safetensors", "is not an existing folder"),
                            ("/proc/x.safetensors", "cannot write in /proc")):
        code, _, err = cli("convert", "resnet18", "-o", target, "--input-size", "3,32,32")
        assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("recipe,message", [
    ([1, 2], "expected a JSON object"), ("resnet18", "expected a JSON object"),
    ({"model": "resnet18"}, "'num_classes' missing"),
    ("DEEP", "more than 8 nested parents"),
    ("WRONG_TYPE", "'num_classes' missing or not a int"),
    ("HUGE", "num_classes 10000000000 out of range"),
    ("UNKNOWN_OPTION", "unknown SE option(s) ratio"),
    ("PATH_MODEL", "unknown model '../../etc/passwd'"),
])
def test_tampered_recipes_are_one_line(cli, tmp_path, recipe, message):
    from safetensors.torch import save_file
    good = seify.convert("resnet18", input_size=(3, 32, 32))
    base = good.recipe()
    if recipe == "DEEP":
        recipe = base
        for _ in range(12):
            recipe = {**base, "parent": recipe}
    elif recipe == "WRONG_TYPE":
        recipe = {**base, "num_classes": "1000"}
    elif recipe == "HUGE":
        recipe = {**base, "num_classes": 10**10}
    elif recipe == "UNKNOWN_OPTION":
        recipe = {**base, "options": {**base["options"], "ratio": 3}}
    elif recipe == "PATH_MODEL":
        recipe = {**base, "model": "../../etc/passwd"}
    path = tmp_path / "tampered.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "pt", "seify": json.dumps(recipe)})
    for command in (["evaluate", path, tmp_path], ["profile", path, "--no-latency"]):
        code, _, err = cli(*command)
        assert code == 2 and message in err and err.count("\n") == 1 and "seify bug" not in err, (command, err)


def test_a_recipe_naming_the_hub_never_reaches_the_network(tmp_path, monkeypatch):
    import socket

    from safetensors.torch import save_file
    recipe = seify.convert("resnet18", input_size=(3, 32, 32)).recipe()
    recipe["model"] = "hf-hub:someone/some-model"
    path = tmp_path / "hub.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "pt", "seify": json.dumps(recipe)})

    def no_network(*args, **kwargs):
        raise AssertionError("seify went to the network")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SeifyError, match="not in the local Hugging Face cache"):
        seify.load(path)


@pytest.mark.parametrize("args,message", [
    (["evaluate", "resnet18", "DATA", "--batch-size", "0"], "--batch-size must be a whole number from 1 to 65536"),
    (["evaluate", "resnet18", "DATA", "--img-size", "-5"], "--img-size must be a whole number from 8 to 4096"),
    (["evaluate", "resnet18", "DATA", "--workers", "-1"], "--workers must be a whole number from 0 to 256"),
    (["finetune", "resnet18", "DATA", "--img-size", "0"], "--img-size must be a whole number from 8"),
    (["finetune", "resnet18", "DATA", "--label-smoothing", "2"], "--label-smoothing must be a finite number"),
    (["finetune", "resnet18", "DATA", "--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (["finetune", "resnet18", "DATA", "--weight-decay", "-1"], "--weight-decay must be a finite number"),
    (["finetune", "resnet18", "DATA", "--lr", "inf"], "--lr must be a finite number"),
    (["finetune", "resnet18", "DATA", "--lr", "1e9"], "--lr must be a finite number > 0 and <= 10"),
    (["finetune", "resnet18", "DATA", "--backbone-lr-scale", "-1"], "--backbone-lr-scale must be"),
    (["finetune", "resnet18", "DATA", "--device", "tpu"], "--device tpu is not a device; use cpu, cuda"),
    (["finetune", "resnet18", "DATA", "--device", "cpu:9"], "--device cpu:9: there is one cpu device"),
    (["finetune", "resnet18", "DATA", "--val-split", "1.5"], "--val-split must be a finite number > 0 and < 1"),
    (["finetune", "resnet18", "DATA", "--val-split", "-1"], "--val-split must be a finite number > 0 and < 1"),
    (["finetune", "resnet18", "DATA", "--val-split", "nan"], "--val-split must be a finite number > 0 and < 1"),
    (["finetune", "resnet18", "DATA", "--val-split", "0"], "--val-split must be a finite number > 0 and < 1"),
    (["evaluate", "resnet18", "DATA", "--val-split", "1"], "--val-split must be a finite number > 0 and < 1"),
    (["evaluate", "resnet18", "DATA", "--batch-size", "100000"], "--batch-size must be a whole number from 1 to"),
    (["profile", "resnet18", "--json", "--csv"], "pass --json or --csv, not both"),
    (["finetune", "resnet18", "DATA", "--batch-size", "64"], "--batch-size 64 is larger than the 32 training"),
    (["convert", "resnet18", "--reduction", "0.0005"], "--reduction must be a number from 1 to 4096"),
    (["convert", "resnet18", "--input-size", "3,30000,30000"], "--input-size 3,30000,30000 is too large"),
    (["convert", "resnet18", "--weights", "EMPTY"], "is not a readable PyTorch checkpoint: EOFError"),
    (["convert", "resnet18", "--weights", "RAW", "--dry-run"], "not a checkpoint that loads without running"),
])
def test_every_bad_input_is_one_line_exit_2(cli, tmp_path, tiny, args, message):
    (tmp_path / "empty.pth").write_bytes(b"")
    import pickle
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}))
    args = [{"DATA": tiny, "EMPTY": tmp_path / "empty.pth", "RAW": tmp_path / "raw.pkl"}.get(a, a) for a in args]
    code, _, err = cli(*args, "--out", tmp_path / "o") if args[0] == "finetune" else cli(*args)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(cli, tmp_path, tiny):
    code, _, err = cli("finetune", "resnet18", tiny, "--device", "cuda", "--out", tmp_path / "o")
    assert code == 2 and "no CUDA device" in err


def test_a_pickled_state_is_refused(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    state = RunFolder(out).committed() / "state.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"progress": Payload()}, state)
    with pytest.raises(SeifyError, match="not a checkpoint seify can read safely"):
        finetune(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True))
    assert not (tmp_path / "pwned").exists()


def test_evaluate_refuses_a_head_of_another_size(cli, tmp_path, tiny):
    import timm
    path = save_weights(timm.create_model(ARCH, num_classes=7), tmp_path / "r7.safetensors")
    code, _, err = cli("evaluate", ARCH, tiny, "--weights", path, "--workers", "0")
    assert code == 2 and "has 7 outputs but" in err and "4 classes" in err


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (read from /proc, as ps does)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_sigkill_with_loading_processes_alive_then_resume_at_once(cli, tmp_path, tiny, se_file, monkeypatch):
    """The OOM killer's way: SIGKILL to the trainer alone, its loading processes left to notice. The same command
    plus --resume, at once, continues the run."""
    import signal
    import time

    import seify.cli
    out = tmp_path / "run"
    args = ["finetune", se_file, str(tiny), "--out", str(out), "--epochs", "40", "--batch-size", "8", "--img-size",
            "32", "--workers", "2", "--device", "cpu", "--threads", "1", "--save-every", "1", "--log-every", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "seify", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((out / "checkpoint.json").exists() and len(_children(proc.pid)) >= 2) and time.time() < deadline:
        time.sleep(0.05)
    loaders = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(loaders) >= 2 and all(Path(f"/proc/{pid}").exists() for pid in loaders)  # still winding down

    class OneStep(KillAt):
        at = 1
    monkeypatch.setattr(seify.cli.output, "run_log", lambda: OneStep)
    code, stdout, err = cli(*args, "--resume")
    assert code == 143, err  # it resumed and took a step, then stopped as told
    assert f"resuming {out}" in stdout and "in use" not in err


def test_a_refused_start_leaves_no_folder_behind(cli, tmp_path, tiny, se_file):
    out = tmp_path / "new" / "run"
    code, _, err = cli("finetune", se_file, tiny, "--out", out, "--batch-size", "64", "--img-size", "32",
                       "--workers", "0")
    assert code == 2 and "larger than the 32 training images" in err
    assert not (tmp_path / "new").exists()


def test_a_hub_model_offline_is_one_line_without_retries(cli, tmp_path, monkeypatch):
    import socket
    attempts = []

    def offline(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = cli("convert", "hf-hub:timm/resnet18.a1_in1k", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "seify bug" not in err, err
    assert "could not fetch the configuration of hf-hub:timm/resnet18.a1_in1k" in err and "offline" in err
    assert len(attempts) == 1  # seify's own reachability probe; the hub was told to stay offline, not to retry


@pytest.mark.parametrize("writer,error", [
    ("safetensors", "Error while serializing: I/O error: No space left on device (os error 28)"),
    ("torch", "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # no reason given
])
def test_a_full_disk_however_reported_is_exit_2_and_leaves_nothing(tmp_path, tiny, se_file, monkeypatch, writer,
                                                                     error):
    """What safetensors and torch.save raise when the disk fills (as read off a 2 MB tmpfs): one line naming the
    disk, the last checkpoint kept, no half-written folder left for the next start to find."""
    import shutil
    from collections import namedtuple

    import safetensors.torch
    from safetensors import SafetensorError
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    before = (out / "checkpoint.json").read_text()

    def full(*args, **kwargs):
        raise SafetensorError(error) if writer == "safetensors" else RuntimeError(error)
    monkeypatch.setattr(safetensors.torch if writer == "safetensors" else torch, "save_model" if writer ==
                        "safetensors" else "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(SeifyError, match=r"cannot write .*checkpoints: no space left on device \(0.0 MB free "
                                         r"there\); the previous checkpoint in .* is kept"):
        finetune(se_file, str(tiny), config(out, epochs=2, resume=True, extend=True))
    assert (out / "checkpoint.json").read_text() == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_convert_onto_a_full_disk(cli, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    code, _, err = cli("convert", "resnet18", "-o", tmp_path / "r18.safetensors", "--input-size", "3,32,32")
    assert code == 2 and err.count("\n") == 1 and "seify bug" not in err
    assert f"cannot write {tmp_path / 'r18.safetensors'}: no space left on device" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_convert_onto_a_really_full_disk(cli, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("this machine does not let us mount a tmpfs")
    try:
        code, _, err = cli("convert", "resnet18", "-o", small / "r18.safetensors", "--input-size", "3,32,32")
        assert code == 2 and err.count("\n") == 1 and "no space left on device" in err, err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])


@pytest.mark.parametrize("link,target", [("train/stripes_leak", ".."), ("train/loop", "."),
                                         ("train/elsewhere", "OUTSIDE"), ("train/gradient/outside.jpg", "FILE"),
                                         ("train/val_twin", "../val/gradient")])
def test_data_links_that_leave_their_split_or_loop_are_refused(cli, tmp_path, tiny, link, target):
    """train/x -> .. would make a class of every train and val image; a link out of DATA reads other files."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny, root)
    outside = tmp_path / "outside"
    shutil.copytree(tiny / "val" / "gradient", outside)
    target = {"OUTSIDE": str(outside), "FILE": str(outside / "0000.jpg")}.get(target, target)
    (root / link).symlink_to(target)
    code, _, err = cli("finetune", "resnet18", root, "--out", tmp_path / "run", "--workers", "0")
    assert code == 2 and err.count("\n") == 1 and "link" in err, err
    assert str(root / link) in err and not (tmp_path / "run").exists()


def test_a_link_inside_its_split_is_followed(tmp_path, tiny):
    import shutil

    from seify.images import folders as fdata
    root = tmp_path / "data"
    shutil.copytree(tiny, root)
    (root / "train" / "gradient").rename(root / "train" / ".pool")
    (root / "train" / "gradient").symlink_to(".pool")  # hidden pool, linked in: a common layout
    classes, train, val = fdata.discover(root)
    assert len(train.items) == 32 and "gradient" in classes


def test_messages_point_at_what_the_user_passed(cli, tmp_path, tiny):
    from safetensors.torch import save_file
    recipe = seify.convert("resnet18", input_size=(3, 32, 32)).recipe()
    path = tmp_path / "bad-options.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "pt", "seify": json.dumps(
        {**recipe, "options": {**recipe["options"], "reduction": 0}})})
    code, _, err = cli("evaluate", path, tiny)
    assert code == 2 and "damaged seify recipe (its SE options: reduction must be" in err and "--reduction" not in err
    code, _, err = cli("convert", "resnet18", "--num-classes", "0", "--dry-run")
    assert code == 2 and "--num-classes must be a whole number from 1" in err and "unknown model" not in err
    code, _, err = cli("convert", "resnet18", "--weights", tmp_path, "--dry-run")
    assert code == 2 and f"weights file {tmp_path} is a folder" in err


def test_a_run_in_full_precision_is_not_told_to_use_it(tmp_path, tiny, se_file, monkeypatch):
    import seify.finetune.loop as loop
    real = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SeifyError, match="loss became nan") as e:
        finetune(se_file, str(tiny), config(tmp_path / "run", precision="fp32"))
    assert str(e.value).endswith("lower lr") and "fp32" not in str(e.value)
