"""seify compare: arms parsed as written, paired verdicts, files on disk, and a comparison that survives a kill."""
import csv
import json
import statistics
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import ARCH, rows_of
from seify.compare import Arm, _verdict, parse_arms
from seify.errors import SeifyError
from seify.options import SEOptions


def test_arms_are_parsed_as_written():
    arms = parse_arms("plain,se,se:reduction=8,se:stages=4,5,se:variant=pre:squeeze=max")
    assert [a.name for a in arms] == ["plain", "se", "se:reduction=8", "se:stages=4,5", "se:variant=pre:squeeze=max"]
    assert arms[0].options is None and arms[1].options == SEOptions()
    assert arms[2].options.reduction == 8 and arms[3].options.stages == (4, 5)
    assert (arms[4].options.variant, arms[4].options.squeeze) == ("pre", "max")
    assert len({a.folder for a in arms}) == 5 and all("/" not in a.folder and ":" not in a.folder for a in arms)
    for bad, message in (("plain", "at least two arms"), ("se,se", "names an arm twice"), ("plain,vgg", "not an arm"),
                         ("plain,se:ratio=8", "not an SE option"), ("plain,se:reduction=x", "reduction must be")):
        with pytest.raises(SeifyError, match=message):
            parse_arms(bad)


def _arm(name, finals, rate):
    return {"name": name, "images_per_sec": rate,
            "runs": [{"seed": s, "final_top1": f, "complete": True} for s, f in enumerate(finals)]}


def test_verdict_pairs_seeds():
    se, plain = _arm("se", [91.0, 92.5, 90.0], 80.0), _arm("plain", [90.0, 92.0, 90.5], 100.0)
    v = _verdict(se, plain)
    diffs = [1.0, 0.5, -0.5]
    assert v["differences"] == diffs and v["higher_in"] == 2
    assert v["mean_difference"] == pytest.approx(statistics.fmean(diffs))
    assert v["std_difference"] == pytest.approx(statistics.stdev(diffs))
    assert v["step_time_ratio"] == pytest.approx(1.25)
    assert v["text"] == "se: +0.3 +/- 0.8 points over plain (higher in 2 of 3 seeds); 1.25x step time"
    assert v["paired_test"] is None  # these runs recorded no per-image predictions
    unfinished = _arm("se", [91.0], 80.0)
    unfinished["runs"][0]["complete"] = False
    assert "no seed finished in both" in _verdict(unfinished, plain)["text"]


@pytest.mark.slow
def test_compare_writes_its_files_and_resumes_after_a_kill(tmp_path, tiny, plain4):
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "seify", "compare", ARCH, str(tiny), "--weights", plain4, "--arms",
            "plain,se", "--seeds", "2", "--epochs", "1", "--save-every", "2", "--batch-size", "8", "--img-size", "32",
            "--workers", "0", "--threads", "1", "--log-every", "0", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "se" / "seed-0" / "checkpoint.json"  # seed 0 runs plain, then se: killed after its step 2
    deadline = time.time() + 300
    while not second.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert second.exists() and not (out / "compare.json").exists()
    finished = (out / "plain" / "seed-0" / "checkpoint.json").read_text()
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"the run in {out / 'plain' / 'seed-0'} is complete" in run.stdout  # skipped, not trained again
    assert (out / "plain" / "seed-0" / "checkpoint.json").read_text() == finished
    assert f"resuming {out / 'se' / 'seed-0'}" in run.stdout
    assert "se: " in run.stdout and "points over plain" in run.stdout
    assert "step time not comparable" in run.stdout  # one epoch: se warmed up its blocks, plain trained all
    document = json.loads((out / "compare.json").read_text())
    assert [a["name"] for a in document["arms"]] == ["plain", "se"]
    for arm in document["arms"]:
        assert [r["seed"] for r in arm["runs"]] == [0, 1] and all(r["complete"] for r in arm["runs"])
        for r in arm["runs"]:  # every figure read back from the run folder itself
            rows = rows_of(out / arm["folder"] / f"seed-{r['seed']}")
            assert [x["epoch"] for x in rows] == [1]
            assert r["final_top1"] == rows[-1]["val_top1"] and r["best_top1"] == max(x["val_top1"] for x in rows)
        assert arm["final_top1"]["mean"] == pytest.approx(statistics.fmean(r["final_top1"] for r in arm["runs"]))
    plain, se = document["arms"]
    import timm
    base = timm.create_model(ARCH, num_classes=4)
    assert plain["added_params"] == 0 and se["base_params"] == plain["params"] == sum(p.numel() for p in
                                                                                    base.parameters())
    channels = [getattr(block, "conv3", block.conv2).out_channels for layer in (base.layer1, base.layer2,
                base.layer3, base.layer4) for block in layer]  # Eqn. 5 with biases, timm's rounding, one per unit
    reduced = [timm.layers.make_divisible(c / 16, 8, round_limit=0) for c in channels]
    assert se["added_params"] == sum(2 * c * r + r + c for c, r in zip(channels, reduced, strict=True))
    verdict = document["verdicts"][0]
    pairs = zip(se["runs"], plain["runs"], strict=True)
    assert verdict["differences"] == [s["final_top1"] - p["final_top1"] for s, p in pairs]
    table = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["arm"], r["seed"]) for r in table] == [("plain", "0"), ("plain", "1"), ("se", "0"), ("se", "1")]
    assert Image.open(out / "compare.png").size[0] > 1000
    again = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["verdicts"] == document["verdicts"]


