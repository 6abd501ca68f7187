"""Each sentence of a model card is checked against the file it describes: converted, fine-tuned, folded (constant,
at the mean, within a budget; seify's blocks and a network's own gates)."""
import json
import re

import timm
import torch
from safetensors.torch import save_file

import seify
from conftest import config
from seify.card import model_card
from seify.checkpoint import read_recipe
from seify.finetune.loop import finetune
from seify.fold import fold
from seify.gates import find_gates
from seify.images.scoring import evaluate_folder


def _card(path) -> str:
    return model_card(seify.resolve(str(path)), "folder", "m")


def _same(a, b, size=32) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bool((seify.load(a)(x) - seify.load(b)(x)).abs().max() <= 1e-5)


def test_cards_of_seify_files_say_what_each_file_is(tmp_path, tiny, se_file):
    card = _card(se_file)
    sites = len(read_recipe(se_file)["sites"])
    assert f"{sites} SE blocks (Hu et al., SENet)" in card
    assert "a conversion, computing what its base model does" in card and "## Folded" not in card
    run = finetune(se_file, str(tiny), config(tmp_path / "run", epochs=1))
    best = run.out / "best.safetensors"
    card = _card(best)
    recipe = read_recipe(best)
    assert f"value: {recipe['top1']:.2f}" in card and "top-1 accuracy (held-out split)" in card
    assert f"(the best epoch, {recipe['epoch']})" in card and "before folding" not in card

    constant = fold(se_file, tmp_path / "constant.safetensors", latency=False)
    card = _card(tmp_path / "constant.safetensors")
    assert all(f"- `{s.path}`: constant" in card for s in constant.folded)
    assert "Every gate folded was constant by its weights: the file computes what the model did." in card
    assert _same(tmp_path / "constant.safetensors", se_file)  # the sentence, checked

    mean = fold(str(best), tmp_path / "mean.safetensors", str(tiny), max_gate_std=1.0, latency=False)
    card = _card(tmp_path / "mean.safetensors")
    varied = [s for s in mean.folded if s.gate_std_max and s.gate_std_max > 0]
    assert varied and all(f"- `{s.path}`: at its mean over the images (it varied by up to {s.gate_std_max:.3g})"
                          in card for s in varied)
    assert "constant by its weights" not in card and "before folding: see above" in card
    measured = float(re.search(r"measured by seify fold on (\d+) images\"\n      value: ([0-9.]+)", card).group(2))
    again = evaluate_folder(str(tmp_path / "mean.safetensors"), str(tiny), device="cpu", workers=0)
    assert measured == round(again["top1"], 2) == round(mean.top1_after, 2)  # the header's number, re-measured

    budget = fold(str(best), tmp_path / "budget.safetensors", str(tiny), max_top1_drop=100.0, latency=False)
    card = _card(tmp_path / "budget.safetensors")
    assert budget.folded and all(f"- `{s.path}`: within the top-1 budget" in card for s in budget.folded)


def test_cards_of_a_network_with_its_own_gates_say_so(tmp_path, tiny):
    state = timm.create_model("mobilenetv3_small_050", num_classes=4).state_dict()
    state["blocks.2.1.se.conv_expand.weight"].zero_()
    weights = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    fold("mobilenetv3_small_050", tmp_path / "f.safetensors", weights=str(weights), latency=False)
    card = _card(tmp_path / "f.safetensors")
    left = find_gates(seify.load(tmp_path / "f.safetensors"))
    assert f"No blocks added by seify. The network's own channel gates: {len(left)} (SqueezeExcite)." in card
    assert "the plain model" not in card and "- `blocks.2.1.se`: constant" in card
    assert "the network as it was loaded, its constant gates folded." in card
    fold(str(tmp_path / "f.safetensors"), tmp_path / "g.safetensors", str(tiny), max_gate_std=10.0, latency=False,
         img_size=32)
    card = _card(tmp_path / "g.safetensors")
    assert "No blocks added by seify. The network has no channel gates." in card
    assert "it computes close to, not exactly, what its base does" in card
    assert "a conversion" not in card and "constant by its weights" not in card.split("## Folded")[-1]
    assert json.loads(json.dumps(read_recipe(tmp_path / "g.safetensors")["folds"]))[-1]["img_size"] == 32
