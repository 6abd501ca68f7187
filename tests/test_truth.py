"""Every number on inputs seify did not make says what it rests on: the size a model ran at and where that came
from, a model at chance said so, a tree that changed since its run scored on what the run held out."""
import shutil

import pytest

from conftest import ARCH, config
from seify.finetune.loop import finetune
from seify.fold import fold
from seify.images.scoring import evaluate_folder


def test_the_size_a_model_runs_at_is_said_and_a_guessing_model_is_warned(tiny, plain4, tmp_path, se_file):
    report = evaluate_folder(ARCH, str(tiny), weights=plain4, device="cpu", workers=0)
    assert report["img_size"] == 160 and "the architecture's default" in report["img_size_from"]
    assert any(n.startswith("at 160 px (the architecture's default: the checkpoint records no size)")
               for n in report["notes"])
    warned = any("is about chance (25.0% for 4 classes)" in n and "--img-size" in n for n in report["notes"])
    assert warned == (report["top1"] <= 30)  # this random-looking model scores about what guessing would
    asked = evaluate_folder(ARCH, str(tiny), weights=plain4, device="cpu", workers=0, img_size=32)
    assert asked["img_size"] == 32 and asked["img_size_from"] == "--img-size"
    run = finetune(se_file, str(tiny), config(tmp_path / "run", epochs=1))
    folded = fold(str(run.out / "best.safetensors"), tmp_path / "f.safetensors", str(tiny), img_size=40,
                  max_gate_std=1.0, latency=False)
    assert (folded.img_size, folded.img_size_from) == (40, "--img-size")
    from seify.checkpoint import read_recipe
    assert read_recipe(tmp_path / "f.safetensors")["data_config"]["input_size"] == [3, 40, 40]
    again = fold(str(run.out / "best.safetensors"), None, str(tiny), max_gate_std=1.0, latency=False)
    assert (again.img_size, again.img_size_from) == (32, "the size it was fine-tuned at")


def test_bad_size_options_are_one_line(cli, tiny, se_file, tmp_path):
    for args, message in [
        (["fold", se_file, "-o", tmp_path / "f.safetensors", "--img-size", "4"], "--img-size must be a whole number"),
        (["fold", se_file, "-o", tmp_path / "f.safetensors", "--img-size", "32"], "--img-size is the size DATA"),
        (["fold", se_file, tiny, "-o", tmp_path / "f.safetensors", "--max-gate-std", "0.1", "--max-top1-drop", "1"],
         "pass one of them"),
        (["fold", se_file, tiny, "-o", tmp_path / "f.safetensors", "--max-gate-std", "inf"],
         "--max-gate-std must be a finite number >= 0 and <= 1e+06, not inf"),
        (["analyze", se_file, tiny, "--img-size", "0"], "--img-size must be a whole number"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)


def test_a_tree_that_changed_since_its_run_is_scored_on_what_the_run_held_out(tmp_path, tiny, se_file):
    data = tmp_path / "data"
    shutil.copytree(tiny / "train", data)
    run = finetune(se_file, str(data), config(tmp_path / "run", epochs=1, val_split=0.25))
    best = str(run.out / "best.safetensors")
    same = evaluate_folder(best, str(data), device="cpu", workers=0)
    held = same["images"]
    assert held == 8 and "that the run held out" in same["scored"]
    some = sorted((data / "stripes_vertical").iterdir())[0]
    shutil.copy(some, data / "stripes_vertical" / "added.jpg")  # one image added: another tree
    changed = evaluate_folder(best, str(data), device="cpu", workers=0)
    assert changed["images"] == held and "held out and are still there (8 held out)" in changed["scored"]
    assert any("is not the tree the run trained on" in n and "--all-images" in n for n in changed["notes"])
    every = evaluate_folder(best, str(data), device="cpu", workers=0, all_images=True)
    assert every["images"] == 33
    from seify.checkpoint import read_recipe
    from seify.images.scoring import name_digest
    recorded = set(read_recipe(best)["finetune"]["held_out"])
    gone = next(p for p in sorted(data.rglob("*.jpg")) if name_digest(data, str(p)) in recorded)
    gone.rename(gone.with_name("renamed.jpg"))  # a held-out image renamed: it is no longer known as held out
    assert evaluate_folder(best, str(data), device="cpu", workers=0)["images"] == held - 1


@pytest.mark.parametrize("top1,warned", [(25.0, True), (29.9, True), (40.0, False)])
def test_chance_is_within_five_points_of_one_over_the_classes(top1, warned):
    from seify.images.scoring import Scored
    scored = Scored(["a", "b", "c", "d"], None, "", [], [], 32, "--img-size")
    assert bool(scored.at_chance(top1)) == warned


def test_a_recipe_may_fold_only_what_is_a_gate(tmp_path):
    import json

    import timm
    from safetensors.torch import save_file

    import seify
    from conftest import weights
    from seify.checkpoint import read_recipe
    from seify.errors import SeifyError
    state = timm.create_model("mobilenetv3_small_050", num_classes=4).state_dict()
    state["blocks.2.1.se.conv_expand.weight"].zero_()  # a gate constant by its weights: fold takes it exactly
    net = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(net))
    fold("mobilenetv3_small_050", tmp_path / "f.safetensors", weights=str(net), latency=False)
    recipe = read_recipe(tmp_path / "f.safetensors")
    assert recipe["folded_native"] == ["blocks.2.1.se"]
    seify.load(tmp_path / "f.safetensors")  # as written, it loads
    for path in ("blocks.2.1.se.gate", "global_pool", "blocks.2.0.se.conv_reduce"):
        altered = tmp_path / "altered.safetensors"
        save_file(weights(tmp_path / "f.safetensors"), str(altered),
                  {"format": "pt", "seify": json.dumps({**recipe, "folded_native": ["blocks.2.1.se", path]})})
        with pytest.raises(SeifyError, match=f"names {path} as a folded gate of the network, and it is none"):
            seify.load(altered)