def test_arm_folders_do_not_collide():
    assert Arm("se:stages=4,5", SEOptions(stages=(4, 5))).folder == "se_stages=4-5"


def test_one_epoch_compare_rows_threads_and_step_time(tmp_path, tiny, plain4, monkeypatch):
    """--epochs 1: the SE arm only warms up its new blocks where plain trains everything, so their step times are
    not compared; every CSV row holds its own run's numbers; both arms run with one thread count."""
    from conftest import config
    from seify.compare import compare
    from seify.finetune import dist
    from seify.finetune.progress import SilentLog
    monkeypatch.setattr(dist, "usable_cores", lambda: 2)
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 0.0)
    out = tmp_path / "cmp"
    document = compare(ARCH, str(tiny), parse_arms("plain,se"), config(out, epochs=1, threads=None), seeds=2,
                       weights=plain4, log=SilentLog, say=lambda text: None)
    verdict = document["verdicts"][0]
    assert verdict["step_time_ratio"] is None and "step time not comparable" in verdict["text"]
    assert [r["phase"] for r in rows_of(out / "se" / "seed-0")] == ["warmup"]
    threads = {json.loads((out / a / f"seed-{s}" / "run.json").read_text())["threads"]
               for a in ("plain", "se") for s in (0, 1)}
    assert threads == {2}
    table = list(csv.DictReader((out / "compare.csv").open()))
    assert len(table) == 4
    for row in table:
        rows = rows_of(out / row["arm"] / f"seed-{row['seed']}")
        assert float(row["final_top1"]) == rows[-1]["val_top1"] and float(row["best_top1"]) == max(
            r["val_top1"] for r in rows)
        assert float(row["seconds"]) == pytest.approx(sum(r["seconds"] for r in rows))
        assert row["folder"] == str(out / row["arm"] / f"seed-{row['seed']}")
        assert (row["images_per_sec"] == "") == (row["arm"] == "se")  # no epoch that trains every layer
    # the paired test counts what the runs' final models got right on the same images, read back here on our own
    import seify
    from seify.checkpoint import read_recipe
    from seify.images import folders as fdata
    _, _, val = fdata.discover(tiny)
    transform = fdata.transforms(read_recipe(out / "plain" / "seed-0" / "last.safetensors")["data_config"], None)
    x = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in val.items])
    labels = torch.tensor([label for _, label in val.items])

    def right(arm, seed):
        with torch.no_grad():
            return seify.load(out / arm / f"seed-{seed}" / "last.safetensors")(x).argmax(1) == labels
    differences = torch.zeros(len(labels), dtype=torch.long)
    for seed, counted in zip((0, 1), verdict["paired_test"]["per_seed"], strict=True):
        p_right, s_right = right("plain", seed), right("se", seed)
        assert counted["only_reference"] == int((p_right & ~s_right).sum())
        assert counted["only_arm"] == int((s_right & ~p_right).sum())
        differences += s_right.long() - p_right.long()
    from seify.paired import per_image_test
    pooled = verdict["paired_test"]["pooled"]
    assert (pooled["reference_ahead"], pooled["arm_ahead"]) == (int((differences < 0).sum()),
                                                                int((differences > 0).sum()))
    assert pooled["p_value"] == pytest.approx(per_image_test(differences.tolist()))
    monkeypatch.setattr(dist, "busy_cores", lambda seconds=0.25: 1.6)  # a rerun under load keeps the count
    from seify.compare import _threads
    assert _threads(out, parse_arms("plain,se"), [0, 1], config(out, threads=None)) == 2


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images():
    from seify.paired import mcnemar
    # 2 images only plain got right, 8 only se: P(X <= 2 | n=10, 1/2) = (1 + 10 + 45) / 1024, doubled
    assert mcnemar(2, 8) == pytest.approx(2 * 56 / 1024) == mcnemar(8, 2)
    assert mcnemar(0, 0) == 1.0 and mcnemar(5, 5) == 1.0
    assert mcnemar(0, 12) == pytest.approx(2 / 4096)


def test_the_verdict_says_better_only_when_the_test_can_tell():
    def arm(name, correct_by_seed):
        return {"name": name, "images_per_sec": 10.0,
                "runs": [{"seed": s, "final_top1": 100.0 * sum(c) / len(c), "complete": True, "val_correct": c}
                         for s, c in enumerate(correct_by_seed)]}
    plain = arm("plain", [[1] * 50 + [0] * 50, [1] * 50 + [0] * 50])
    close = arm("se", [[1] * 52 + [0] * 48, [1] * 49 + [0] * 51])
    v = _verdict(close, plain)
    # per image, se's correct count over the 2 seeds minus plain's: image 49 -1 (seed 1), images 50-51 +1 (seed 0)
    assert v["paired_test"]["pooled"] == {"images": 100, "reference_ahead": 1, "arm_ahead": 2,
                                          "p_value": pytest.approx(1.0)}
    assert "cannot tell them apart" in v["text"] and "better" not in v["text"] and "worse" not in v["text"]
    assert [s["only_arm"] for s in v["paired_test"]["per_seed"]] == [2, 0]
    far = arm("se", [[1] * 70 + [0] * 30, [1] * 75 + [0] * 25])
    v = _verdict(far, plain)
    assert v["paired_test"]["pooled"]["arm_ahead"] == 25 and v["paired_test"]["pooled"]["p_value"] < 1e-6
    assert "se is better" in v["text"]


