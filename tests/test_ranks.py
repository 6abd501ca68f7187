"""Two ranks under torchrun (gloo, on the CPU) start as one: rank 0 takes the lock, clears, decides, and every rank
gets its decision or its error before reading the folder. Each case ends in bounded time with the single-process
outcome, and the ranks' weights agree after training."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_finetune import _free_port

from conftest import config, weights
from seify.finetune.loop import finetune
from seify.finetune.state import RunFolder

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
FLAGS = ["--epochs", "2", "--batch-size", "4", "--img-size", "32", "--device", "cpu", "--log-every", "0",
         "--workers", "0"]


def _torchrun(model: str, data, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), str(HERE / "rank_weights.py"), "finetune", model, str(data), "--out", str(out),
            *FLAGS, *extra]


def _env(out: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WEIGHTS": str(out.parent / f"{out.name}-weights"),
            "PYTHONPATH": str(HERE)}


def _run(command, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_env(out), timeout=240)


def _ranks_agree(out: Path) -> None:
    a, b = (weights(out.parent / f"{out.name}-weights-{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = weights(out / "last.safetensors")
    assert all(torch.equal(saved[k], a[k]) for k in saved)


def test_force_over_a_finished_run_starts_over_on_both_ranks(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    run = _run(_torchrun(se_file, tiny, out, "--force"), out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "device cpu x2" in run.stdout and "already holds" not in run.stderr
    _ranks_agree(out)


def test_a_run_stopped_mid_epoch_resumes_on_both_ranks_alike(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(se_file, tiny, out, "--save-every", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(out))
    deadline = time.time() + 240
    while (RunFolder(out).committed() if (out / "checkpoint.json").exists() else None) is None and \
            proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks, which save and leave
    assert proc.wait(timeout=120) != 0
    step = RunFolder(out).read(RunFolder(out).committed())[0]["progress"]["step"]
    assert 0 < step < 8  # stopped mid-way: 32 images / (2 ranks x 4) = 4 steps per epoch, 2 epochs
    run = _run(_torchrun(se_file, tiny, out, "--save-every", "1", "--resume"), out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resuming" in run.stdout
    _ranks_agree(out)


def test_a_run_whose_lock_another_process_holds_is_refused_on_both_ranks(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    with RunFolder(out).locked():
        started = time.time()
        run = _run(_torchrun(se_file, tiny, out), out)
    assert run.returncode != 0 and time.time() - started < 200
    refusals = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 2 and len(set(refusals)) == 1 and "is in use by a running fine-tune" in refusals[0]


def test_a_folder_holding_the_input_model_is_refused_on_both_ranks(tmp_path, tiny, se_file):
    out = tmp_path / "run"
    out.mkdir()
    inside = out / "model.safetensors"
    inside.write_bytes(Path(se_file).read_bytes())
    run = _run(_torchrun(str(inside), tiny, out, "--force"), out)
    refusals = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode != 0 and len(refusals) == 2 and len(set(refusals)) == 1, run.stderr[-2000:]
    assert "is inside" in refusals[0] and inside.exists()
