"""Loading users' checkpoints: the formats timm and DDP write, classifier sizes, refusals."""
import os

import pytest
import timm
import torch

import seify
from conftest import outputs, realistic, save_weights
from seify.errors import SeifyError
from seify.models import resolve as create


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", num_classes=10).eval()


@pytest.mark.parametrize("wrap", ["state_dict", "model", "state_dict_ema", None])
def test_wrapped_and_ddp_prefixed_checkpoints_load(resnet18, tmp_path, wrap):
    sd = {f"module.{k}": v for k, v in resnet18.state_dict().items()}
    torch.save({wrap: sd, "epoch": 3} if wrap else sd, tmp_path / "ckpt.pth")
    loaded = create("resnet18", weights=str(tmp_path / "ckpt.pth"))
    assert loaded.num_classes == 10  # taken from the weights, not timm's default 1000
    assert torch.equal(outputs(loaded.model), outputs(resnet18))


def test_ema_weights_are_preferred_like_timm(resnet18, tmp_path):
    other = timm.create_model("resnet18", num_classes=10).eval()
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": resnet18.state_dict()}, tmp_path / "c.pth")
    loaded = create("resnet18", weights=str(tmp_path / "c.pth"))
    assert torch.equal(outputs(loaded.model), outputs(resnet18))
    assert "state_dict_ema" in loaded.notes[0]


def test_num_classes_override_keeps_backbone(resnet18, tmp_path):
    path = save_weights(resnet18, tmp_path / "w.safetensors")
    loaded = create("resnet18", weights=path, num_classes=4)
    assert loaded.num_classes == 4
    assert torch.equal(loaded.model.conv1.weight, resnet18.conv1.weight)
    assert "re-initialised" in loaded.notes[-1]


def test_mismatched_weights_name_counts_and_keys(tmp_path):
    r34 = timm.create_model("resnet34")
    extra = set(r34.state_dict()) - set(timm.create_model("resnet18").state_dict())
    path = save_weights(r34, tmp_path / "r34.safetensors")
    with pytest.raises(SeifyError) as e:
        create("resnet18", weights=path)
    message = str(e.value)
    assert f"do not match resnet18: {len(extra)} unexpected (" in message
    assert message.split("unexpected (")[1].split(", ")[0] in extra
    assert "missing" not in message


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(SeifyError, match="pickled code"):
        create("resnet18", weights=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(SeifyError, match="not a readable safetensors"):
        create("resnet18", weights=str(tmp_path / "junk.safetensors"))
    with pytest.raises(SeifyError, match="does not exist"):
        create("resnet18", weights=str(tmp_path / "missing.pth"))


def test_unknown_models_suggest_close_names():
    with pytest.raises(SeifyError, match="did you mean resnet50"):
        create("resnet5O")
    with pytest.raises(SeifyError, match="did you mean torchvision:resnet50"):
        create("torchvision:resnet_50")


def test_pretrained_offline_says_to_pass_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SeifyError, match="offline. Pass a local checkpoint as weights instead"):
        create("resnet18", pretrained=True)


def test_seify_file_is_a_model_spec(tmp_path):
    result = seify.convert("resnet18", input_size=(3, 64, 64))
    path = seify.save(result, tmp_path / "r18-se.safetensors")
    loaded = create(str(path))
    assert loaded.recipe["model"] == "resnet18"
    assert torch.equal(outputs(loaded.model), outputs(result.model))
    with pytest.raises(SeifyError, match="already have an SE-style gate"):
        seify.convert(str(path), input_size=(3, 64, 64))
    with pytest.raises(SeifyError, match="not a seify file"):
        create(save_weights(result.source.model, tmp_path / "plain.safetensors"))


def test_torchvision_pretrained_offline(monkeypatch):
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SeifyError, match="torchvision:resnet18 .*are you offline"):
        create("torchvision:resnet18", pretrained=True)


def test_modules_that_check_their_saved_version_load_from_safetensors(tmp_path):
    """torchvision's MNASNet refuses a state_dict without version metadata, which safetensors files never have."""
    import torchvision
    model = realistic(torchvision.models.mnasnet0_5(weights=None))
    weights_file = save_weights(model, tmp_path / "mnasnet.safetensors")
    result = seify.convert("torchvision:mnasnet0_5", weights=weights_file, input_size=(3, 64, 64))
    assert result.max_abs_diff == 0.0
    path = seify.save(result, tmp_path / "mnasnet-se.safetensors")
    assert torch.equal(outputs(seify.load(path)), outputs(model))


def test_a_seify_file_with_damaged_weights_names_them(cli, tmp_path):
    from safetensors.torch import load_file, save_file
    path = seify.save(seify.convert("resnet18", input_size=(3, 64, 64)), tmp_path / "r18.safetensors")
    from safetensors import safe_open

    from seify.checkpoint import RECIPE_KEY
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors["layer1.0.se.fc1.weight"]
    save_file(tensors, str(path), metadata=metadata)
    assert RECIPE_KEY in metadata
    code, _, err = cli("evaluate", path, tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert "its weights do not match its recipe: 1 missing (layer1.0.se.fc1.weight)" in err
