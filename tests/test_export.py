"""seify export: ONNX, torch.export, timm and hub folders, each read back by its own runtime and compared with
the model it came from."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import seify
from conftest import realistic
from seify.errors import SeifyError
from seify.export import export
from seify.options import SEOptions
from seify.surgery import add_se

ort = pytest.importorskip("onnxruntime")


def _x(batch, size):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _leaves(out):
    return torch.utils._pytree.tree_leaves(out)


def _close(got, expected):
    """Within a ten-thousandth of the outputs' magnitude: fp32 kernels sum in their own order."""
    assert got.shape == expected.shape
    return (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def _onnx_matches(path, model, size, batches=(1, 4)):
    """The file in onnxruntime, on batch sizes it was not exported at, against the model in PyTorch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in batches:
        x = _x(batch, size)
        with torch.no_grad():
            expected = _leaves(model(x))
        got = session.run(None, {name: x.numpy()})
        assert len(got) == len(expected)
        for e, g in zip(expected, got, strict=True):
            assert _close(torch.from_numpy(g), e)


def _pt2_matches(path, model, size):
    program = torch.export.load(str(path)).module()
    for batch in (1, 4):
        x = _x(batch, size)
        with torch.no_grad():
            for e, g in zip(_leaves(model(x)), _leaves(program(x)), strict=True):
                assert _close(g, e)


def _small_vgg():
    """VGG-11's layout at a tenth of its width, with a small head: the activation placement, quick to export."""
    features = torchvision.models.vgg.make_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M"])
    model = torchvision.models.vgg.VGG(features, num_classes=5)
    model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    return realistic(model)


def test_a_converted_resnet_exports_to_onnx_and_pt2(tmp_path, se_file):
    model = seify.load(se_file)
    result = export(se_file, tmp_path / "r.onnx")
    assert result.details["exporter"] == "dynamo" and result.details["dynamic"] == ["batch"]
    assert result.max_abs_diff <= result.tolerance and result.inputs == [[1, 3, 32, 32], [3, 3, 32, 32]]
    _onnx_matches(tmp_path / "r.onnx", model, 32)
    export(se_file, tmp_path / "r.pt2", "pt2")
    _pt2_matches(tmp_path / "r.pt2", model, 32)
    sized = export(se_file, tmp_path / "sized.onnx", dynamic_size=True)
    assert sized.details["dynamic"] == ["batch", "height", "width"] and [2, 3, 64, 64] in sized.inputs
    session = ort.InferenceSession(str(tmp_path / "sized.onnx"), providers=["CPUExecutionProvider"])
    x = _x(2, 48)
    with torch.no_grad():
        assert _close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vgg", "googlenet", "detector"])
def test_activation_module_and_detector_placements_export(tmp_path, case):
    if case == "vgg":
        base, options, size = _small_vgg(), SEOptions(at="activation"), 32
    elif case == "googlenet":
        base = realistic(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False))
        options, size = SEOptions(), 96
    else:
        base = realistic(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
        options, size = SEOptions(), 64
    conversion = add_se(base, options, (3, size, size))
    assert conversion.placement == {"vgg": "activation", "googlenet": "module", "detector": "residual"}[case]
    model = conversion.model.backbone.body if case == "detector" else conversion.model
    onnx = export(conversion.model, tmp_path / "m.onnx", input_size=(3, size, size), legacy=True)
    assert any("backbone" in note for note in onnx.notes) == (case == "detector")
    _onnx_matches(tmp_path / "m.onnx", model, size)
    export(conversion.model, tmp_path / "m.pt2", "pt2", input_size=(3, size, size))
    _pt2_matches(tmp_path / "m.pt2", model, size)


NO_SEIFY = """
import sys
sys.modules["seify"] = None  # any import of seify fails here
import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save({"out": model(x), "cfg": timm.data.resolve_data_config({}, model=model)}, sys.argv[2])
"""


def test_a_timm_folder_loads_without_seify(tmp_path, tiny):
    from conftest import ARCH, config
    from seify.finetune.loop import finetune
    from seify.finetune.progress import SilentLog
    run = finetune(ARCH, str(tiny), config(tmp_path / "run", epochs=1), log=SilentLog).out
    result = export(str(run / "best.safetensors"), tmp_path / "timm", "timm")
    assert result.details["architecture"] == ARCH and result.details["model_args"] == {
        "block_args": {"attn_layer": "se"}}
    config_json = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config_json["num_classes"] == 4 and config_json["label_names"] == seify.load(
        run / "best.safetensors").pretrained_cfg["label_names"]
    assert config_json["pretrained_cfg"]["input_size"] == [3, 32, 32]
    subprocess.run([sys.executable, "-c", NO_SEIFY, str(tmp_path / "timm"), str(tmp_path / "out.pt")], check=True)
    theirs = torch.load(tmp_path / "out.pt", weights_only=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # timm's SEModule runs its layers as 1x1 convolutions, seify's as matrix products
        assert torch.allclose(theirs["out"], seify.load(run / "best.safetensors")(x), atol=1e-6, rtol=1e-5)
    assert theirs["cfg"]["input_size"] == (3, 32, 32)


def test_a_folder_round_trips_locally_and_through_the_hub(tmp_path, se_file, monkeypatch):
    export(se_file, tmp_path / "folder", "folder")
    x = _x(2, 32)
    with torch.no_grad():
        expected = seify.load(se_file)(x)
        assert torch.equal(seify.load(f"local-dir:{tmp_path / 'folder'}")(x), expected)
    import huggingface_hub
    import huggingface_hub.constants

    def from_the_folder(repo_id, filename, revision=None, **kwargs):  # the hub, as it serves an uploaded folder
        assert repo_id == "someone/my-se-model"
        return str(tmp_path / "folder" / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_the_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # and no probe of the network
    with torch.no_grad():
        assert torch.equal(seify.load("hf-hub:someone/my-se-model")(x), expected)


def test_the_triton_kernels_never_reach_an_exported_graph(tmp_path, se_file):
    import os

    from seify import kernels
    if os.environ.get("TRITON_INTERPRET") != "1" or not kernels.use(True):
        pytest.skip("the Triton interpreter is not on in this process")
    try:
        model = seify.load(se_file)
        assert model.layer1[0].se._takes_kernels(_x(1, 32))  # eager calls here would take them
        export(se_file, tmp_path / "r.pt2", "pt2")
        program = torch.export.load(str(tmp_path / "r.pt2"))
        assert not [n for n in program.graph.nodes if "seify" in str(n.target)]
        assert kernels.usable_for(_x(1, 32))  # and the switch is as it was
    finally:
        kernels.use(False)


class _Polygamma(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.special.polygamma(1, self.conv(x))


def test_bad_exports_are_one_line_and_leave_nothing(cli, tmp_path, se_file, monkeypatch):
    with pytest.raises(SeifyError, match=r"operator aten::polygamma has no ONNX translation; try legacy .* format "
                                         "pt2"):
        export(_Polygamma(), tmp_path / "p.onnx", input_size=(3, 16, 16))
    with pytest.raises(SeifyError, match="operator aten::polygamma .*; try --format pt2"):
        export(_Polygamma(), tmp_path / "p.onnx", input_size=(3, 16, 16), legacy=True)
    assert list(tmp_path.iterdir()) == []
    code, _, err = cli("export", se_file, "-o", tmp_path / "x.tfl", "--format", "tflite")
    assert code == 2 and "--format must be one of onnx, pt2, timm, folder" in err and err.count("\n") == 1
    (tmp_path / "kept.onnx").write_text("mine")
    code, _, err = cli("export", se_file, "-o", tmp_path / "kept.onnx")
    assert code == 2 and "already exists; pass --force" in err and (tmp_path / "kept.onnx").read_text() == "mine"
    tv = seify.save(seify.convert("torchvision:resnet18", input_size=(3, 32, 32)), tmp_path / "tv.safetensors")
    code, _, err = cli("export", tv, "-o", tmp_path / "tv", "--format", "timm")
    assert code == 2 and "timm cannot build" in err and "--format folder" in err and err.count("\n") == 1
    tv.unlink()
    code, _, err = cli("export", se_file, "-o", tmp_path / "x.pt2", "--format", "pt2", "--opset", "17")
    assert code == 2 and "options of --format onnx" in err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    code, _, err = cli("export", se_file, "-o", tmp_path / "y.onnx")
    assert code == 2 and "needs onnxruntime" in err and "pip install 'seify[export]'" in err
    assert not (tmp_path / "y.onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["kept.onnx"]


def test_a_wrong_export_is_not_kept(tmp_path, se_file, monkeypatch):
    """A file that computes something else (here: onnxruntime answering off by 1%) is an error, and is not left."""
    real = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [y * 1.01 for y in real(self, *a, **k)])
    with pytest.raises(SeifyError, match="the onnx export computes something else: outputs differ by"):
        export(se_file, tmp_path / "wrong.onnx", legacy=True)
    assert list(tmp_path.iterdir()) == []


def test_export_json(cli, tmp_path, se_file):
    code, stdout, err = cli("export", se_file, "-o", tmp_path / "r.onnx", "--legacy", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["files"] == [str(tmp_path / "r.onnx")] and report["inputs"] == [[1, 3, 32, 32], [3, 3, 32, 32]]
    assert report["max_abs_diff"] <= report["tolerance"] and report["details"]["exporter"] == "torchscript"


def test_timm_folders_for_byobnet_twins_and_a_clear_no_for_res2net(tmp_path):
    byob = seify.save(seify.convert("resnext26ts", SEOptions(variant="3x3"), input_size=(3, 64, 64)),
                      tmp_path / "rx.safetensors")
    result = export(str(byob), tmp_path / "rx-timm", "timm")
    assert result.details["architecture"] == "seresnext26ts" and result.max_abs_diff <= result.tolerance
    res2 = seify.save(seify.convert("res2net50_26w_4s", input_size=(3, 64, 64)), tmp_path / "r2.safetensors")
    with pytest.raises(SeifyError, match="timm cannot build .* with its SE blocks itself .* format folder"):
        export(str(res2), tmp_path / "r2-timm", "timm")
    assert not (tmp_path / "r2-timm").exists()
