"""Paths no CPU test machine walks by itself, walked on the CPU: another GPU's device, a GPU that emulates bf16,
the CUDA generator during loading, 64-bit kernel indices, a branch scaled by a buffer."""
import os

import pytest
import torch
from torch import nn

import seify
from seify.device import native_bf16, synchronize


def test_bf16_is_chosen_only_where_the_gpu_computes_it(monkeypatch):
    from seify.finetune.build import precision
    from seify.finetune.config import FinetuneConfig
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # a T4: bf16 only by emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())
    chosen = precision(FinetuneConfig(), torch.device("cuda", 1))
    assert asked == [False] and chosen.name == "fp16" and chosen.scaler is not None
    assert not native_bf16("cpu") and precision(FinetuneConfig(), torch.device("cpu")).name == "fp32"


def test_the_device_measured_is_the_device_synchronized(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronize("cuda:1")
    synchronize("cpu")
    assert waited == [torch.device("cuda", 1)]
    from seify.timing import synchronizer
    synchronizer("cuda:1")()
    assert waited[-1] == torch.device("cuda", 1)


def test_loading_an_image_leaves_every_cuda_generator_alone(monkeypatch):
    from seify.images.folders import sample_draws
    seeded = []
    for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **k: seeded.append(name))
    before = torch.get_rng_state()
    with sample_draws(1234):
        first = torch.rand(3)
    with sample_draws(1234):
        assert torch.equal(torch.rand(3), first)  # the image's draws depend on its seed alone
    assert torch.equal(torch.get_rng_state(), before) and seeded == []


try:
    import triton
    import triton.language as tl

    from seify.kernels.index import offsets

    @triton.jit
    def _probe(out_ptr, sn, sc, BC: tl.constexpr, BHW: tl.constexpr):
        n = tl.program_id(0)
        c, hw = tl.arange(0, BC), tl.arange(0, BHW)
        tl.store(out_ptr + n * BC * BHW + c[:, None] * BHW + hw[None, :], offsets(n, c, hw, sn, sc, 1))
except ImportError:
    triton = None


@pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checked in Triton's CPU interpreter")
def test_kernel_offsets_are_64_bit():
    sample = 2**30 + 7  # a sample of a 64 x 2048 x 90 x 90 map: samples 2 and 3 start past 2**31
    out = torch.zeros(4, 2, 4, dtype=torch.int64)
    _probe[(4,)](out, sample, 8100, BC=2, BHW=4)
    expected = torch.arange(4)[:, None, None] * sample + torch.arange(2)[None, :, None] * 8100 + \
        torch.arange(4)[None, None, :]
    assert torch.equal(out, expected)


