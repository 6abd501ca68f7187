"""A timm hub folder as MODEL (local-dir:PATH) brings its weights, strictly, or is refused in one line."""
import json
import shutil

import pytest
import timm
import torch

import seify
from conftest import realistic
from seify.export import export
from seify.models import resolve


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """What timm's save_for_hf writes (as seify export --format timm does) for a trained model."""
    from timm.models import save_for_hf
    folder = tmp_path_factory.mktemp("f") / "timm"
    model = realistic(timm.create_model("test_resnet", num_classes=5))
    save_for_hf(model, str(folder), model_config={"label_names": list("abcde")}, safe_serialization=True)
    return folder, model


def _x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_timm_folder_runs_with_its_own_weights(timm_folder):
    folder, model = timm_folder
    loaded = resolve(f"local-dir:{folder}")
    with torch.no_grad():
        assert torch.equal(loaded.model(_x()), model.eval()(_x()))
    assert loaded.trained and loaded.num_classes == 5


def test_an_exported_timm_folder_reopens_with_its_trained_weights(tmp_path, gated_file):
    export(gated_file, tmp_path / "timm", "timm")
    with torch.no_grad():
        got = resolve(f"local-dir:{tmp_path / 'timm'}").model(_x())
        expected = seify.load(gated_file)(_x())
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def _damage(folder, tmp_path, how):
    bad = tmp_path / "bad"
    if how == "missing":
        return bad
    if how == "a file":
        bad.write_text("x")
        return bad
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    if how == "empty":
        shutil.rmtree(bad)
        bad.mkdir()
    elif how == "no weights":
        (bad / "model.safetensors").unlink()
    elif how == "not JSON":
        (bad / "config.json").write_text("{not json")
    elif how == "a list":
        (bad / "config.json").write_text("[1, 2]")
    elif how == "no architecture":
        (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architecture"}))
    elif how == "unknown architecture":
        (bad / "config.json").write_text(json.dumps({**config, "architecture": "resnet9000"}))
    elif how == "another architecture":
        (bad / "config.json").write_text(json.dumps({**config, "architecture": "resnet18"}))
    elif how == "unknown attn_layer":
        (bad / "config.json").write_text(json.dumps({**config, "model_args": {"block_args": {"attn_layer": "zz"}}}))
    elif how == "no model_args but SE weights":
        (bad / "config.json").write_text(json.dumps({**config, "model_args": {"block_args": {"attn_layer": "se"}}}))
    elif how == "huge num_classes":
        (bad / "config.json").write_text(json.dumps({**config, "num_classes": 10**11}))
    elif how == "huge input":
        (bad / "config.json").write_text(json.dumps({**config, "pretrained_cfg": {
            **config["pretrained_cfg"], "input_size": [3, 10**6, 10**6]}}))
    return bad


DAMAGED = {
    "missing": "does not exist",
    "a file": "is a file; local-dir: takes a folder",
    "empty": "has no config.json",
    "no weights": "has no model.safetensors: its config.json describes test_resnet without weights; pass test_resnet",
    "not JSON": "is not readable JSON",
    "a list": "holds a JSON list, not an object",
    "no architecture": "names no architecture",
    "unknown architecture": "names architecture 'resnet9000', which timm",
    "another architecture": "does not match the resnet18 its config.json describes: ",
    "unknown attn_layer": "attn_layer 'zz' is not an attention layer timm knows",
    "no model_args but SE weights": "missing",
    "huge num_classes": "num_classes must be a whole number from 0 to 1,000,000",
    "huge input": "input_size must be [channels, height, width] with at most",
}


@pytest.mark.parametrize("how", list(DAMAGED))
def test_every_damaged_folder_is_one_line_and_exit_2(cli, tmp_path, timm_folder, how):
    bad = _damage(timm_folder[0], tmp_path, how)
    for command in (["profile", f"local-dir:{bad}", "--no-latency"], ["convert", f"local-dir:{bad}", "-o",
                                                                        tmp_path / "o.safetensors"]):
        code, _, err = cli(*command)
        assert code == 2 and DAMAGED[how] in err and err.count("\n") == 1 and "seify bug" not in err, (how, err)
    assert not (tmp_path / "o.safetensors").exists()
