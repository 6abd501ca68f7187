"""The surgery's design space and its edges: variants, gates, per-call sites, refusals."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import seify
from conftest import outputs, realistic
from seify.errors import SeifyError
from seify.se import SqueezeExcite
from seify.surgery import SEOptions
from seify.surgery import add_se as convert

SIZE = (3, 64, 64)


def preserved(original, converted):
    expected = outputs(original)
    return (outputs(converted) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.fixture(scope="module")
def resnet18():
    return realistic(timm.create_model("resnet18"))


@pytest.mark.parametrize("variant", ["standard", "pre", "post", "identity"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard-sigmoid"])
@pytest.mark.parametrize("squeeze", ["avg", "max"])
def test_every_variant_gate_and_squeeze_preserves_function(resnet18, variant, gate, squeeze):
    result = convert(resnet18, SEOptions(variant=variant, gate=gate, squeeze=squeeze), SIZE)
    assert len(result.sites) == 8
    assert preserved(resnet18, result.model)
    block = result.model.get_submodule(result.sites[0].path)
    assert isinstance(block.gate, nn.Hardsigmoid if gate == "hard-sigmoid" else nn.Sigmoid)
    assert block.squeeze == squeeze


def test_variant_positions(resnet18):
    std = convert(resnet18, SEOptions(), SIZE).sites[2]
    pre = convert(resnet18, SEOptions(variant="pre"), SIZE).sites[2]
    post = convert(resnet18, SEOptions(variant="post"), SIZE).sites[2]
    ident = convert(resnet18, SEOptions(variant="identity"), SIZE).sites[2]
    assert (std.after, std.channels) == ("layer2.0.bn2", 128)
    assert (pre.after, pre.channels) == ("layer1.1.act2", 64)     # the block's input, before conv1
    assert (post.after, post.channels) == ("layer2.0.act2", 128)  # after the sum and its ReLU
    assert (ident.after, ident.channels) == ("layer2.0.downsample.1", 128)


def test_paper_init_is_random_and_changes_outputs(resnet18):
    result = convert(resnet18, SEOptions(init="paper"), SIZE)
    assert result.model.get_submodule("layer1.0.se").fc2.weight.abs().sum() > 0
    assert not preserved(resnet18, result.model)
    assert all(s.compensation == "" for s in result.sites)


def test_sites_are_keyed_by_call_not_module():
    """torchvision's Bottleneck calls one self.relu three times; each call is its own site."""
    model = realistic(torchvision.models.resnet50())
    act = convert(model, SEOptions(at="activation"), SIZE)
    in_block = [s for s in act.sites if s.owner == "layer1.0"]
    assert [(s.path, s.after, s.channels) for s in in_block] == [
        ("layer1.0.se_relu", "layer1.0.relu", 64), ("layer1.0.se_relu_2", "layer1.0.relu", 64)]
    post = convert(model, SEOptions(variant="post"), SIZE)
    assert (post.sites[0].after, post.sites[0].channels) == ("layer1.0.relu", 256)
    assert preserved(model, act.model) and preserved(model, post.model)


def test_projection_shortcut_is_never_a_site(resnet18):
    result = convert(resnet18, SEOptions(), SIZE)
    assert not any("downsample" in s.after for s in result.sites)


def test_include_exclude(resnet18):
    only = convert(resnet18, SEOptions(include=r"^layer4\."), SIZE)
    assert [s.path for s in only.sites] == ["layer4.0.se", "layer4.1.se"]
    rest = convert(resnet18, SEOptions(exclude=r"^layer4\."), SIZE)
    assert len(rest.sites) == 6
    with pytest.raises(SeifyError, match="matches stages/include/exclude"):
        convert(resnet18, SEOptions(include="nothing-here"), SIZE)
    with pytest.raises(SeifyError, match="not a valid regular expression"):
        SEOptions(include="(")


def test_layer_scale_absorbs_the_gate():
    model = realistic(timm.create_model("convnext_atto"))
    result = convert(model, SEOptions(), SIZE)
    assert result.sites[0].compensation == "x2 folded into stages.0.blocks.0.gamma"
    assert torch.equal(result.model.stages[0].blocks[0].gamma, 2 * model.stages[0].blocks[0].gamma)


def test_existing_se_blocks_are_skipped_and_reported():
    model = realistic(timm.create_model("efficientnet_b0"))
    with pytest.raises(SeifyError, match="already have an SE-style gate"):
        convert(model, SEOptions(), SIZE)
    act = convert(model, SEOptions(at="activation"), SIZE)
    assert len(act.skipped) > 20 and all("already gated" in s.skipped for s in act.skipped)
    assert {s.after for s in act.sites} == {"bn1", "bn2"}  # stem and head, outside any gated block
    assert preserved(model, act.model)


def test_model_without_convolutions():
    with pytest.raises(SeifyError, match="nothing to convert.*no convolutional residual branches"):
        convert(timm.create_model("vit_tiny_patch16_224", img_size=64).eval(), SEOptions(), SIZE)


class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(nn.ReLU(), _Branchy())

    def forward(self, x):
        return self.blocks(self.conv(x))


