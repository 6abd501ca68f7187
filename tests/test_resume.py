"""The command that started a run, plus --resume, continues it: for every option of seify finetune and compare.

The cases come from the commands' declared options: a non-default value for each one to start with, and another
value to resume with. An option added to either command fails ``test_every_option_has_a_case`` until it has one.
"""
import json

import pytest
import torch
import typer.main

import seify.cli
from conftest import ARCH, KillAt, config, rows_of, weights
from seify.finetune.config import CHANGEABLE_ON_RESUME
from seify.finetune.loop import finetune

# option name (as Typer names its parameter) -> (the arguments a run starts with, the arguments of another value)
CASES = {
    "weights": (["--weights", "PLAIN4"], ["--weights", "OTHER"]),
    "pretrained": (["--no-pretrained"], ["--pretrained"]),  # a download can only be refused here: no network
    "with_se": (["--se"], ["--no-se"]),
    "out": (["--out", "OUT"], None),
    "epochs": (["--epochs", "2"], ["--epochs", "3"]),
    "batch_size": (["--batch-size", "4"], ["--batch-size", "6"]),
    "lr": (["--lr", "0.002"], ["--lr", "0.003"]),
    "backbone_lr_scale": (["--backbone-lr-scale", "0.2"], ["--backbone-lr-scale", "0.3"]),
    "weight_decay": (["--weight-decay", "0.01"], ["--weight-decay", "0.02"]),
    "optimizer": (["--optimizer", "sgd"], ["--optimizer", "adamw"]),
    "momentum": (["--momentum", "0.8"], ["--momentum", "0.7"]),
    "warmup_epochs": (["--warmup-epochs", "0.5"], ["--warmup-epochs", "0.25"]),
    "se_warmup_epochs": (["--se-warmup-epochs", "0"], ["--se-warmup-epochs", "1"]),
    "label_smoothing": (["--label-smoothing", "0.05"], ["--label-smoothing", "0.2"]),
    "clip_grad": (["--clip-grad", "2"], ["--clip-grad", "3"]),
    "ema_decay": (["--ema-decay", "0.9"], ["--ema-decay", "0.8"]),
    "img_size": (["--img-size", "32"], ["--img-size", "40"]),
    "aug": (["--aug", "light"], ["--aug", "none"]),
    "crop_scale": (["--crop-scale", "0.7,1"], ["--crop-scale", "0.6,1"]),
    "hflip": (["--hflip", "0.25"], ["--hflip", "0.5"]),
    "new_head": (["--new-head"], None),  # a flag: its other value is its absence
    "adapter": (["--adapter"], None),  # the run below is an adapter run, resumed with its base
    "own_gates": ([], ["--own-gates"]),  # the test's model has no gates of its own: only the refusal is tried
    "se_lr_scale": (["--se-lr-scale", "2"], ["--se-lr-scale", "3"]),
    "val_split": (["--val-split", "0.25"], ["--val-split", "0.5"]),
    "strict_data": (["--strict-data"], None),
    "seed": (["--seed", "3"], ["--seed", "4"]),
    "workers": (["--workers", "1"], ["--workers", "0"]),
    "decode": (["--decode", "cpu"], ["--decode", "auto"]),
    "threads": (["--threads", "1"], ["--threads", "2"]),
    "device": (["--device", "cpu"], ["--device", "cpu:0"]),
    "precision": (["--precision", "fp32"], ["--precision", "bf16"]),
    "channels_last": (["--no-channels-last"], ["--channels-last"]),
    "compile": ([], None),  # torch.compile on a CPU takes minutes; changeable, so nothing to refuse
    "save_every": (["--save-every", "2"], ["--save-every", "3"]),
    "log_every": (["--log-every", "1"], ["--log-every", "2"]),
    "at": (["--at", "residual"], ["--at", "auto"]),
    "variant": (["--variant", "pre"], ["--variant", "post"]),
    "reduction": (["--reduction", "8"], ["--reduction", "4"]),
    "divisor": (["--divisor", "4"], ["--divisor", "2"]),
    "min_channels": (["--min-channels", "4"], ["--min-channels", "2"]),
    "squeeze": (["--squeeze", "max"], ["--squeeze", "avg"]),
    "gate": (["--gate", "hard-sigmoid"], ["--gate", "sigmoid"]),
    "stages": (["--stages", "3,4,5"], ["--stages", "4,5"]),
    "include": (["--include", "layer"], ["--include", "layer4"]),
    "exclude": (["--exclude", "layer1"], ["--exclude", "layer2"]),
    "init": (["--init", "paper"], ["--init", "identity"]),
    # scale blocks have none of the SE options the run starts with: their refusal on resume is in test_adapters
    "block": (["--block", "se"], None),
    # compare's own
    "arms": (["--arms", "plain,se:reduction=8"], ["--arms", "plain,se"]),
    "seeds": (["--seeds", "1"], None),
}
CONTROL = {"resume", "extend", "force", "json_out"}  # what to do with the folder, not what the run is
FLAGS_WITHOUT_VALUE = {"new_head", "strict_data"}


def _options(command: str) -> list[str]:
    click = typer.main.get_command(seify.cli.app).commands[command]
    return [p.name for p in click.params if p.param_type_name == "option"]


def test_every_option_has_a_case():
    for command in ("finetune", "compare"):
        missing = set(_options(command)) - set(CASES) - CONTROL
        assert not missing, f"seify {command}: give {sorted(missing)} a case in CASES"


