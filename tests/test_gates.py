"""Every SE network: the channel gates that timm and torchvision networks ship are found, recorded, profiled,
folded (exactly where constant, at their mean with DATA, within a top-1 budget) and exported, as seify's own are."""
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

import seify
from conftest import realistic, save_weights
from seify.analyze import analyze
from seify.checkpoint import read_recipe
from seify.equivalence import difference
from seify.export import export
from seify.fold import fold
from seify.gates import find_gates, record_gates
from seify.images.scoring import evaluate_folder
from seify.profile import profile

# the networks the issue names, with their gate counts (timm's and torchvision's own SE blocks)
NAMED = {"efficientnet_b0": 16, "mobilenetv3_small_100": 9, "regnety_002": 13, "seresnet18": 8,
         "torchvision:mobilenet_v3_small": 9, "resnet18": 0}


def _build(spec, **kwargs):
    if spec.startswith("torchvision:"):
        return torchvision.models.get_model(spec.split(":", 1)[1], weights=None, **kwargs)
    return timm.create_model(spec, **kwargs)


@pytest.mark.parametrize("spec", list(NAMED))
def test_the_named_networks_gates_are_found(spec):
    assert len(find_gates(_build(spec))) == NAMED[spec]


@pytest.mark.parametrize("spec,count,kind", [
    ("ese_vovnet19b_dw", 4, "EffectiveSEModule"), ("eca_resnet33ts", 10, "EcaModule"), ("hgnet_tiny", 5, "EseModule"),
    ("legacy_seresnet18", 8, "SEModule"), ("ghostnet_100", 7, "SqueezeExcite"), ("rexnet_100", 13, "SEModule"),
    ("gcresnet33ts", 0, None), ("skresnet18", 0, None), ("convnextv2_atto", 0, None),  # add, branches, GRN
    ("torchvision:regnet_y_400mf", 16, "SqueezeExcitation"), ("torchvision:efficientnet_b0", 16, "SqueezeExcitation")])
def test_every_kind_of_gate_and_none_of_the_lookalikes(spec, count, kind):
    gates = find_gates(_build(spec))
    assert len(gates) == count and {g.kind for g in gates.values()} == ({kind} if kind else set())


class _Inline(nn.Module):
    """A gate written by other code: found by its shape."""

    def __init__(self, c=8):
        super().__init__()
        self.down, self.up = nn.Linear(c, 4), nn.Linear(4, c)

    def forward(self, x):
        return x * torch.tanh(self.up(torch.relu(self.down(x.mean((2, 3))))))[:, :, None, None]


class _Additive(nn.Module):  # GCNet's way: adds a global context, gates nothing
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv(x.mean((2, 3), keepdim=True))


class _Spatial(nn.Module):  # CBAM's spatial half: its pool is over the channels
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 7, padding=3)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x.mean(1, keepdim=True)))


def test_gates_written_by_other_code_are_found_by_their_shape():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _Inline(), _Additive(), _Spatial(), nn.ReLU())
    gates = find_gates(model)
    assert list(gates) == ["1"] and gates["1"].kind == "_Inline"
    assert list(find_gates(model, exclude=r"^1$")) == [] and list(find_gates(model, include="1")) == ["1"]


@pytest.mark.parametrize("spec", ["seresnet18", "efficientnet_b0", "torchvision:mobilenet_v3_small", "eca_resnet33ts"])
def test_a_recorded_gate_is_what_the_block_multiplies_by(spec):
    """Read off the gate's activation, the values equal an independent measurement from the block's input and
    output (<x, y> / <x, x>, exact for y = x * g)."""
    model = realistic(_build(spec)).eval()
    gates = find_gates(model)
    seen = {}

    def keep(path):
        def hook(module, args, out):
            seen.setdefault(path, (args[0].clone(), out.clone()))  # before in-place ops after it change them
        return hook
    hooks = [g.module.register_forward_hook(keep(path)) for path, g in gates.items()]
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    stats = record_gates(model, gates, [(x, labels, [])], 2, torch.device("cpu"))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for path, (inp, out) in seen.items():
        energy = (inp.double() ** 2).sum((2, 3))
        measured = (inp.double() * out.double()).sum((2, 3)) / energy
        alive = (energy > 0).all(0)  # a channel a ReLU zeroed says nothing of its gate here
        assert alive.float().mean() > 0.5
        assert torch.allclose(stats[path].mean.double()[alive], measured.mean(0)[alive], atol=1e-5), path