def test_the_per_image_test_is_exact():
    from itertools import product

    from seify.paired import mcnemar, per_image_test
    assert per_image_test([0, 0]) == 1.0
    for b, c in ((2, 8), (0, 12), (5, 5), (30, 45)):  # one seed: McNemar's exact test
        assert per_image_test([-1] * b + [1] * c + [0] * 7) == pytest.approx(mcnemar(b, c), rel=1e-9)
    d = [2, 2, 1, -1, 3, 2]  # by enumeration of every sign assignment
    sums = [sum(s * abs(x) for s, x in zip(signs, d, strict=True)) for signs in product((-1, 1), repeat=len(d))]
    assert per_image_test(d) == pytest.approx(sum(abs(t) >= abs(sum(d)) for t in sums) / len(sums))


def _simulate_null(rng, images=150, seeds=3, sticky=0.8):
    """Two arms that differ only by seed. Fine-tuned from one checkpoint, an arm's models tend to get the same
    images right or wrong: each arm draws its own per-image tendency once (from the same distribution for both),
    and each seed follows it with probability ``sticky``."""
    import numpy
    difficulty = rng.uniform(0.5, 0.95, images)

    def arm():
        tendency = rng.random(images) < difficulty
        return [numpy.where(rng.random(images) < sticky, tendency, rng.random(images) < difficulty).astype(int)
                .tolist() for _ in range(seeds)]
    return arm(), arm()


def test_arms_that_differ_only_by_seed_are_called_different_about_5_percent_of_the_time():
    import numpy

    from seify.compare import _paired, mcnemar
    rng = numpy.random.default_rng(0)
    trials, rejected, pooled_mcnemar = 400, 0, 0
    for _ in range(trials):
        reference, other = _simulate_null(rng)
        runs = [{"name": n, "runs": [{"seed": s, "val_correct": c} for s, c in enumerate(arm)]}
                for n, arm in (("plain", reference), ("se", other))]
        paired = _paired(runs[1], runs[0], [0, 1, 2])
        rejected += paired["pooled"]["p_value"] < 0.05
        b, c = (sum(s[k] for s in paired["per_seed"]) for k in ("only_reference", "only_arm"))
        pooled_mcnemar += mcnemar(b, c) < 0.05  # the old pooling: an image counted once per seed
    assert rejected / trials <= 0.075  # about 5% (an exact test on discrete counts is at most its level)
    assert pooled_mcnemar / trials > 0.10  # (16% here) what counting each image once per seed claimed


def test_paper_presets_expand_to_the_papers_arms():
    from seify.paper import TABLES
    assert [a.name for a in parse_arms("paper:reduction")] == [
        "se:reduction=2", "se:reduction=4", "se:reduction=8", "se", "se:reduction=32", "plain"]
    assert [a.options.reduction for a in parse_arms("paper:reduction")[:5]] == [2, 4, 8, 16, 32]
    assert [a.options.squeeze for a in parse_arms("paper:squeeze")] == ["max", "avg"]
    assert [a.options.gate for a in parse_arms("paper:gate")] == ["relu", "tanh", "sigmoid"]
    assert [a.options.stages if a.options else "plain" for a in parse_arms("paper:stages")] == [
        "plain", (2,), (3,), (4,), None]
    assert [a.options.variant for a in parse_arms("paper:integration")] == ["standard", "pre", "post", "identity"]
    assert [a.options.variant for a in parse_arms("paper:3x3")] == ["standard", "3x3"]
    assert [a.name for a in parse_arms("paper:squeeze,se:gate=tanh")] == ["se:squeeze=max", "se", "se:gate=tanh"]
    assert TABLES["reduction"].arms[0].top1_error == 22.29 and TABLES["gate"].arms[1].top5_error == 6.38
    with pytest.raises(SeifyError, match="not one of the paper's tables"):
        parse_arms("paper:dropout")


def test_a_3x3_arm_that_is_the_standard_arm_is_left_out():
    from seify.compare import _without_twins
    from seify.models import resolve
    arms, notes = _without_twins(resolve("resnet18", device="meta"), parse_arms("paper:3x3"), (3, 32, 32))
    assert [a.name for a in arms] == ["se"] and "the two arms would be the same model" in notes[0]
    arms, notes = _without_twins(resolve("resnet50", device="meta"), parse_arms("paper:3x3"),
                                 (3, 32, 32))  # a bottleneck's 3x3 is inside
    assert [a.name for a in arms] == ["se", "se:variant=3x3"] and notes == []