def _start(tiny, plain4, out):
    """seify finetune with every option at a value other than its default, on one DATA/<class> tree."""
    args = ["finetune", ARCH, str(tiny / "train")]
    for name in _options("finetune"):
        if name not in CONTROL:
            args += CASES[name][0]
    return [{"PLAIN4": plain4, "OUT": str(out)}.get(a, a) for a in args]


@pytest.mark.slow
def test_the_same_command_plus_resume_continues_and_other_values_are_refused(cli, tmp_path, tiny, plain4,
                                                                             monkeypatch):
    out = tmp_path / "run"
    start = _start(tiny, plain4, out)

    class TwoSteps(KillAt):
        at = 2
    monkeypatch.setattr(seify.cli.output, "run_log", lambda: TwoSteps)
    code, _, err = cli(*start)
    assert code == 143, err  # stopped after step 2, mid-run, as a scheduler would
    monkeypatch.undo()
    code, stdout, err = cli(*start, "--resume")
    assert code == 0, err
    assert f"resuming {out}" in stdout and [r["epoch"] for r in rows_of(out)] == [1, 2]
    info = json.loads((out / "run.json").read_text())
    assert info["source"]["se"]["reduction"] == 8 and info["config"]["optimizer"] == "sgd"

    for name in _options("finetune"):
        if name in CONTROL or CASES[name][1] is None or name in ("out", "epochs"):
            continue
        value = [{"OTHER": str(tmp_path / "plain4-copy.safetensors")}.get(a, a) for a in CASES[name][1]]
        if name == "weights":
            (tmp_path / "plain4-copy.safetensors").write_bytes(open(plain4, "rb").read())
        code, stdout, err = cli(*_without(start, name), *value, "--resume")
        if name in CHANGEABLE_ON_RESUME:
            assert code == 0 and "is complete" in stdout, (name, err)
        else:
            flag = CASES[name][1][0]
            assert code == 2 and err.count("\n") == 1, (name, err)
            assert f"--resume: {flag}" in err or f"--resume: {CASES[name][0][0]}" in err, (name, err)
            assert "differs from the run's" in err or "here and" in err, (name, err)
    for name in FLAGS_WITHOUT_VALUE:  # dropping a flag is the same as its default: the run's value is kept
        code, stdout, err = cli(*_without(start, name), "--resume")
        assert code == 0 and "is complete" in stdout, (name, err)


def _without(args: list[str], name: str) -> list[str]:
    """The command without the arguments of one option."""
    start = CASES[name][0]
    for i in range(len(args) - len(start) + 1):
        if args[i:i + len(start)] == start:
            return args[:i] + args[i + len(start):]
    return args


@pytest.mark.slow
def test_compare_started_with_every_option_continues_when_rerun(cli, tmp_path, tiny, plain4):
    out = tmp_path / "cmp"
    args = ["compare", ARCH, str(tiny / "train")]
    for name in _options("compare"):
        if name not in CONTROL:
            args += CASES[name][0]
    args = [{"PLAIN4": plain4, "OUT": str(out)}.get(a, a) for a in args]
    code, _, err = cli(*args)
    assert code == 0, err
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert stdout.count("is complete") == 2  # both arms' runs found finished, not trained again
    code, _, err = cli(*[a if a != "0.002" else "0.003" for a in args])
    assert code == 2 and "--lr 0.003 differs from the run's 0.002" in err


def test_a_spelling_of_the_same_file_is_the_same_model(tmp_path, tiny, se_file, monkeypatch):
    import os
    out = tmp_path / "run"
    finetune(se_file, str(tiny), config(out, epochs=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = os.path.relpath(se_file, elsewhere)
    assert relative != se_file
    done = finetune(relative, str(tiny), config(out, epochs=1, resume=True))
    assert done.epochs_run == 1


def test_se_options_given_with_a_model_that_has_se_must_be_its_own(cli, tmp_path, tiny, se_file):
    code, _, err = cli("finetune", se_file, tiny, "--reduction", "4", "--out", tmp_path / "a", "--workers", "0")
    assert code == 2 and err.count("\n") == 1
    assert "already has SE blocks, made with --reduction 16; --reduction 4 cannot change them" in err
    assert not (tmp_path / "a").exists()
    code, _, err = cli("finetune", se_file, tiny, "--reduction", "16", "--at", "residual", "--out", tmp_path / "b",
                       "--epochs", "1", "--batch-size", "8", "--workers", "0", "--threads", "1", "--log-every", "0")
    assert code == 0, err  # the file's own values (auto placed them on residual branches) are accepted


def test_resume_keeps_the_thread_count_the_run_chose(tmp_path, tiny, se_file, monkeypatch):
    """Under another load the default would be another count: the resumed run keeps the one it started with, and
    ends bit-identical to a run that was never stopped."""
    from seify.finetune import dist
    monkeypatch.setattr(dist, "usable_cores", lambda: 2)
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 0.0)  # idle: 2 threads
    straight = finetune(se_file, str(tiny), config(tmp_path / "straight", epochs=2, threads=None))
    out = tmp_path / "cut"
    assert finetune(se_file, str(tiny), config(out, epochs=2, threads=None), log=KillAt).stopped_by == "SIGTERM"
    assert json.loads((out / "run.json").read_text())["threads"] == 2
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 1.6)  # busy now: a new run would take 1
    assert dist.choose_threads(None, torch.device("cpu"), 1)[0] == 1
    lines = []

    class Log(KillAt):
        at = 10**9

        def line(self, text):
            lines.append(text)
    finetune(se_file, str(tiny), config(out, epochs=2, threads=None, resume=True), log=Log)
    w1, w2 = weights(straight.out / "last.safetensors"), weights(out / "last.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any("2 CPU threads (as the run chose)" in line for line in lines)
