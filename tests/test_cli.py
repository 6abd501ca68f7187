"""The seify command: output, JSON, files on disk, and one-line errors with exit code 2."""
import json

import pytest
import timm
import torch

import seify
from conftest import outputs, realistic, save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_weights(realistic(timm.create_model("resnet18")), tmp_path_factory.mktemp("w") / "r18.pth")


def test_convert_json_and_file(cli, weights, tmp_path):
    out = tmp_path / "r18-se.safetensors"
    code, stdout, stderr = cli("convert", "resnet18", "--weights", weights, "-o", out, "--input-size", "3,64,64",
                               "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["base_params"] == 11_689_512 and report["added_params"] == 90_112
    assert report["params"] == report["base_params"] + report["added_params"]
    assert {"path", "channels", "reduced_channels", "params"} <= set(report["sites"][0])
    assert report["max_abs_diff"] == 0.0 and report["output"] == str(out)
    assert report["output_bytes"] == out.stat().st_size
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["seify"])["model"] == "resnet18"
    original = timm.create_model("resnet18")
    original.load_state_dict(torch.load(weights, weights_only=True))
    assert torch.equal(outputs(seify.load(out)), outputs(original))


def test_convert_plain_output(cli, weights, tmp_path):
    code, stdout, _ = cli("convert", "resnet18", "--weights", weights, "-o", tmp_path / "a.safetensors",
                          "--input-size", "3,64,64", "--stages", "5")
    assert code == 0
    assert "layer4.0.se\tlayer4.0.bn2\t5\t512\t32\t33312\tx2 folded into layer4.0.bn2" in stdout
    assert "parameters: 11,689,512 base + 66,624 SE = 11,756,136 (+0.57%) in 2 blocks" in stdout
    assert "function preserved: max |original - converted| = 0" in stdout
    assert "wrote " in stdout


def test_dry_run_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = cli("convert", "resnet50", "--reduction", "8", "--stages", "2,3,4", "--dry-run",
                          "--input-size", "3,64,64")
    assert code == 0 and "dry run: nothing written" in stdout
    assert list(tmp_path.iterdir()) == []


def test_existing_output_kept_unless_force(cli, weights, tmp_path):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    code, _, stderr = cli("convert", "resnet18", "--weights", weights, "-o", out)
    assert code == 2 and "already exists; pass --force" in stderr and out.read_bytes() == b"precious"
    code, _, _ = cli("convert", "resnet18", "--weights", weights, "-o", out, "--force", "--input-size", "3,64,64")
    assert code == 0 and isinstance(seify.load(out).layer1[0].se, seify.SqueezeExcite)


def test_input_is_never_written_over(cli, tmp_path):
    src = save_weights(timm.create_model("resnet18"), tmp_path / "w.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()
    code, _, stderr = cli("convert", "resnet18", "--weights", src, "-o", src, "--force")
    assert code == 2 and "refusing to write over the input" in stderr
    assert (tmp_path / "w.safetensors").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["convert", "resnet5O"], "unknown model 'resnet5O'; did you mean resnet50"),
    (["convert", "vit_tiny_patch16_224", "--dry-run"], "nothing to convert"),
    (["convert", "resnet18", "--stages", "two"], "--stages must be comma-separated whole numbers"),
    (["convert", "resnet18", "--input-size", "3,64"], "--input-size is C,H,W"),
    (["convert", "resnet18", "--variant", "sideways"], "--variant must be one of standard, pre, post, identity"),
    (["convert", "resnet18", "--weights", "nowhere.pth"], "weights file nowhere.pth does not exist"),
    (["convert", "torchvision:vgg11", "--input-size", "3,7,7", "--dry-run"], "cannot take an input of 3x7x7"),
])
def test_bad_input_is_one_line_exit_2(cli, args, message):
    code, stdout, stderr = cli(*args)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_debug_shows_traceback(cli):
    code, _, stderr = cli("--debug", "convert", "resnet5O")
    assert code == 2 and "Traceback" in stderr


def test_version_and_help(cli):
    code, stdout, _ = cli("--version")
    assert code == 0 and stdout.strip() == f"seify {seify.__version__}"
    code, stdout, _ = cli("convert", "--help")
    assert code == 0 and "Examples:" in stdout and "  seify convert resnet50 --weights r50.safetensors -o" in stdout


def test_help_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys; from seify.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_size_a_model_works_at_is_recorded_and_used(cli, weights, tmp_path, tiny):
    out = tmp_path / "r18.safetensors"
    code, _, err = cli("convert", "resnet18", "--weights", weights, "-o", out, "--input-size", "3,48,48")
    assert code == 0, err
    from seify.checkpoint import read_recipe
    assert read_recipe(out)["data_config"]["input_size"] == [3, 48, 48]
    code, stdout, _ = cli("profile", out, "--no-latency", "--json")
    assert code == 0 and json.loads(stdout)["input_size"] == [3, 48, 48]
    four = tmp_path / "r18-4.safetensors"
    code, _, err = cli("convert", "resnet18", "--weights", weights, "--num-classes", "4", "-o", four,
                       "--input-size", "3,48,48")
    code, stdout, err = cli("evaluate", four, tiny, "--json", "--workers", "0")
    assert code == 0, err
    assert json.loads(stdout)["img_size"] == 48


def test_debug_after_the_command_and_errors_without_colour(cli):
    code, _, stderr = cli("convert", "resnet5O", "--debug")
    assert code == 2 and "Traceback" in stderr
    from seify.cli import _one_line
    assert _one_line("\x1b[31mred\x1b[0m text\nsecond line") == "red text"


def test_finetune_help_groups_its_options(cli):
    code, stdout, _ = cli("finetune", "--help")
    assert code == 0
    for group in ("Source", "SE block", "Data and augmentation", "Schedule", "Precision and devices",
                  "Output and logging"):
        assert f"─ {group} ─" in stdout, group
    examples = stdout[stdout.index("Examples:"):stdout.index("╭")]
    assert len([line for line in examples.splitlines() if "seify finetune" in line]) >= 3  # one per line
