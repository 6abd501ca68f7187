"""The Triton SE kernels, run on CPU by Triton's interpreter, against the PyTorch path of the same block."""
import os

import pytest
import torch
from timm.layers import DropPath

from seify import kernels
from seify.se import SqueezeExcite

pytest.importorskip("triton")

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture
def triton_on():
    # conftest sets TRITON_INTERPRET=1 before Triton is imported
    if os.environ.get("TRITON_INTERPRET") != "1" or not kernels.use(True):
        pytest.skip("the Triton interpreter is not on in this process")
    yield
    kernels.use(False)


def block(channels, squeeze, gate, dtype=torch.float32):
    torch.manual_seed(0)
    se = SqueezeExcite(channels, 8, squeeze=squeeze, gate=gate, scale=2.0 if gate == "sigmoid" else 1.0)
    for p in se.parameters():  # a trained-looking block: the gate is not the identity's constant 0.5
        torch.nn.init.normal_(p, std=0.3)
    return se.to(dtype)


def run_both(se, x, shortcut=None, drop_path=None, seed=0):
    """Output and gradients (x, shortcut, every parameter) on the Triton path and on the PyTorch path."""
    results = []
    for active in (True, False):
        kernels.use(active)
        torch.manual_seed(seed)
        xi = x.detach().clone().requires_grad_()
        si = None if shortcut is None else shortcut.detach().clone().requires_grad_()
        factor = drop_path(x.new_ones((x.shape[0], 1, 1, 1))) if drop_path is not None else None
        out = se(xi, si, factor)
        se.zero_grad()
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        grads = [xi.grad, None if si is None else si.grad, *(p.grad.clone() for p in se.parameters())]
        results.append((out, grads))
    kernels.use(True)
    return results


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("squeeze", ["avg", "max"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard-sigmoid"])
@pytest.mark.parametrize("with_shortcut", [True, False])
def test_forward_and_backward_match_pytorch(triton_on, fmt, squeeze, gate, with_shortcut):
    # C = 40 and H*W = 63 are not multiples of the 32 x 64 tiles; batch 1 has a single sample
    x = torch.randn(1, 40, 7, 9).contiguous(memory_format=FORMATS[fmt])
    shortcut = torch.randn(1, 40, 7, 9) if with_shortcut else None
    se = block(40, squeeze, gate)
    (out, grads), (ref, ref_grads) = run_both(se, x, shortcut)
    assert out.is_contiguous(memory_format=FORMATS[fmt])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_eight_channels_and_a_map_smaller_than_a_tile(triton_on):
    x, shortcut = torch.randn(3, 8, 3, 5), torch.randn(3, 8, 3, 5)
    (out, grads), (ref, ref_grads) = run_both(block(8, "avg", "sigmoid"), x, shortcut)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("squeeze", ["avg", "max"])
def test_float64_gradcheck_with_a_drop_path_factor(triton_on, squeeze):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64, requires_grad=True)
    shortcut = torch.randn(2, 8, 5, 3, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in ((4, 8), (4,), (8, 4), (8,))]
    factor = torch.tensor([0.0, 2.0], dtype=torch.float64)  # drop-path: one sample dropped, one scaled by 1/keep

    def site(x, shortcut, *weights):
        return kernels.squeeze_excite(x, *weights, shortcut, factor, 2.0, squeeze, "sigmoid")

    # fast mode checks random projections of the Jacobian: each perturbation is a run of the interpreted kernels
    assert torch.autograd.gradcheck(site, (x, shortcut, *weights), fast_mode=True)
    reference = shortcut + x * factor[:, None, None, None] * 2.0 * torch.sigmoid(
        torch.relu((x.mean((2, 3)) if squeeze == "avg" else x.amax((2, 3))) @ weights[0].T + weights[1])
        @ weights[2].T + weights[3])[:, :, None, None]
    torch.testing.assert_close(site(x, shortcut, *weights), reference)


def test_drop_path_in_training_draws_the_same_samples(triton_on):
    x, shortcut = torch.randn(8, 16, 6, 6), torch.randn(8, 16, 6, 6)
    drop_path = DropPath(0.5).train()
    (out, grads), (ref, ref_grads) = run_both(block(16, "avg", "sigmoid"), x, shortcut, drop_path, seed=3)
    dropped = (out - shortcut).flatten(1).abs().amax(1) == 0
    assert 0 < int(dropped.sum()) < 8  # some samples dropped, some kept: the factor really varies per sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_maps_accumulate_in_float32(triton_on, dtype):
    x = (torch.randn(2, 32, 9, 9) + 3).to(dtype)  # a large mean: a half-precision running sum would drift
    shortcut = torch.randn(2, 32, 9, 9).to(dtype)
    se = block(32, "avg", "sigmoid")
    kernels.use(True)
    out = se(x, shortcut)
    assert out.dtype == dtype
    kernels.use(False)
    exact = se(x.float(), shortcut.float())
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), exact, atol=tolerance, rtol=tolerance)


def test_a_converted_model_trains_the_same_and_keeps_its_state_dict(triton_on, monkeypatch):
    import timm

    from seify.surgery import SEOptions
    from seify.surgery import add_se as convert
    torch.manual_seed(0)
    model = convert(timm.create_model("test_resnet", num_classes=4), SEOptions(init="paper"), (3, 32, 32)).model
    model.train()
    images = torch.randn(4, 3, 32, 32)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fused_calls = []
    apply = kernels._SEFunction.apply
    monkeypatch.setattr(kernels._SEFunction, "apply", lambda *args: fused_calls.append(1) or apply(*args))
    runs = []
    for active in (True, False):
        kernels.use(active)
        torch.manual_seed(0)
        model.zero_grad()
        loss = model(images).logsumexp(1).mean()
        loss.backward()
        runs.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = runs
    assert len(fused_calls) == 4  # each of test_resnet's four SE sites took the Triton path once
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(".se." in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_compiles_as_one_graph(triton_on):
    se = block(16, "avg", "sigmoid")
    x, shortcut = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    compiled = torch.compile(se, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled(x, shortcut), se(x, shortcut))
    kernels.use(False)
    torch.testing.assert_close(compiled(x, shortcut), se(x, shortcut))


def test_off_by_default_and_never_on_cpu_tensors_without_the_interpreter(monkeypatch):
    assert not kernels.usable_for(torch.randn(1, 8, 2, 2))  # tests run without SEIFY_KERNELS
    monkeypatch.setattr(kernels, "_ACTIVE", True)
    monkeypatch.setattr(kernels, "_INTERPRETED", False)
    assert not kernels.usable_for(torch.randn(1, 8, 2, 2))
    assert not kernels.usable_for(torch.randn(8, 2))
