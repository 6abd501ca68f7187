"""The Python API takes the nn.Module a notebook user already holds, wherever a spec is taken."""
import pytest
import timm
import torch
import torchvision

import seify
from conftest import realistic
from seify.errors import SeifyError
from seify.fold import fold
from seify.profile import profile


def _x(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_convert_takes_a_module_and_leaves_it_as_it_was(tmp_path):
    held = realistic(timm.create_model("resnet18"))
    before = {k: v.clone() for k, v in held.state_dict().items()}
    result = seify.convert(held, input_size=(3, 32, 32))
    assert len(result.sites) == 8 and result.max_abs_diff == 0.0
    with torch.no_grad():
        assert torch.equal(result.model(_x()), held(_x()))
    assert held.state_dict().keys() == before.keys() and all(torch.equal(before[k], v)
                                                              for k, v in held.state_dict().items())
    path = seify.save(result, tmp_path / "r.safetensors")  # timm records the architecture: resnet18
    with torch.no_grad():
        assert torch.equal(seify.load(path)(_x()), result.model(_x()))


def test_a_module_without_a_recorded_architecture_must_be_named_to_save(tmp_path):
    held = realistic(torchvision.models.resnet18(weights=None))
    result = seify.convert(held, input_size=(3, 32, 32))
    with pytest.raises(SeifyError, match="ResNet you hold records no architecture: name the one"):
        seify.save(result, tmp_path / "tv.safetensors")
    assert not (tmp_path / "tv.safetensors").exists()
    path = seify.save(result, tmp_path / "tv.safetensors", model="torchvision:resnet18")
    with torch.no_grad():
        assert torch.equal(seify.load(path)(_x()), result.model(_x()))
    with pytest.raises(SeifyError, match="is not one of torchvision:resnet50"):
        seify.save(result, tmp_path / "wrong.safetensors", model="torchvision:resnet50")


def test_profile_analyze_and_fold_take_a_module(tmp_path, tiny):
    held = timm.create_model("resnet18")
    counted = profile(held, input_size=(3, 32, 32), latency=False)
    assert counted.added_params == profile("resnet18", input_size=(3, 32, 32), latency=False).added_params
    assert counted.model == "resnet18"
    converted = seify.convert(realistic(timm.create_model("test_resnet", num_classes=4)), input_size=(3, 32, 32))
    analysis = seify.analyze.analyze(converted.model, str(tiny), out=tmp_path / "a")
    assert len(analysis.sites) == len(converted.sites) and (tmp_path / "a" / "analysis.json").exists()
    folded = fold(converted.model, None, latency=False)
    assert len(folded.folded) == len(converted.sites) and folded.output is None
    with torch.no_grad():
        assert torch.equal(folded.module(_x()), converted.source.model(_x()))
    with pytest.raises(SeifyError, match="carries no seify recipe to write a file with"):
        fold(converted.model, tmp_path / "f.safetensors", latency=False)
    with pytest.raises(SeifyError, match="brings its own weights and head"):
        seify.convert(held, weights="x.safetensors")
