"""Adapter runs and files: what trains is counted, the base stays bit for bit, an adapter loads on its base alone and
scores what its merged exports score; the controls (probe, scale, a network's own gates) train only what they
should."""
import json

import pytest
import timm
import torch
from safetensors import safe_open

import seify
from conftest import ARCH, KillAt, config, realistic, save_weights, weights
from seify.checkpoint import read_recipe
from seify.errors import SeifyError
from seify.finetune.loop import Trainer, finetune
from seify.images.scoring import evaluate_folder
from seify.models import classifier_keys
from seify.se import ChannelScale, SqueezeExcite


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _trained(tiny, plain4, out, **kw):
    """A finished adapter run: (the trainer, its model's tensors before training)."""
    trainer = Trainer(ARCH, str(tiny), config(out, adapter=True, lr=1e-2, **kw), weights=plain4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    return trainer, before


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny, plain4):
    out = tmp_path_factory.mktemp("adapter") / "run"
    trainer, before = _trained(tiny, plain4, out)
    return trainer, before, out


def test_an_adapter_run_trains_its_blocks_and_head_alone(adapter_run, plain4):
    trainer, before, out = adapter_run
    model, trains = trainer.model, trainer.prepared.trains
    assert read_recipe(out / "best.safetensors")["placement"] == "module"  # --adapter's placement
    assert any("at the module placement (--adapter's default)" in n for n in trainer.prepared.notes)
    blocks = {n for n, _ in model.named_parameters() if ".se." in n}
    assert trains == blocks | set(classifier_keys(model)) and blocks  # counted by name, independently
    after = model.state_dict()
    frozen = [k for k in after if k not in trains]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # every other tensor, BN statistics included
    assert any(k.endswith("running_mean") for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trains if k.endswith("weight"))
    # the base the run was given is the model's frozen part, bit for bit, where the conversion left it alone
    base = weights(plain4)
    assert all(torch.equal(base[k], after[k]) for k in frozen if k in base) and base.keys() >= set(frozen)
    # the optimizer holds state for what trains and nothing else; no frozen weight got a gradient
    state = trainer.training.optimizer.state
    held = {id(p) for group in trainer.training.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in trains} and len(state) == len(trains)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trains)


def test_adapter_files_hold_what_trained_and_what_conversion_changed(adapter_run, plain4, tiny, tmp_path):
    trainer, _, out = adapter_run
    recipe = read_recipe(out / "best.safetensors")
    assert recipe["recipe_format"] == 2 and recipe["adapter"]["base"]["weights"] == "plain-4.safetensors"
    assert recipe["options"]["init"] == "identity-gate"  # the fresh gate's x2 kept in the gate: the base untouched
    held = _keys(out / "best.safetensors")
    assert held == trainer.prepared.trains
    full = sum(t.numel() for t in trainer.model.state_dict().values())
    assert sum(weights(out / "best.safetensors")[k].numel() for k in held) < 0.05 * full
    folded = Trainer(ARCH, str(tiny), config(tmp_path / "f", adapter=True), weights=plain4, explicit={"init"})
    extra = set(folded.prepared.recipe["adapter"]["tensors"]) - folded.prepared.trains
    base = weights(plain4)  # asked for --init identity: the x2 went into the norms before the blocks, kept too
    assert extra and all(torch.equal(folded.model.state_dict()[k], 2 * base[k]) for k in extra)
    folded.close()


