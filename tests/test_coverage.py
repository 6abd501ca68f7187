"""Every model the convert issue names: sites found, function kept, params added as counted, reload exact."""
import pytest
import torch

import seify
from conftest import CASES, build, outputs, realistic, save_weights
from seify.api import save

PLACEMENT = {"densenet121": "activation", "torchvision:densenet121": "activation",
             "torchvision:shufflenet_v2_x0_5": "module"}


@pytest.mark.parametrize("spec", CASES)
def test_convert_preserves_and_reloads(spec, tmp_path):
    original = realistic(build(spec))
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