def test_a_model_made_from_a_folder_records_no_path_and_loads_after_the_folder_is_gone(tmp_path, cli):
    import json

    import timm
    from timm.models import save_for_hf

    import seify
    from conftest import realistic
    from seify.checkpoint import read_recipe
    folder = tmp_path / "alice" / "client-x" / "timm-folder"
    folder.mkdir(parents=True)
    net = realistic(timm.create_model("resnet10t", num_classes=4, drop_rate=0.25))  # model_args the card must keep
    save_for_hf(net, str(folder), model_args={"drop_rate": 0.25}, safe_serialization=True)
    code, _, err = cli("convert", f"local-dir:{folder}", "-o", tmp_path / "se.safetensors", "--input-size", "3,64,64")
    assert code == 0, err
    code, _, err = cli("export", tmp_path / "se.safetensors", "-o", tmp_path / "shared", "--format", "folder")
    assert code == 0, err
    recipe = read_recipe(tmp_path / "se.safetensors")
    assert recipe["model"] == "resnet10t" and recipe["model_args"]["drop_rate"] == 0.25
    for path in [tmp_path / "se.safetensors", *(tmp_path / "shared").iterdir()]:
        assert b"client-x" not in path.read_bytes(), path
    x = torch_input()
    before = seify.load(tmp_path / "se.safetensors")(x)
    shutil.rmtree(tmp_path / "alice")  # the folder it was made from is gone
    assert seify.load(tmp_path / "se.safetensors").drop_rate == 0.25
    assert (seify.load(tmp_path / "se.safetensors")(x) - before).abs().max() == 0
    assert (seify.load(f"local-dir:{tmp_path / 'shared'}")(x) - before).abs().max() == 0
    altered = json.loads(json.dumps(recipe))
    altered["model_args"] = {"no_such_argument": 1}
    from safetensors.torch import save_file

    from conftest import weights
    save_file(weights(tmp_path / "se.safetensors"), str(tmp_path / "bad.safetensors"),
              {"format": "pt", "seify": json.dumps(altered)})
    code, _, err = cli("profile", tmp_path / "bad.safetensors", "--no-latency")
    assert code == 2 and "arguments it does not take" in err and err.count("\n") == 1


def torch_input():
    import torch
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_a_timing_that_fails_is_said_and_the_fold_stands(tmp_path, se_file, monkeypatch):
    import seify.fold

    def refuses(models, size):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset version 18 is not supported")
    monkeypatch.setattr(seify.fold, "onnxruntime_ms", refuses)
    result = seify.fold.fold(se_file, tmp_path / "f.safetensors", latency=True)
    assert (tmp_path / "f.safetensors").exists() and result.latency["onnxruntime"] is None
    assert result.latency["eager"]["after"] > 0
    assert any("the onnxruntime timing failed (Exporting the operator" in n for n in result.notes)


