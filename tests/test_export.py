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
    assert got.shape == expected.shape and torch.isfinite(got).all()
    return (got - expected).abs().max() <= 1e-4 * expected.abs().max().item()


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


def test_gated_files_vary_with_the_input(se_file, gated_file):
    """The export tests' model: its gates differ from image to image, so a broken squeeze or excitation in an
    exported graph changes its outputs."""
    from seify.se import SqueezeExcite
    block = next(m for m in seify.load(gated_file).modules() if isinstance(m, SqueezeExcite))
    x = torch.randn(4, block.fc1.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gates = block.excite(x) if hasattr(block, "excite") else None
    assert gates is not None and gates.std(0).max() > 0.01


def test_a_converted_resnet_exports_to_onnx_and_pt2(tmp_path, gated_file):
    model = seify.load(gated_file)
    result = export(gated_file, tmp_path / "r.onnx")
    assert result.details["exporter"] == "dynamo" and result.details["dynamic"] == ["batch"]
    assert result.inputs == [[1, 3, 32, 32], [3, 3, 32, 32]]
    _onnx_matches(tmp_path / "r.onnx", model, 32)
    export(gated_file, tmp_path / "r.pt2", "pt2")
    _pt2_matches(tmp_path / "r.pt2", model, 32)
    sized = export(gated_file, tmp_path / "sized.onnx", dynamic_size=True)
    assert sized.details["dynamic"] == ["batch", "height", "width"] and [2, 3, 64, 64] in sized.inputs
    session = ort.InferenceSession(str(tmp_path / "sized.onnx"), providers=["CPUExecutionProvider"])
    x = _x(2, 48)
    with torch.no_grad():
        assert _close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx", "r.pt2", "sized.onnx"]  # no sidecar


def test_an_onnx_file_is_self_contained_and_force_leaves_no_sidecar(tmp_path, gated_file, monkeypatch):
    import shutil

    import seify.export as ex
    export(gated_file, tmp_path / "r.onnx")
    export(gated_file, tmp_path / "r.onnx", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.onnx"]
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(tmp_path / "r.onnx", alone / "copied.onnx")  # copied alone, it still runs
    _onnx_matches(alone / "copied.onnx", seify.load(gated_file), 32)
    monkeypatch.setattr(ex, "EMBEDDED_BYTES", 0)  # as past protobuf's 2 GB: the weights beside the file
    big = export(gated_file, tmp_path / "r.onnx", force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["r.onnx", "r.onnx.data"]
    assert big.files == [str(tmp_path / "r.onnx"), str(tmp_path / "r.onnx.data")] and "2 GB" in big.notes[-1]
    _onnx_matches(tmp_path / "r.onnx", seify.load(gated_file), 32)
    monkeypatch.setattr(ex, "EMBEDDED_BYTES", 2_000_000_000)
    export(gated_file, tmp_path / "r.onnx", force=True)  # the sidecar goes with the file it belonged to
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["r.onnx"]
    (tmp_path / "r.onnx.data").write_text("mine")  # a file of the user's that the .onnx does not use: kept
    with pytest.raises(SeifyError, match="is not the weights of an ONNX"):
        export(gated_file, tmp_path / "r.onnx", force=True)
    assert (tmp_path / "r.onnx.data").read_text() == "mine"


def test_opsets_are_honoured_or_refused(cli, tmp_path, gated_file):
    import onnx
    old = export(gated_file, tmp_path / "o13.onnx", opset=13)
    assert onnx.load(str(tmp_path / "o13.onnx")).opset_import[0].version == 13
    assert old.details["exporter"] == "torchscript" and "older than the dynamo exporter" in old.notes[0]
    _onnx_matches(tmp_path / "o13.onnx", seify.load(gated_file), 32)
    new = export(gated_file, tmp_path / "o20.onnx", opset=20)
    assert new.details == {**new.details, "exporter": "dynamo", "opset": 20}
    for opset, legacy in (("30", ()), ("6", ()), ("24", ("--legacy",))):
        code, _, err = cli("export", gated_file, "-o", tmp_path / f"x{opset}.onnx", "--opset", opset, *legacy)
        assert code == 2 and "--opset must be a whole number from 7 to" in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("x*"))


def test_non_finite_weights_are_never_checked_as_equal(tmp_path, gated_file):
    model = seify.load(gated_file)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    for format in ("onnx", "pt2"):
        with pytest.raises(SeifyError, match="not finite"):
            export(model, tmp_path / f"nan.{format}", format, input_size=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_an_earlier_export(cli, tmp_path, gated_file):
    import shutil
    out = tmp_path / "shared"
    export(gated_file, out, "folder")
    assert json.loads((out / ".seify-export.json").read_text())["files"] == ["README.md", "config.json",
                                                                          "model.safetensors"]
    export(gated_file, out, "folder", force=True)  # an earlier export: replaced
    (out / "notes.txt").write_text("my notes")
    code, _, err = cli("export", gated_file, "-o", out, "--format", "folder", "--force")
    assert code == 2 and "holds files an earlier seify export did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "my notes"
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(gated_file, mine / "model.safetensors")
    code, _, err = cli("export", mine / "model.safetensors", "-o", mine, "--format", "folder", "--force")
    assert code == 2 and "holds the input" in err and (mine / "model.safetensors").exists()
    code, _, err = cli("export", gated_file, "-o", tmp_path / "a" / "b" / "timm", "--format", "timm")
    assert code == 2 and "is not an existing folder; create it first" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_sizes_the_model_cannot_take_are_named(cli, tmp_path, gated_file):
    code, _, err = cli("export", gated_file, "-o", tmp_path / "m.onnx", "--input-size", "1,32,32")
    assert code == 2 and "has 1 channel(s), but the model's first convolution takes 3" in err
    code, _, err = cli("export", gated_file, "-o", tmp_path / "m.onnx", "--input-size", "3,16,16", "--dynamic-size")
    assert code == 2 and "--dynamic-size exports sizes from 32 px up" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


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


def test_a_folder_round_trips_locally_and_through_the_hub(tmp_path, gated_file, monkeypatch):
    export(gated_file, tmp_path / "folder", "folder")
    x = _x(2, 32)
    with torch.no_grad():
        expected = seify.load(gated_file)(x)
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
    with pytest.raises(SeifyError, match="the onnx export does not compute what the model does: outputs differ by"):
        export(se_file, tmp_path / "wrong.onnx", legacy=True)
    assert list(tmp_path.iterdir()) == []


def test_export_json(cli, tmp_path, se_file):
    code, stdout, err = cli("export", se_file, "-o", tmp_path / "r.onnx", "--legacy", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["files"] == [str(tmp_path / "r.onnx")] and report["inputs"] == [[1, 3, 32, 32], [3, 3, 32, 32]]
    assert report["details"]["exporter"] == "torchscript" and report["tolerance"] > 0
    _onnx_matches(tmp_path / "r.onnx", seify.load(se_file), 32)


def test_timm_folders_for_byobnet_twins_and_a_clear_no_for_res2net(tmp_path):
    byob = seify.save(seify.convert("resnext26ts", SEOptions(variant="3x3"), input_size=(3, 64, 64)),
                      tmp_path / "rx.safetensors")
    result = export(str(byob), tmp_path / "rx-timm", "timm")
    assert result.details["architecture"] == "seresnext26ts"
    import timm
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'rx-timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert _close(rebuilt(_x(2, 64)), seify.load(byob).eval()(_x(2, 64)))
    res2 = seify.save(seify.convert("res2net50_26w_4s", input_size=(3, 64, 64)), tmp_path / "r2.safetensors")
    with pytest.raises(SeifyError, match="timm cannot build .* with its SE blocks itself .* format folder"):
        export(str(res2), tmp_path / "r2-timm", "timm")
    assert not (tmp_path / "r2-timm").exists()