def test_a_constant_native_gate_folds_exactly(tmp_path):
    """Constant gates (their last excitation layer zeroed) fold without DATA, backward into a norm (SE-ResNet) or
    forward into the convolution that reads them (EfficientNet, after its SiLU), and the model is unchanged."""
    for spec in ("seresnet18", "efficientnet_b0"):
        model = realistic(_build(spec, num_classes=5))
        for gate in find_gates(model).values():
            with torch.no_grad():
                gate.last.weight.zero_()
                gate.last.bias.copy_(torch.randn(gate.last.bias.shape))
        weights = save_weights(model, tmp_path / f"{spec}.safetensors")
        result = fold(spec, tmp_path / f"{spec}-folded.safetensors", weights=weights, latency=False)
        assert len(result.folded) == NAMED[spec] and result.kept == []
        into = {p.rsplit(".", 1)[0].rsplit(".", 1)[-1] for s in result.folded for p in s.into}
        assert into == ({"bn2"} if spec == "seresnet18" else {"conv_pw", "conv_pwl"})
        folded = seify.load(tmp_path / f"{spec}-folded.safetensors")
        assert not find_gates(folded)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            checked = difference(model.eval()(x), folded(x))
        assert checked.agrees, checked.why()
        assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in folded.parameters()) == \
            result.params_saved == sum(s.params for s in result.folded)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from seify.images.synthetic import make_dataset
    return make_dataset(tmp_path_factory.mktemp("d"), train_per_class=4, val_per_class=4, size=32)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in NAMED if NAMED[s]])
def test_analyze_fold_profile_and_export_on_the_named_networks(tmp_path, data, spec):
    model = realistic(_build(spec, num_classes=4))
    weights = save_weights(model, tmp_path / "w.safetensors")
    analysis = analyze(spec, str(data), weights=weights, out=tmp_path / "a")
    assert len(analysis.sites) == NAMED[spec] and all(s.macs for s in analysis.sites)
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert report["classes"] == sorted(p.name for p in (data / "val").iterdir())
    result = fold(spec, tmp_path / "f.safetensors", str(data), weights=weights, max_gate_std=10.0, latency=False)
    assert len(result.folded) == NAMED[spec]
    folded = seify.load(tmp_path / "f.safetensors")
    assert read_recipe(tmp_path / "f.safetensors")["folded_native"] == [s.path for s in
                                                                                          result.folded]
    scored = evaluate_folder(str(tmp_path / "f.safetensors"), str(data), workers=0)
    assert scored["top1"] == pytest.approx(result.top1_after)  # measured, not estimated
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(folded(x), result.module(x))
    exported = export(str(tmp_path / "f.safetensors"), tmp_path / "f.onnx", legacy=True)  # checked in onnxruntime
    assert exported.details["exporter"] == "torchscript" and (tmp_path / "f.onnx").exists()
    cost = profile(spec, input_size=(3, 32, 32), latency=False)
    assert cost.native and len(cost.sites) == NAMED[spec]
    assert cost.added_params == sum(g.params for g in find_gates(_build(spec)).values())


def test_the_gates_cost_counted_by_hand():
    """profile of SE-ResNet-18 at 64 px: each gate costs its squeeze and scale (one MAC per element each) and its
    two 1x1 layers (timm rounds C/16 up to a multiple of 8); with every gate folded it is resnet18."""
    cost = profile("seresnet18", input_size=(3, 64, 64), latency=False)
    stages = [(64, 8, 16), (128, 8, 8), (256, 16, 4), (512, 32, 2)]  # channels, reduced, map size at 64 px
    assert cost.added_macs == sum(2 * (2 * c * s * s + 2 * c * rd) for c, rd, s in stages)  # two blocks a stage
    assert cost.added_params == sum(2 * (2 * c * rd + c + rd) for c, rd, _ in stages)
    assert cost.base.params == sum(p.numel() for p in timm.create_model("resnet18").parameters())
    assert cost.base.macs == profile("resnet18", input_size=(3, 64, 64), latency=False).base.macs


def test_convert_never_adds_a_gate_beside_one(cli, tmp_path):
    for spec in ("seresnet18", "efficientnet_b0"):
        for size in (8, 16, 32, 224):
            code, _, err = cli("convert", spec, "--input-size", f"3,{size},{size}", "--dry-run")
            assert code == 2 and "already have an SE-style gate" in err, (spec, size, err)
    converted = seify.save(seify.convert("resnet18", input_size=(3, 16, 16)), tmp_path / "r.safetensors")
    code, _, err = cli("convert", converted, "--input-size", "3,16,16", "--dry-run")
    assert code == 2 and "already" in err


def test_fold_within_a_budget_that_allows_nothing_writes_the_model_unchanged(tmp_path, data, monkeypatch):
    import seify.fold as fold_module
    model = realistic(_build("test_byobnet", num_classes=4))
    weights = save_weights(model, tmp_path / "w.safetensors")
    real = fold_module._Measure.measured

    def every_fold_costs_a_point(self, folded):
        change, top1 = real(self, folded)
        return change, top1 if folded is self.original else top1 - 1.0
    monkeypatch.setattr(fold_module._Measure, "measured", every_fold_costs_a_point)
    result = fold("test_byobnet", tmp_path / "f.safetensors", str(data), weights=weights, max_top1_drop=0.5,
                  latency=False)
    assert result.folded == [] and result.steps == [] and "allows no gate" in result.notes[0]
    assert all("past 0.5 points" in k["why"] for k in result.kept) and len(result.kept) == 4
    from safetensors.torch import load_file  # the written model is the input's weights, byte for byte
    written, given = load_file(str(tmp_path / "f.safetensors")), load_file(weights)
    assert written.keys() == given.keys() and all(torch.equal(written[k], given[k]) for k in given)