def test_an_adapter_loads_on_its_base_and_on_nothing_else(adapter_run, plain4, tmp_path):
    trainer, _, out = adapter_run
    last = str(out / "last.safetensors")
    model = seify.resolve(last, weights=plain4).model
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(seify.load(last, base=plain4)(torch.ones(1, 3, 32, 32)),
                       trainer.model.eval()(torch.ones(1, 3, 32, 32)))
    with pytest.raises(SeifyError, match="is an adapter.*give that base with weights plain-4.safetensors"):
        seify.resolve(last)
    other = save_weights(realistic(timm.create_model(ARCH, num_classes=4), seed=3), tmp_path / "other.safetensors")
    with pytest.raises(SeifyError, match="is not the base .* trained on: it expects test_resnet with the weights "
                                         "plain-4.safetensors"):
        seify.resolve(last, weights=other)
    modified = weights(plain4)
    modified["layer4.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    from safetensors.torch import save_file
    save_file(modified, str(tmp_path / "plain-4.safetensors"))  # the same name, one weight changed
    with pytest.raises(SeifyError, match="is not the base"):
        seify.resolve(last, weights=str(tmp_path / "plain-4.safetensors"))
    with pytest.raises(SeifyError, match="is an adapter itself, not a base"):
        seify.resolve(last, weights=str(out / "best.safetensors"))
    with pytest.raises(SeifyError, match="is an adapter"):
        seify.resolve(last, pretrained=True)  # trained on a file, not on pretrained weights


def _with_recipe(src, dst, change):
    from safetensors.torch import save_file
    recipe = read_recipe(src)
    change(recipe)
    save_file(weights(src), str(dst), metadata={"format": "pt", "seify": json.dumps(recipe)})
    return str(dst)


def test_a_tampered_digest_is_refused(adapter_run, plain4, tmp_path):
    _, _, out = adapter_run
    other = _with_recipe(out / "last.safetensors", tmp_path / "a.safetensors",
                         lambda r: r["adapter"]["base"].update(sha256="0" * 64))
    with pytest.raises(SeifyError, match="is not the base"):
        seify.resolve(other, weights=plain4)
    broken = _with_recipe(out / "last.safetensors", tmp_path / "b.safetensors",
                          lambda r: r["adapter"]["base"].update(sha256="not a digest"))
    with pytest.raises(SeifyError, match="damaged seify recipe .*sha256"):
        seify.resolve(broken, weights=plain4)


def test_adapter_and_base_score_what_every_merged_export_scores(adapter_run, plain4, tiny, tmp_path, cli):
    _, _, out = adapter_run
    best = str(out / "best.safetensors")
    scored = evaluate_folder(best, str(tiny), weights=plain4, device="cpu", workers=0)
    assert any(n.startswith("adapter:") for n in scored["notes"])
    merged = tmp_path / "merged.safetensors"
    code, _, err = cli("export", best, "--weights", plain4, "-o", merged, "--format", "safetensors")
    assert code == 0, err
    assert read_recipe(merged).get("adapter") is None and read_recipe(merged)["recipe_format"] == 1
    again = evaluate_folder(str(merged), str(tiny), device="cpu", workers=0)
    assert (again["top1"], again["loss"], again["confusion"]) == (scored["top1"], scored["loss"], scored["confusion"])
    assert merged.stat().st_size > 20 * (out / "best.safetensors").stat().st_size
    code, _, err = cli("export", best, "--weights", plain4, "-o", tmp_path / "m.onnx", "--legacy")
    assert code == 0, err
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(2, 3, 32, 32)
    expected = seify.load(str(merged))(x).detach().numpy()
    assert abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - expected).max() < 1e-4
    code, _, err = cli("export", best, "-o", tmp_path / "n.onnx")
    assert code == 2 and "is an adapter" in err and err.count("\n") == 1
    assert not (tmp_path / "n.onnx").exists()


def test_commands_take_an_adapter_with_its_base(adapter_run, plain4, tiny, tmp_path, cli):
    _, _, out = adapter_run
    best = str(out / "best.safetensors")
    code, stdout, err = cli("evaluate", best, tiny, "--weights", plain4, "--workers", "0")
    assert code == 0 and "adapter: " in stdout and "checked" in stdout, err
    code, _, err = cli("evaluate", best, tiny, "--workers", "0")
    assert code == 2 and "give that base with --weights plain-4.safetensors" in err and err.count("\n") == 1
    code, stdout, err = cli("profile", best, "--no-latency")  # counting needs the architecture alone
    added = sum(p.numel() for n, p in seify.resolve(best, weights=plain4).model.named_parameters() if ".se." in n)
    assert code == 0 and f"+{added:,}" in stdout and "\nconv1.se\t" in stdout, err
    code, stdout, err = cli("analyze", best, tiny, "--weights", plain4, "--out", tmp_path / "an")
    assert code == 0 and (tmp_path / "an" / "analysis.json").exists(), err
    code, stdout, err = cli("fold", best, tiny, "--weights", plain4, "-o", tmp_path / "f.safetensors", "--no-latency",
                            "--max-gate-std", "1")
    assert code == 0, err  # a whole file: the adapter merged, its gates folded at their mean
    assert read_recipe(tmp_path / "f.safetensors").get("adapter") is None