def test_a_network_whose_own_gates_were_folded_converts_and_profiles(tmp_path, tiny, cli):
    import timm
    from safetensors.torch import save_file
    net = tmp_path / "vov.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("ese_vovnet19b_slim_dw", num_classes=4)
               .state_dict().items()}, str(net))
    fold("ese_vovnet19b_slim_dw", tmp_path / "f.safetensors", str(tiny), weights=str(net), max_gate_std=10.0,
         latency=False, img_size=32)
    code, _, err = cli("convert", tmp_path / "f.safetensors", "-o", tmp_path / "se.safetensors")
    assert code == 0, err  # SE takes the slots the folded gates left (each block's attn)
    code, out, err = cli("profile", tmp_path / "f.safetensors", "--no-latency")
    assert code == 0 and "stages.0.blocks.0.attn" in out, err


def test_gates_measured_on_one_image_are_refused(tmp_path, tiny, se_file, cli):
    one = tmp_path / "one"
    (one / "gradient").mkdir(parents=True)
    shutil.copy(next((tiny / "val" / "gradient").iterdir()), one / "gradient" / "a.jpg")
    run = finetune(se_file, str(tiny), config(tmp_path / "run", epochs=1))
    for args in (["fold", run.out / "best.safetensors", tiny, "--max-images", "1", "-o", tmp_path / "f.safetensors",
                  "--no-latency"],
                 ["analyze", se_file, one, "--out", tmp_path / "an"]):
        code, _, err = cli(*args)
        assert code == 2 and "measured on 1 image(s); at least 2 are needed" in err, (args, err)
    assert not (tmp_path / "f.safetensors").exists()


def test_fold_reports_the_spread_of_what_it_saved(se_file, tmp_path, cli):
    result = fold(se_file, tmp_path / "f.safetensors", latency=True)
    eager = result.latency["eager"]
    middle, low, high = eager["after_ratio"]
    assert low <= middle <= high and eager["repeats"] == 30
    code, out, err = cli("fold", se_file, "-o", tmp_path / "g.safetensors")
    assert code == 0 and "medians of 30 paired repeats, the middle half in brackets" in out, err
    assert out.count("% [") >= 2  # each saving with its spread


def test_a_killed_write_leaves_nothing_the_next_write_there_does_not_remove(tmp_path, se_file):
    import os
    import subprocess
    import sys
    import time

    from seify.writes import atomic_write
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended, as a killed export has
    target = tmp_path / "model.onnx"
    leftovers = [tmp_path / f".model.onnx.{pid}.abcd1234.tmp", tmp_path / f".model.onnx.{pid}.wxyz_789.old"]
    leftovers[0].write_bytes(b"x" * 1000)
    leftovers[1].mkdir()
    old_style = tmp_path / ".model.onnx.q1w2e3r4.tmp"  # named before seify recorded the process: old enough
    old_style.write_bytes(b"x")
    os.utime(old_style, (time.time() - 7200, time.time() - 7200))
    kept = [tmp_path / f".model.onnx.{os.getpid()}.abcd1234.tmp",  # a live process's: still writing
            tmp_path / ".other.onnx.12345.abcd1234.tmp", tmp_path / ".model.onnx.notes.tmp",
            tmp_path / ".model.onnx.a1b2c3d4.tmp"]  # an old-style name, but recent
    for path in kept:
        path.write_bytes(b"mine")
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"onnx"))
    assert target.read_bytes() == b"onnx"
    assert not any(p.exists() for p in [*leftovers, old_style]) and all(p.exists() for p in kept)


def test_a_file_fine_tuned_again_on_other_classes_loads(tmp_path, tiny, plain4):
    import seify
    from conftest import ARCH
    first = finetune(ARCH, str(tiny), config(tmp_path / "four", epochs=1), options=None, weights=plain4)
    two = tmp_path / "two"
    for name in ("gradient", "stripes_vertical"):
        shutil.copytree(tiny / "train" / name, two / name)
    again = finetune(str(first.out / "best.safetensors"), str(two), config(tmp_path / "two-run", epochs=1,
                                                                              val_split=0.25))
    model = seify.load(again.out / "best.safetensors")  # its recipe's parent has 4 classes, the file 2
    assert model.get_classifier().out_features == 2
