"""Every model the convert issue names: sites found, function kept, params added as counted, reload exact."""
import pytest
import timm
import torch
import torchvision

import seify
from seify.api import save

from conftest import outputs, realistic, save_weights

TIMM = ["resnet18", "resnet50", "resnext26ts", "resnetv2_50", "regnetx_002", "densenet121", "vgg11_bn",
        "mobilenetv2_100", "convnext_atto"]
TORCHVISION = ["resnet18", "resnet50", "vgg11", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5",
               "regnet_x_400mf"]
CASES = [(f"{name}", lambda n=name: timm.create_model(n)) for name in TIMM] + \
        [(f"torchvision:{name}", lambda n=name: torchvision.models.get_model(n)) for name in TORCHVISION]
PLACEMENT = {"densenet121": "activation", "vgg11_bn": "activation", "torchvision:vgg11": "activation",
             "torchvision:densenet121": "activation", "torchvision:shufflenet_v2_x0_5": "module"}


@pytest.mark.parametrize("spec,build", CASES, ids=[c[0] for c in CASES])
def test_convert_preserves_and_reloads(spec, build, tmp_path):
    original = realistic(build())
    weights = save_weights(original, tmp_path / "weights.safetensors")
    result = seify.convert(spec, weights=weights, input_size=(3, 64, 64))

    assert result.placement == PLACEMENT.get(spec, "residual")
    assert len(result.sites) > 0
    n_original = sum(p.numel() for p in original.parameters())
    n_converted = sum(p.numel() for p in result.model.parameters())
    assert n_converted - n_original == result.added_params == sum(s.params for s in result.sites)
    assert result.base_params == n_original

    expected = outputs(original)
    got = outputs(result.model)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    out = save(result, tmp_path / "se.safetensors")
    reloaded = seify.load(out)
    assert not reloaded.training
    assert torch.equal(outputs(reloaded), got)
    assert sum(p.numel() for p in reloaded.parameters()) == n_converted
