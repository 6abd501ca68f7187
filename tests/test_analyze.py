"""seify analyze and seify fold: what SE learned, checked by hand on a few images, and taking it back exactly."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import seify
from conftest import ARCH, config, realistic, save_weights
from seify.analyze import analyze
from seify.checkpoint import read_recipe
from seify.counting import cost
from seify.errors import SeifyError
from seify.finetune.loop import finetune
from seify.finetune.progress import SilentLog
from seify.fold import fold
from seify.gates import find_gates
from seify.images import folders as fdata


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """test_resnet converted and fine-tuned one epoch with its SE blocks training from the first step."""
    out = tmp_path_factory.mktemp("run") / "run"
    finetune(ARCH, str(tiny), config(out, epochs=1, se_warmup_epochs=0, lr=5e-3), log=SilentLog)
    return out / "best.safetensors"


def _gates_by_hand(path, folder):
    """Every image of ``folder`` through the file's model, the gates read off each SE block's gate module."""
    model = seify.load(path)
    recipe = read_recipe(path)
    transform = fdata.transforms(recipe["data_config"], None)
    classes = recipe["classes"]
    seen = {}
    hooks = [m.gate.register_forward_hook(lambda mod, a, out, name=name: seen.setdefault(name, []).append(out))
             for name, m in model.named_modules() if isinstance(m, seify.SqueezeExcite)]
    labels = []
    with torch.no_grad():
        for k, name in enumerate(classes):
            for file in sorted((folder / name).iterdir()):
                model(transform(Image.open(file).convert("RGB"))[None])
                labels.append(k)
    for h in hooks:
        h.remove()
    return {name: torch.cat(v).flatten(1).double() for name, v in seen.items()}, np.array(labels), classes


def test_analyze_matches_a_hand_computation(tmp_path, tiny, trained):
    result = analyze(str(trained), str(tiny), out=tmp_path / "a")
    gates, labels, classes = _gates_by_hand(trained, tiny / "val")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "gates.safetensors"))
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert [s["path"] for s in report["sites"]] == list(gates) and report["classes"] == classes
    for site in report["sites"]:
        g = gates[site["path"]]
        assert torch.allclose(saved[f"{site['path']}.mean"].double(), g.mean(0), atol=1e-6)
        assert torch.allclose(saved[f"{site['path']}.std"].double(), g.std(0, unbiased=True), atol=1e-6)
        for k, name in enumerate(classes):
            by_class = g[torch.from_numpy(labels == k)]
            assert torch.allclose(saved[f"{site['path']}.class_mean"][k].double(), by_class.mean(0), atol=1e-6)
            assert site["classes"][name]["images"] == len(by_class)
        means = torch.stack([g[torch.from_numpy(labels == k)].mean(0) for k in range(len(classes))])
        counts = torch.tensor([(labels == k).sum() for k in range(len(classes))], dtype=torch.float64)
        k_, n = len(classes), len(g)  # the one-way ANOVA's F ratio, summed over channels, with its degrees of freedom
        between = (counts[:, None] * (means - g.mean(0)) ** 2).sum() / (k_ - 1)
        within = sum(((g[torch.from_numpy(labels == k)] - means[k]) ** 2).sum() for k in range(k_)) / (n - k_)
        assert site["specificity"] == pytest.approx(float(between / within), rel=1e-4)
        assert site["saturation"] == pytest.approx(float(((g <= 0.05) | (g >= 0.95)).double().mean()))
    assert result.files[2].endswith("excitations.png") and Image.open(result.files[2]).size[0] > 800


def _colours(root):
    """Two classes that differ in colour only: red images and blue images, with noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 6)):
        for name, colour in (("blue", (0, 0, 220)), ("red", (220, 0, 0))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_gate_driven_by_the_class_shows_as_class_specific(tmp_path):
    data = _colours(tmp_path / "colours")
    model = realistic(timm.create_model(ARCH, num_classes=2))
    weights = save_weights(model, tmp_path / "w.safetensors")
    result = seify.convert(ARCH, weights=weights, input_size=(3, 32, 32))
    se_model = result.model
    first = se_model.layer1[0].se
    transform = fdata.transforms(result.recipe()["data_config"], None)
    inputs = {}
    hook = first.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", []).append(args[0]))
    with torch.no_grad():
        for name in ("blue", "red"):
            se_model(torch.stack([transform(Image.open(f).convert("RGB")) for f in sorted((data / "val" / name)
                                                                                        .iterdir())]))
    hook.remove()
    blue, red = (x.mean((2, 3)) for x in inputs["x"])  # each image's squeeze, per channel
    k = int((red.mean(0) - blue.mean(0)).abs().argmax())
    sign = 1.0 if red[:, k].mean() > blue[:, k].mean() else -1.0
    with torch.no_grad():  # hidden unit 0 fires for red images only; gate channel 0 reads it, hard
        first.fc1.weight.zero_()
        first.fc1.weight[0, k] = sign
        first.fc1.bias.zero_()
        first.fc1.bias[0] = -sign * float((red[:, k].mean() + blue[:, k].mean()) / 2)
        first.fc2.weight[0, 0] = 50.0 / float((red[:, k].mean() - blue[:, k].mean()).abs())
    seify.save(result, tmp_path / "driven.safetensors")
    report = analyze(str(tmp_path / "driven.safetensors"), str(data), out=tmp_path / "a").to_dict()
    by_path = {s["path"]: s for s in report["sites"]}
    assert by_path["layer1.0.se"]["specificity"] > 10
    assert all(s["specificity"] == 0 for p, s in by_path.items() if p != "layer1.0.se")  # constant gates


def test_fold_of_a_fresh_conversion_is_the_original_model(tmp_path, cli):
    model = realistic(timm.create_model("resnet18"))
    weights = save_weights(model, tmp_path / "w.safetensors")
    converted = seify.save(seify.convert("resnet18", weights=weights, input_size=(3, 64, 64)),
                           tmp_path / "se.safetensors")
    code, stdout, err = cli("fold", converted, "-o", tmp_path / "folded.safetensors", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["folded"]) == 8 and report["max_output_change"] == 0.0 and report["params_saved"] == 90_112
    folded = seify.load(tmp_path / "folded.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(folded(x), model.eval()(x))
    assert cost(folded, (3, 64, 64))[0] == cost(model, (3, 64, 64))[0]  # parameters and MACs
    assert not any(isinstance(m, seify.SqueezeExcite) for m in folded.modules())
    recipe = read_recipe(tmp_path / "folded.safetensors")
    assert len(recipe["folded"]) == 8 and recipe["sites"] == []
    from seify.profile import profile
    assert profile(str(tmp_path / "folded.safetensors"), latency=False).added_params == 0
    code, _, err = cli("fold", tmp_path / "folded.safetensors", "-o", tmp_path / "again.safetensors")
    assert code == 2 and "has no channel gates (looked for" in err and err.count("\n") == 1


def test_fold_with_data_keeps_the_outputs_within_what_it_reports(tmp_path, tiny, trained):
    result = fold(str(trained), tmp_path / "f.safetensors", str(tiny), max_gate_std=1.0, latency=False)
    assert result.folded and result.images.endswith("val")
    original, folded = seify.load(trained), seify.load(tmp_path / "f.safetensors")
    scored = fdata.ImageDataset(fdata.discover(tiny)[2].items, fdata.transforms(read_recipe(trained)["data_config"],
                                                                                  None))
    with torch.no_grad():
        x = torch.stack([scored[i][0] for i in range(len(scored))])
        change = (original(x) - folded(x)).abs().max().item()
    assert change == pytest.approx(result.max_output_change, abs=1e-6)
    assert result.max_output_change >= max(s.max_output_change for s in result.folded) - 1e-6
    from seify.images.scoring import evaluate_folder
    assert result.top1_before == pytest.approx(evaluate_folder(str(trained), str(tiny), workers=0)["top1"])
    assert result.top1_after == pytest.approx(evaluate_folder(str(tmp_path / "f.safetensors"), str(tiny),
                                                              workers=0)["top1"])
    # independently of fold: the original model with each folded gate held at its mean over the same images
    gates, _, _ = _gates_by_hand(trained, tiny / "val")
    held = seify.load(trained)
    blocks = dict(held.named_modules())
    for site in result.folded:
        mean = gates[site.path].mean(0).float()
        blocks[site.path].gate.register_forward_hook(lambda m, a, out, mean=mean: mean.view(1, -1).expand(
            out.shape[0], -1).reshape(out.shape))
    with torch.no_grad():
        expected, got = held(x), folded(x)
    assert (expected - got).abs().max() <= 1e-4 * expected.abs().max()
    on_device = fold(str(trained), tmp_path / "d.safetensors", str(tiny), max_gate_std=1.0, device="cpu", latency=False)
    assert on_device.to_dict() == {**result.to_dict(), "output": str(tmp_path / "d.safetensors")}
    with torch.no_grad():
        assert torch.equal(seify.load(tmp_path / "d.safetensors")(x), got)
    partial = fold(str(trained), tmp_path / "p.safetensors", str(tiny), max_gate_std=1.0, include="layer[34]",
                   latency=False)
    assert {s.path for s in partial.folded} == {"layer3.0.se", "layer4.0.se"}


def test_analyze_and_fold_refuse_bad_input_in_one_line(cli, tmp_path, tiny, trained, plain4):
    cases = [(["analyze", ARCH, tiny, "--weights", plain4], "has no channel gates (looked for"),
             (["fold", trained, "-o", tmp_path / "x.safetensors"], "nothing to fold in"),
             (["fold", trained, tiny, "-o", tmp_path / "x.safetensors", "--max-gate-std", "-1"],
              "--max-gate-std must be a finite number >= 0"),
             (["fold", trained, tiny, "-o", tmp_path / "x.safetensors", "--max-gate-std", "nan"],
              "--max-gate-std must be a finite number"),
             (["fold", trained, "-o", tmp_path / "x.safetensors", "--include", "nothing-like-this"],
              "no channel gate of"),
             (["fold", trained, tmp_path / "other", "-o", tmp_path / "x.safetensors"], "has classes the model was"),
             (["fold", trained, tiny, "-o", tmp_path / "x.safetensors", "--max-top1-drop", "-1"],
              "--max-top1-drop must be a finite number >= 0"),
             (["fold", trained, tiny, "-o", tmp_path / "x.safetensors", "--max-top1-drop", "nan"],
              "--max-top1-drop must be a finite number"),
             (["fold", trained, tiny, "-o", tmp_path / "x.safetensors", "--max-top1-drop", "half"],
              "Invalid value for '--max-top1-drop'"),
             (["fold", trained, "-o", tmp_path / "x.safetensors", "--max-top1-drop", "0.5"],
              "--max-top1-drop measures top-1 on DATA: pass DATA"),
             (["fold", ARCH, tmp_path / "other", "-o", tmp_path / "x.safetensors", "--weights", plain4,
               "--max-top1-drop", "0.5"], "has no channel gates"),
             (["fold", "seresnet18", tmp_path / "other", "-o", tmp_path / "x.safetensors", "--max-top1-drop", "0.5"],
              "seresnet18 has 1000 outputs but")]
    other = tmp_path / "other"
    for name in ("cats", "dogs"):
        shutil.copytree(tiny / "val" / "gradient", other / name)
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "a").exists()
    # analyze needs no matching head: the gates are grouped by DATA's own classes
    code, _, err = cli("analyze", trained, other, "--out", tmp_path / "a", "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "analysis.json").read_text())["classes"] == ["cats", "dogs"]


def test_split_and_opset_values_are_checked_wherever_they_go(cli, tmp_path, trained, tiny):
    code, _, err = cli("analyze", trained, tiny / "train", "--val-split", "1.5", "--out", tmp_path / "a")
    assert code == 2 and "--val-split must be a finite number > 0 and < 1" in err
    code, _, err = cli("export", trained, "-o", tmp_path / "m.onnx", "--opset", "-3")
    assert code == 2 and "--opset must be a whole number from 7 to" in err and not (tmp_path / "m.onnx").exists()


def test_a_subset_keeps_every_class_in_its_share():
    from collections import Counter

    from seify.images.scoring import stratified
    items = [(f"a{i}", 0) for i in range(90)] + [(f"b{i}", 1) for i in range(9)] + [("c0", 2)]
    chosen = stratified(items, 20)
    assert Counter(label for _, label in chosen) == {0: 17, 1: 2, 2: 1} and len(set(chosen)) == 20
    assert stratified(items, 20) == chosen and set(chosen) <= set(items)  # fixed, and drawn from the items
    assert Counter(label for _, label in stratified(items, 50)) == {0: 44, 1: 5, 2: 1}


def test_class_specificity_of_gates_that_ignore_the_class_is_about_1():
    """Gates drawn the same for every class: the F ratio is about 1 (the biased ratio shrank with the images per
    class, so small and large data were not comparable)."""
    from seify.gates import Gate
    from seify.gates.record import _stats
    g = torch.Generator().manual_seed(0)
    gates, labels = torch.rand(400, 16, generator=g, dtype=torch.float64), torch.arange(400) % 8
    one_hot = torch.nn.functional.one_hot(labels, 8).double()
    s = {"n": 400, "sum": gates.sum(0), "sq": (gates * gates).sum(0), "class_sum": one_hot.T @ gates,
         "class_sq": one_hot.T @ (gates * gates), "class_n": one_hot.sum(0), "saturated": 0}
    block = seify.SqueezeExcite(16, 8)
    stats = _stats("x", s, Gate("x", block, "SqueezeExcite", block.gate, block.fc2), {})
    assert 0.7 < stats.specificity < 1.3
    assert torch.allclose(stats.std.double(), gates.std(0), atol=1e-6)


def test_analyze_names_the_files_it_skipped(tmp_path, tiny, trained):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    (data / "val" / sorted(p.name for p in (data / "val").iterdir())[0] / "broken.jpg").write_bytes(b"not an image")
    result = analyze(str(trained), str(data), out=tmp_path / "a")
    assert any(n.endswith("broken.jpg") for n in result.skipped)
    assert any("skipped 1 unreadable file(s)" in n for n in result.notes)


def test_blocks_that_multiply_by_exactly_one_are_folded_away(tmp_path):
    from seify.options import SEOptions
    for variant in ("post", "identity"):
        conversion = seify.convert("resnet18", SEOptions(variant=variant), input_size=(3, 32, 32))
        path = seify.save(conversion, tmp_path / f"{variant}.safetensors")
        result = fold(str(path), tmp_path / f"{variant}-folded.safetensors", latency=False)
        assert result.kept == [] and len(result.folded) == len(conversion.sites) == 8, result.kept
        folded = seify.load(tmp_path / f"{variant}-folded.safetensors")
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(folded(x), seify.load(path)(x))
        assert sum(p.numel() for p in folded.parameters()) == sum(
            p.numel() for p in conversion.source.model.parameters())


def test_a_constant_negative_gate_is_never_folded_through_a_relu(tmp_path):
    from seify.options import SEOptions
    conversion = seify.convert("resnet18", SEOptions(gate="tanh"), input_size=(3, 32, 32))
    with torch.no_grad():
        for block in (m for m in conversion.model.modules() if isinstance(m, seify.SqueezeExcite)):
            block.fc2.bias.fill_(-0.5)  # a constant gate of tanh(-0.5) < 0
    path = seify.save(conversion, tmp_path / "neg.safetensors")
    with pytest.raises(SeifyError, match="nothing to fold .* negative in some channel"):
        fold(str(path), tmp_path / "out.safetensors", latency=False)


class _ColourNet(nn.Module):
    """Red against blue, told by one gate alone: channel 0 is 1 everywhere and the head reads only it, so the class
    is whatever ``se_b``'s gate for it makes of the image's colour (channel 1 is red minus blue). ``se_a``'s gate is
    constant, and folds for free; folding ``se_b`` at its mean leaves the head nothing to tell by."""

    num_classes = 2

    def __init__(self):
        from timm.layers import SEModule
        super().__init__()
        self.stem, self.mix, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4).eval()
        self.se_a, self.se_b = SEModule(4, rd_channels=4), SEModule(4, rd_channels=4)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            self.bn1.weight.fill_(1), self.bn2.weight.fill_(1)
            self.stem.bias.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
            self.stem.weight[1, :, 0, 0] = torch.tensor([1.0, 0.0, -1.0])
            self.mix.weight.copy_(torch.eye(4)[:, :, None, None]), self.out.weight.copy_(torch.eye(4)[:, :, None, None])
            self.se_a.fc2.bias.copy_(torch.tensor([2.0, 1.0, 0.5, 3.0]))  # fc2's weights zero: a constant gate
            self.se_b.fc1.weight[0, 1] = 1.0
            self.se_b.fc2.weight[0, 0], self.se_b.fc2.bias[0] = 50.0, -2.0
            self.se_b.fc2.bias[1:] = 10.0
            self.fc.weight[:, 0] = torch.tensor([-1.0, 1.0])
            self.fc.bias.copy_(torch.tensor([0.5, -0.5]))  # red (class 1) where channel 0's gate passes 0.5

    def forward(self, x):
        x = self.se_a(self.bn1(self.stem(x)))
        x = self.se_b(self.bn2(self.mix(x)))
        return self.fc(self.out(x).mean((2, 3)))


def test_fold_within_a_top1_budget_measures_every_step(tmp_path):
    """The least harmful gates first, each fold re-measured with those before it, until the next would take the
    drop past the budget; every number is what the folded model scores when evaluated again."""
    from seify.images.scoring import evaluate, scored_images
    from seify.models import resolve
    data = _colours(tmp_path / "colours")
    model = _ColourNet().eval()

    def top1(m):
        images = scored_images(resolve(m), str(data))
        return evaluate(m, fdata.loader(images.dataset, 4, fdata.EpochSampler(len(images.dataset), False), 0, False,
                                        False), torch.device("cpu"), 2)["top1"]
    tight = fold(model, None, str(data), max_top1_drop=0.0, latency=False)
    assert tight.top1_before == top1(model) == 100.0
    assert [s["path"] for s in tight.steps] == ["se_a"] and tight.steps[0]["top1"] == 100.0
    assert tight.stopped_at["path"] == "se_b" and 100.0 - tight.stopped_at["top1"] > 0
    assert tight.top1_after == top1(tight.module) == 100.0
    assert [k["path"] for k in tight.kept] == ["se_b"] and "past 0 points" in tight.kept[0]["why"]
    both = fold(model, None, str(data), max_top1_drop=60.0, latency=False)
    assert [s["path"] for s in both.steps] == ["se_a", "se_b"] and both.stopped_at is None
    assert both.top1_after == top1(both.module) == tight.stopped_at["top1"] == 50.0
    assert both.params_saved == sum(p.numel() for p in model.se_a.parameters()) * 2 and not find_gates(both.module)