def test_untraceable_model_names_the_module():
    with pytest.raises(SeifyError, match=r"cannot trace _Untraceable: in module 'blocks.1' \(_Branchy\)"):
        convert(_Untraceable(), SEOptions(), SIZE)


def test_model_keeps_its_class_and_methods(resnet18):
    result = convert(resnet18, SEOptions(), SIZE)
    model = result.model
    assert type(model) is type(resnet18)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
    assert isinstance(model.layer1[0].se, SqueezeExcite)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)


def test_training_keeps_drop_path_and_se_learns():
    model = realistic(timm.create_model("resnet18", drop_path_rate=0.5))
    result = convert(model, SEOptions(), SIZE)
    se_model = result.model.train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    a = se_model(x)
    torch.manual_seed(1)
    b = se_model(x)
    assert not torch.equal(a, b)  # drop-path still drops in training
    a.sum().backward()
    se = se_model.layer1[0].se
    assert se.fc2.weight.grad.abs().sum() > 0  # the zeroed layer learns from the first step


def test_bad_options_speak_the_api_and_render_as_flags():
    with pytest.raises(SeifyError, match="^variant pre .* needs at residual") as e:
        SEOptions(variant="pre", at="activation")
    assert e.value.render(lambda name: f"--{name}").startswith("--variant pre")
    assert e.value.render(lambda name: f"--{name}").endswith("needs --at residual")
    with pytest.raises(SeifyError, match="^gate must be one of"):
        SEOptions(gate="softmax")
    for bad in (dict(reduction=0.0005), dict(reduction="8"), dict(divisor=0), dict(stages=(2, "x")),
                dict(min_channels=2.5)):
        with pytest.raises(SeifyError, match=f"^{next(iter(bad))} must be"):
            SEOptions(**bad)
    assert SEOptions.parse("reduction=8:stages=4,5") == SEOptions(reduction=8.0, stages=(4, 5))
    with pytest.raises(SeifyError, match="'ratio=8' is not an SE option"):
        SEOptions.parse("ratio=8")


def test_api_dry_run_builds_and_checks_but_saves_nothing():
    result = seify.convert("torchvision:mobilenet_v2", input_size=SIZE, dry_run=True)
    assert result.dry_run and len(result.sites) == 10 and result.max_abs_diff == 0.0
    with pytest.raises(SeifyError, match="dry run has nothing to save"):
        seify.save(result, "x.safetensors")


def test_models_with_native_se_are_skipped():
    with pytest.raises(SeifyError, match="all 13 residual sites already have an SE-style gate"):
        convert(realistic(timm.create_model("regnety_002")), SEOptions(), SIZE)
    model = realistic(timm.create_model("mobilenetv3_small_050"))  # one residual block there has no SE
    result = convert(model, SEOptions(), SIZE)
    assert [s.path for s in result.sites] == ["blocks.1.1.se2"]  # 'se' is taken by timm's Identity placeholder
    assert len(result.skipped) == 6 and result.skipped[0].skipped == "already gated by 'blocks.2.1.se'"
    assert preserved(model, result.model)


def test_channels_last_gives_the_same_outputs(resnet18):
    result = convert(resnet18, SEOptions(), SIZE)
    model = result.model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(model(x), resnet18(x.contiguous()), rtol=1e-5, atol=1e-5)


def test_saving_a_conversion_under_another_models_name_is_refused(tmp_path):
    import torchvision
    model = torchvision.models.resnet18(weights=None).eval()
    conversion = convert(model, SEOptions(), SIZE)
    with pytest.raises(SeifyError, match="this conversion is not one of resnet50 .* converted from"):
        seify.save(conversion, tmp_path / "x.safetensors", model="resnet50")
    assert not (tmp_path / "x.safetensors").exists()
    path = seify.save(conversion, tmp_path / "ok.safetensors", model="torchvision:resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(seify.load(path)(x), conversion.model(x))


@pytest.mark.parametrize("spec", ["resnet18", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_converted_models_script_where_the_original_does(spec):
    import warnings

    from conftest import build
    model = realistic(timm.create_model(spec, drop_path_rate=0.1) if ":" not in spec else build(spec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, and still used
        torch.jit.script(model)
        converted = convert(model, SEOptions(), SIZE).model
        scripted = torch.jit.script(converted)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(scripted(x), converted(x)) and torch.equal(converted(x), model(x))
        scripted.train()
        torch.manual_seed(0)
        trained = scripted(x)
        converted.train()
        torch.manual_seed(0)
        assert torch.allclose(trained, converted(x), atol=1e-5)  # drop-path's factor drawn alike


@pytest.mark.parametrize("gate", ["tanh", "relu", "hard-sigmoid"])
def test_every_gate_starts_as_the_identity(resnet18, gate):
    """The paper's Table 12 gates: with fc2's bias where the gate is 0.5, a fresh conversion computes the original."""
    result = convert(resnet18, SEOptions(gate=gate), SIZE)
    block = result.model.layer1[0].se
    assert type(block.gate).__name__ == {"tanh": "Tanh", "relu": "ReLU", "hard-sigmoid": "Hardsigmoid"}[gate]
    assert torch.equal(block.constant_gate(), torch.full((64,), 0.5))
    assert preserved(resnet18, result.model)
