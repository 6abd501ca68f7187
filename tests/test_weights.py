"""Loading users' checkpoints: the formats timm and DDP write, classifier sizes, refusals."""
import os

import pytest
import timm
import torch

import seify
from conftest import outputs, save_weights
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