class ScaledBranch(nn.Module):
    """A residual block whose branch ends in a multiplication by a buffer (a fixed per-channel gain)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8)[None, :, None, None])

    def forward(self, x):
        return x + self.conv(x) * self.gain


def test_a_branch_scaled_by_a_buffer_is_not_foldable_and_still_converts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ScaledBranch()).eval()
    result = seify.convert(model, input_size=(3, 16, 16))
    assert len(result.sites) == 1 and result.max_abs_diff <= 1e-5
    assert result.sites[0].compensation in ("gate scaled x2",) or "folded into" in result.sites[0].compensation
    assert torch.equal(result.model.get_buffer("1.gain"), model.get_buffer("1.gain"))  # a buffer is never scaled


def test_scoring_a_huge_head_keeps_counts_not_a_matrix():
    from seify.images.scoring import evaluate
    classes = 21_841  # ImageNet-21k: a dense confusion matrix would be 3.8 GB of counts
    labels = torch.tensor([0, 5, 21_840, 7])
    logits = torch.full((4, classes), -1.0)
    logits[torch.arange(4), torch.tensor([0, 5, 3, 7])] = 1.0  # right on 3 of 4
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    report = evaluate(model, [(logits, labels, [])], torch.device("cpu"), classes)
    assert report["confusion"] is None and len(report["per_class"]) == classes
    assert report["top1"] == 75.0 and report["per_class"][21_840] == 0.0 and report["per_class"][5] == 100.0
    assert report["correct"] == [1, 1, 0, 1]
    small = evaluate(model, [(logits[:, :10], torch.tensor([0, 5, 3, 1]), [])], torch.device("cpu"), 10)
    assert small["confusion"][1][7] == 1 and sum(map(sum, small["confusion"])) == 4 and small["top1"] == 75.0


def test_synchronising_every_few_steps_trains_and_counts_the_same(tmp_path, tiny, se_file, monkeypatch):
    """What a GPU run does (loss and accuracy summed on the device, read every --log-every steps), on the CPU: the
    same weights and the same metrics as reading them every step; a non-finite loss is reported with its own step,
    not the step it was read at."""
    import seify.finetune.loop as loop
    from conftest import config, rows_of, weights
    every_step = tmp_path / "every"
    loop.finetune(se_file, str(tiny), config(every_step, log_every=3))
    monkeypatch.setattr(loop, "sync_interval", lambda training, config: config.log_every)
    batched = tmp_path / "batched"
    loop.finetune(se_file, str(tiny), config(batched, log_every=3))
    a, b = weights(every_step / "last.safetensors"), weights(batched / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [{k: v for k, v in r.items() if k not in ("seconds", "images_per_sec")} for r in rows_of(every_step)] == \
        [{k: v for k, v in r.items() if k not in ("seconds", "images_per_sec")} for r in rows_of(batched)]
    real, calls = loop.F.cross_entropy, []

    def blows_up_at_step_3(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(loop.F, "cross_entropy", blows_up_at_step_3)
    with pytest.raises(seify.SeifyError, match="loss became nan at epoch 1, step 3; stopped"):  # read at step 4
        loop.finetune(se_file, str(tiny), config(tmp_path / "nan", log_every=2))


def test_the_se_block_calls_its_layers_so_hooks_pruning_and_quantizers_see_them(se_file):
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    from torch.nn.utils import prune
    model = seify.load(se_file)
    block = next(m for m in model.modules() if isinstance(m, seify.SqueezeExcite))
    with torch.no_grad():
        block.fc2.weight.normal_()  # gates that depend on the input
    seen = []
    block.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = model(x)
    assert seen == [torch.Size([4, block.fc1.out_channels, 1, 1])]
    prune.l1_unstructured(block.fc2, "weight", amount=1.0)  # every weight masked: the gate is its bias again
    y = torch.randn(4, block.fc1.in_channels, 4, 4)
    assert torch.allclose(block(y), y * torch.sigmoid(block.fc2.bias)[:, None, None] * block.scale, atol=1e-6)
    prune.remove(block.fc2, "weight")
    with torch.no_grad():
        block.fc2.weight.normal_(generator=torch.Generator().manual_seed(1))
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization says it is deprecated in favour of torchao
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (x,))
        for k in range(4):
            prepared(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(k)))
        quantized = convert_fx(prepared)
    path = next(n for n, m in model.named_modules() if m is block)
    assert type(quantized.get_submodule(f"{path}.fc1")).__module__.startswith("torch.ao.nn.quantized")
    assert (quantized(x) - reference).abs().max() < 0.15 * reference.abs().max()


def test_each_output_is_checked_against_its_own_scale():
    from seify.equivalence import difference
    expected = {"boxes": torch.tensor([[120.0, 40.0, 300.0, 210.0]]), "scores": torch.tensor([0.90])}
    got = {"boxes": expected["boxes"].clone(), "scores": torch.tensor([0.905])}  # a score off by 0.005
    checked = difference(expected, got)
    assert not checked.agrees and checked.scale == pytest.approx(0.9)  # not hidden under the boxes' 300
    assert difference(expected, {k: v.clone() for k, v in expected.items()}).agrees


def test_response_normalisation_is_not_a_gate_for_convert_nor_for_the_gates_room():
    import timm

    from seify.gates import find_gates
    model = timm.create_model("convnextv2_atto")
    assert find_gates(model) == {}  # analyze, fold and profile: no channel gates, "convert it first"
    result = seify.convert(model, input_size=(3, 64, 64))  # and convert does: SE goes in beside the GRN
    assert len(result.sites) == 12 and not result.skipped and result.max_abs_diff <= 1e-5
    assert set(find_gates(result.model)) == {s.path for s in result.sites}


class UntraceableGate(nn.Module):
    """An SE-style gate whose forward branches on its input's values: torch.fx cannot trace it."""

    def __init__(self, channels=8):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc(self.pool(x)))
        return x * s if s.mean() > 0 else x


def test_a_module_that_cannot_be_traced_is_reported_not_taken_for_no_gate():
    from seify.gates import find_gates
    model = nn.Sequential(nn.Conv2d(3, 8, 3), UntraceableGate())
    found = find_gates(model)
    assert found == {} and found.untraced == ["1"]
    assert "1 module(s) could not be traced to tell whether they are channel gates (e.g. 1)" in found.note()[0]
    assert find_gates(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())).note() == []


def test_running_out_of_device_memory_says_what_to_lower(cli, monkeypatch):
    import seify.api

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(seify.api, "convert", out_of_memory)
    code, _, err = cli("convert", "resnet18", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "lower --batch-size" in err and "seify bug" not in err


def test_a_fault_inside_counting_is_a_bug_not_a_wrong_input_size(monkeypatch):
    import seify.counting
    from seify.errors import SeifyError
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(SeifyError, match="cannot take an input of 3x2x2"):
        seify.counting.count_macs(model, (3, 2, 2))  # the user's size: smaller than the kernel
    monkeypatch.setattr(torch.Tensor, "numel", lambda self: (_ for _ in ()).throw(RuntimeError("an internal slip")))
    with pytest.raises(RuntimeError, match="an internal slip"):
        seify.counting.count_macs(model, (3, 8, 8))