def test_a_probe_trains_the_head_alone(tiny, plain4, tmp_path):
    trainer = Trainer(ARCH, str(tiny), config(tmp_path / "p", adapter=True), options=None, weights=plain4)
    assert trainer.prepared.trains == set(classifier_keys(trainer.model)) == {"fc.weight", "fc.bias"}
    trainer.run()
    assert _keys(tmp_path / "p" / "best.safetensors") == {"fc.weight", "fc.bias"}


def test_a_scale_adapter_trains_a_scale_and_shift_where_se_goes(tiny, plain4, tmp_path):
    options = seify.SEOptions(block="scale")
    trainer = Trainer(ARCH, str(tiny), config(tmp_path / "s", adapter=True, lr=1e-2), options, weights=plain4)
    scales = {n: m for n, m in trainer.model.named_modules() if isinstance(m, ChannelScale)}
    se = seify.convert(ARCH, seify.SEOptions(at="module"), weights=plain4)
    assert sorted(scales) == sorted(s.path for s in se.sites)  # the same sites: --adapter's placement, module
    assert not any(isinstance(m, SqueezeExcite) for m in trainer.model.modules())
    counted = sum(p.numel() for n, p in trainer.model.named_parameters() if n in trainer.prepared.trains)
    head = 4 * trainer.model.get_classifier().in_features + 4
    assert counted == sum(2 * s.channels for s in se.sites) + head  # 2C per site and the 4-way head
    trainer.run()
    assert read_recipe(tmp_path / "s" / "best.safetensors")["recipe_format"] == 2
    assert not torch.equal(trainer.model.get_submodule(se.sites[0].path).weight,
                           torch.ones_like(trainer.model.get_submodule(se.sites[0].path).weight))


def test_own_gates_are_an_adapter_without_surgery(tiny, tmp_path):
    plain = save_weights(realistic(timm.create_model("test_efficientnet", num_classes=4)), tmp_path / "e.pth")
    trainer = Trainer("test_efficientnet", str(tiny), config(tmp_path / "g", adapter=True, own_gates=True),
                      options=None, weights=plain)
    gates = {n for n, _ in trainer.model.named_parameters() if n.startswith(("blocks.3.0.se.", "blocks.4.0.se."))}
    assert gates and trainer.prepared.trains == gates | set(classifier_keys(trainer.model))
    trainer.run()
    model = seify.resolve(str(tmp_path / "g" / "best.safetensors"), weights=plain).model
    assert torch.equal(model(torch.ones(1, 3, 32, 32)), trainer.model.eval()(torch.ones(1, 3, 32, 32)))
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in trainer.model.named_parameters()}


