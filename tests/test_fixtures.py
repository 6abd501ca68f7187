"""Files that stay loadable: every file kind a version of seify wrote (tests/fixtures/format-N, made by
make_fixtures.py) loads in this version and computes what it computed then; a file from a newer seify is refused
in one line naming the two versions."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import seify
from seify.equivalence import difference

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("format-*"))


def _agrees(got, expected):
    checked = difference(expected, got)
    assert checked.agrees, checked.why()


@pytest.fixture(params=FIXTURES, ids=[f.name for f in FIXTURES])
def fixture(request):
    return request.param, load_file(str(request.param / "expected.safetensors"))


def test_seify_files_of_every_format_compute_what_they_did(fixture):
    folder, expected = fixture
    x = expected["input"]
    with torch.no_grad():
        for name in ("converted", "finetuned", "folded"):
            _agrees(seify.load(folder / f"{name}.safetensors")(x), expected[name])
        _agrees(seify.load(f"local-dir:{folder / 'folder'}")(x), expected["finetuned"])
        _agrees(seify.resolve(f"local-dir:{folder / 'timm'}").model(x), expected["finetuned"])
        if "adapter" in expected:  # format 2: an adapter on its base, scale blocks
            _agrees(seify.load(folder / "adapter.safetensors", base=str(folder / "base.safetensors"))(x),
                    expected["adapter"])
            _agrees(seify.load(folder / "scale.safetensors")(x), expected["scale"])


def test_exported_files_of_every_format_compute_what_they_did(fixture):
    folder, expected = fixture
    x = expected["input"]
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(folder / "finetuned.onnx"), providers=["CPUExecutionProvider"])
    _agrees(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), expected["finetuned"])
    with open(folder / "finetuned.pt2", "rb") as f:
        program = torch.export.load(f).module()
    _agrees(program(x), expected["finetuned"])
    import timm
    with torch.no_grad():
        _agrees(timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True).eval()(x), expected["finetuned"])


def _with_recipe(source: Path, target: Path, **changes) -> Path:
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = {k: v for k, v in json.loads(metadata["seify"]).items() if changes.get(k, 0) is not None}
    recipe.update({k: v for k, v in changes.items() if v is not None})
    save_file(tensors, str(target), {**metadata, "seify": json.dumps(recipe)})
    return target


def test_a_file_of_a_newer_format_is_refused_naming_both_versions(cli, tmp_path):
    newer = _with_recipe(FIXTURES[-1] / "converted.safetensors", tmp_path / "newer.safetensors",
                         recipe_format=99, seify_version="9.0.0")
    for command in (["profile", newer, "--no-latency"], ["export", newer, "-o", tmp_path / "x.onnx"]):
        code, _, err = cli(*command)
        assert code == 2 and err.count("\n") == 1, err
        assert f"written by seify 9.0.0 in recipe format 99; this seify {seify.__version__} reads formats up to" in err
    older = _with_recipe(FIXTURES[0] / "converted.safetensors", tmp_path / "older.safetensors", recipe_format=None,
                         seify_version="0.1.0")  # as 0.1.0 wrote them: no format number
    x = load_file(str(FIXTURES[0] / "expected.safetensors"))
    with torch.no_grad():
        _agrees(seify.load(older)(x["input"]), x["converted"])


def test_the_fixtures_are_never_rewritten(tmp_path, monkeypatch):
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    try:
        import make_fixtures
    finally:
        sys.path.pop(0)
    shutil.copytree(FIXTURES[-1], tmp_path / FIXTURES[-1].name)
    monkeypatch.setattr(make_fixtures, "HERE", tmp_path)
    with pytest.raises(SystemExit, match="exists: fixtures are never rewritten"):
        make_fixtures.main()
