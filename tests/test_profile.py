"""seify profile: every number checked against an independent count."""
import csv
import io
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import seify
from conftest import STAGES, analytic_added
from seify.profile import profile
from seify.surgery import SEOptions

SIZE = (3, 64, 64)


def flop_counter_macs(model, size):
    """torch's own count (conv and matmul only), as MACs."""
    x = torch.zeros(1, *size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2


def test_resnet50_numbers():
    report = profile("resnet50", latency=False).to_dict()
    assert report["input_size"] == [3, 224, 224]
    assert (report["base"]["params"], report["se"]["params"]) == (25_557_032, 28_088_024)
    assert report["added_params"] == analytic_added()
    assert report["added_params_percent"] == pytest.approx(9.90, abs=5e-3)
    import timm
    with torch.device("meta"):
        base = timm.create_model("resnet50")
    assert report["base"]["macs"] == report["base"]["conv_linear_macs"] == flop_counter_macs(base, (3, 224, 224))
    assert round(report["base"]["macs"] / 1e9, 3) == 4.089  # torchvision states 4.09 GFLOPS
    # SE per block: excitation 2*C*C/16, squeeze and scale one MAC per element each.
    side = {256: 56, 512: 28, 1024: 14, 2048: 7}
    analytic = sum(n * (2 * c * (c // 16) + 2 * c * side[c] ** 2) for n, c in STAGES)
    assert analytic == 13_553_664 == report["added_macs"]
    assert report["added_macs_percent"] == pytest.approx(0.33, abs=5e-3)
    assert report["se"]["conv_linear_macs"] - report["base"]["conv_linear_macs"] == 2_514_944
    assert sum(s["macs"] for s in report["sites"]) == report["added_macs"]
    assert report["sites"][0]["height"] == 56 and report["sites"][-1]["height"] == 7


# Each kind of layer the counter has to see through, once: grouped (resnext) and depthwise (mobilenet)
# convolutions, concatenations (densenet), linear layers on channels-last maps (convnext), channel shuffles and
# torchvision's builders. Plain ResNets are counted analytically above.
COUNTED = ["resnext26ts", "densenet121", "mobilenetv2_100", "convnext_atto", "torchvision:shufflenet_v2_x0_5",
           "torchvision:regnet_x_400mf"]


@pytest.mark.parametrize("spec", COUNTED)
def test_counts_match_the_real_converted_model(spec):
    result = seify.convert(spec, input_size=SIZE)
    report = profile(spec, latency=False, input_size=SIZE).to_dict()
    assert report["se"]["params"] == sum(p.numel() for p in result.model.parameters())
    assert report["base"]["params"] == sum(p.numel() for p in result.source.model.parameters())
    assert report["se"]["conv_linear_macs"] == flop_counter_macs(result.model, SIZE)
    assert report["base"]["conv_linear_macs"] == flop_counter_macs(result.source.model, SIZE)


def test_seify_file_against_its_base(tmp_path):
    result = seify.convert("resnet18", SEOptions(stages=(4, 5)), input_size=SIZE)
    path = seify.save(result, tmp_path / "r18.safetensors")
    report = profile(str(path), latency=False).to_dict()
    assert report["base"]["params"] == result.base_params
    assert report["added_params"] == result.added_params
    assert [s["path"] for s in report["sites"]] == [s.path for s in result.sites]
    assert report["placement"] == result.placement == "residual"  # recorded in the file, as convert reports it


def test_latency_is_measured_interleaved(monkeypatch):
    import seify.profile
    import seify.timing
    calls = []
    real = seify.timing.inference

    def recorded(model, x):
        step = real(model, x)
        return lambda: (calls.append(id(model)), step())[1]
    monkeypatch.setattr(seify.profile, "inference", recorded)
    report = profile("resnet18", input_size=SIZE, batch_sizes=(1, 2), device="cpu", repeats=2, warmup=1).to_dict()
    base, se = calls[0], calls[1]
    assert base != se and calls[:6] == [base, se] + [base, se] + [se, base]  # warm-up, then in turns, alternating
    assert calls[6:] == calls[:6]  # batch 2 alike
    assert report["device"].startswith("cpu")
    assert [t["batch_size"] for t in report["timings"]] == [1, 2]
    for t in report["timings"]:
        assert t["infer_base_ms"] > 0 and t["train_se_ms"] > 0
        assert t["infer_ratio"] == pytest.approx(t["infer_se_ms"] / t["infer_base_ms"], rel=1e-3)
        assert t["peak_memory_base"] is None  # measured on CUDA only


def test_comparison_table_json_and_csv(cli):
    code, out, _ = cli("profile", "resnet18", "torchvision:mobilenet_v2", "--no-latency", "--input-size", "3,64,64")
    assert code == 0 and "Base vs SE" in out and "torchvision:mobilenet_v2" in out
    code, out, _ = cli("profile", "resnet18", "resnet34", "--no-latency", "--input-size", "3,64,64", "--json")
    assert code == 0 and [m["model"] for m in json.loads(out)["models"]] == ["resnet18", "resnet34"]
    assert [m["placement"] for m in json.loads(out)["models"]] == ["residual", "residual"]
    code, out, _ = cli("profile", "resnet18", "--input-size", "3,64,64", "--csv", "--repeats", "1", "--warmup", "0",
                       "--device", "cpu", "--batch-size", "1,2")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["batch_size"] for r in rows] == ["1", "2"] and rows[0]["params_se"] == "11779624"


@pytest.mark.parametrize("args,message", [
    (["profile", "resnt50"], "unknown model"),
    (["profile", "vgg16_bn", "--input-size", "3,7,7", "--no-latency"], "cannot take an input of 3x7x7"),
    (["profile", "vit_tiny_patch16_224", "--no-latency"], "nothing to convert"),
    (["profile", "resnet18", "--device", "tpu"], "--device tpu"),
])
def test_bad_input(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_one_line(cli):
    code, _, err = cli("profile", "resnet18", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


PEAK_RSS = """
import runpy, sys
sys.argv = ["seify", "profile", "convnext_xlarge", "--no-latency", "--json"]
try:
    runpy.run_module("seify", run_name="__main__")
finally:  # VmHWM: this process's own peak (ru_maxrss would include the forked pytest's pages)
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0], file=sys.stderr)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_huge_model_is_counted_without_allocating_weights():
    run = subprocess.run([sys.executable, "-c", PEAK_RSS], capture_output=True, text=True)
    assert json.loads(run.stdout)["base"]["params"] == 350_196_968  # 1.4 GB of fp32 weights
    peak_kb = int(run.stderr.split("VmHWM:")[1].split()[0])
    assert peak_kb < 1.5 * 1024 * 1024


def test_a_model_that_cannot_train_at_batch_1_is_timed_for_inference(cli):
    code, out, err = cli("profile", "resnet18", "--input-size", "3,32,32", "--device", "cpu", "--repeats", "1",
                         "--warmup", "0", "--json")
    assert code == 0, err
    timing = json.loads(out)["timings"][0]
    assert timing["infer_ratio"] > 0 and timing["train_ratio"] is None and timing["train_base_ms"] is None
    code, out, err = cli("profile", "resnet18", "--input-size", "3,32,32", "--device", "cpu", "--repeats", "1",
                         "--warmup", "0")
    assert code == 0 and "BatchNorm needs a batch of 2 here" in out