def test_an_adapter_run_resumes_exactly(tiny, plain4, tmp_path):
    uninterrupted = tmp_path / "whole"
    finetune(ARCH, str(tiny), config(uninterrupted, adapter=True, ema_decay=0.9), weights=plain4)
    stopped = tmp_path / "stopped"
    result = finetune(ARCH, str(tiny), config(stopped, adapter=True, ema_decay=0.9), weights=plain4, log=KillAt)
    assert result.stopped_by == "SIGTERM"
    finetune(ARCH, str(tiny), config(stopped, adapter=True, ema_decay=0.9, resume=True), weights=plain4)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = weights(uninterrupted / name), weights(stopped / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_adapter_input_is_one_line(cli, tiny, tmp_path, plain4):
    cases = [
        (["finetune", ARCH, tiny, "--adapter", "--out", tmp_path / "r"], "--adapter trains on a frozen base"),
        (["finetune", ARCH, tiny, "--own-gates", "--weights", plain4, "--out", tmp_path / "r"],
         "--own-gates chooses what an adapter trains; it goes with --adapter"),
        (["finetune", ARCH, tiny, "--adapter", "--own-gates", "--weights", plain4, "--out", tmp_path / "r"],
         "has no channel gates of its own"),
        (["finetune", ARCH, tiny, "--block", "scale", "--reduction", "8", "--weights", plain4],
         "--reduction is an option of SE blocks; --block scale has none"),
        (["compare", ARCH, tiny, "--weights", plain4, "--arms", "probe,gates", "--out", tmp_path / "c"],
         "gates: test_resnet has no channel gates of its own"),
        (["compare", "vit_tiny_patch16_224", tiny, "--arms", "probe,scale", "--out", tmp_path / "d"],
         "scale: nothing to convert"),
        (["compare", ARCH, tiny, "--weights", plain4, "--arms", "probe,scale:block=se", "--out", tmp_path / "e"],
         "the arm's kind says its block"),
    ]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_weight_decay_spares_biases_norms_and_blocks_and_blocks_take_their_lr(tiny, plain4, tmp_path):
    trainer = Trainer(ARCH, str(tiny), config(tmp_path / "o", se_lr_scale=10, weight_decay=0.05), weights=plain4)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.training.optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            spared = p.ndim <= 1 or ".se." in name
            assert group["weight_decay"] == (0 if spared else 0.05), name
            expected = 1e-2 if ".se." in name else 1e-4  # the kept head was trained: the backbone's lr
            assert group["initial_lr"] == pytest.approx(expected), name


@pytest.mark.slow
def test_two_ranks_train_an_adapter_on_a_whole_base(tmp_path, tiny, se_file):
    import os
    import subprocess
    import sys

    from test_finetune import _free_port
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "seify", "finetune", se_file, str(tiny), "--adapter", "--new-head",
                          "--out", str(out), "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--workers",
                          "0", "--device", "cpu", "--log-every", "0", "--lr", "0.01"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "device cpu x2" in run.stdout and "an adapter run" in run.stdout
    recipe = read_recipe(out / "best.safetensors")
    assert recipe["adapter"]["base"]["whole"] and recipe["adapter"]["base"]["model"] == "se.safetensors"
    trains = set(recipe["adapter"]["trains"])
    assert _keys(out / "best.safetensors") == trains  # SE converted already: nothing else changed
    model = seify.load(out / "best.safetensors", base=se_file)
    base = seify.load(se_file).state_dict()
    trained = model.state_dict()
    assert all(torch.equal(trained[k], base[k]) for k in trained if k not in trains)
    assert all(not torch.equal(trained[k], base[k]) for k in trains if k in base and k.endswith("fc2.weight"))
    with pytest.raises(SeifyError, match="give that base with weights se.safetensors"):
        seify.load(out / "best.safetensors", base=str(tmp_path.parent))  # a folder: refused, not crashed


def test_compare_runs_the_controls_as_adapters_and_counts_what_each_trains(tmp_path, tiny, plain4, cli):
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", ARCH, tiny, "--weights", plain4, "--arms", "probe,scale,se", "--adapter",
                            "--seeds", "1", "--epochs", "1", "--img-size", "32", "--batch-size", "8", "--workers",
                            "0", "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    arms = {a["name"]: a for a in report["arms"]}
    assert report["reference"] == "probe" and [v["arm"] for v in report["verdicts"]] == ["scale", "se"]
    head = 4 * timm.create_model(ARCH).get_classifier().in_features + 4
    module = seify.convert(ARCH, seify.SEOptions(at="module"), weights=plain4)  # --adapter's placement
    assert arms["probe"]["trained_params"] == head
    assert arms["scale"]["trained_params"] == head + sum(2 * s.channels for s in module.sites)
    assert arms["se"]["trained_params"] == head + module.added_params
    assert all(a["adapter"] for a in arms.values())
    assert arms["probe"]["file_bytes"] < arms["scale"]["file_bytes"] < arms["se"]["file_bytes"] < 200_000
    for name in arms:
        best = out / name / "seed-0" / "best.safetensors"
        assert read_recipe(best)["adapter"] and best.stat().st_size == arms[name]["file_bytes"]
