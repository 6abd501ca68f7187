"""No spelling of an input lets a command write over it: every writing command, with MODEL or --weights spelt as
a path, a link, a local-dir: folder, pointing at its own output, is refused in one line and the input's bytes stay
as they were."""
import hashlib
import shutil
from pathlib import Path

import timm
from timm.models import save_for_hf

from conftest import ARCH, realistic, save_weights
from seify.export import export


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_command_writes_over_its_input_however_it_is_spelt(cli, tmp_path, tiny, se_file):
    plain = Path(save_weights(realistic(timm.create_model(ARCH, num_classes=4)), tmp_path / "plain.safetensors"))
    se = tmp_path / "se.safetensors"
    shutil.copy(se_file, se)
    link = tmp_path / "link.safetensors"
    link.symlink_to(se)
    folder = tmp_path / "shared"
    export(str(se), folder, "folder")  # a hub folder seify reads as local-dir:
    timm_folder = tmp_path / "timm-plain"
    timm_folder.mkdir()
    save_for_hf(realistic(timm.create_model(ARCH, num_classes=4)), str(timm_folder), safe_serialization=True)
    inputs = [plain, se, folder / "model.safetensors", timm_folder / "model.safetensors", timm_folder / "config.json"]
    before = {p: _digest(p) for p in inputs}
    cases = [
        ["convert", ARCH, "--weights", plain, "-o", plain],
        ["convert", ARCH, "--weights", plain, "-o", tmp_path / "plain-link.safetensors"],  # a link to plain below
        ["convert", f"local-dir:{timm_folder}", "-o", timm_folder / "model.safetensors"],
        ["fold", se, "-o", se, "--no-latency"],
        ["fold", link, "-o", se, "--no-latency"],
        ["fold", se, "-o", link, "--no-latency"],
        ["fold", f"local-dir:{folder}", "-o", folder / "model.safetensors", "--no-latency"],
        ["export", se, "-o", se, "--format", "safetensors"],
        ["export", f"local-dir:{folder}", "-o", folder / "model.safetensors", "--format", "safetensors"],
        ["export", f"local-dir:{folder}", "-o", folder, "--format", "folder"],
        ["export", ARCH, "--weights", link, "-o", se, "--format", "safetensors"],
        ["finetune", f"local-dir:{folder}", tiny, "--out", folder, "--epochs", "1", "--img-size", "32"],
        ["finetune", ARCH, tiny, "--weights", plain, "--out", tmp_path, "--epochs", "1", "--img-size", "32"],
        ["finetune", link, tiny, "--out", tmp_path, "--epochs", "1", "--img-size", "32"],
    ]
    (tmp_path / "plain-link.safetensors").symlink_to(plain)
    for args in cases:
        code, _, err = cli(*args, "--force")
        assert code == 2 and err.count("\n") == 1, (args, err)
        assert "input" in err or "is inside" in err, (args, err)
        assert {p: _digest(p) for p in inputs} == before, args


def test_a_hub_model_in_the_local_cache_is_an_input_too(cli, tmp_path, se_file, monkeypatch):
    """hf-hub:ORG/NAME reads its files from the Hugging Face cache: writing over them is writing over the input."""
    import huggingface_hub.constants as hub
    cache = tmp_path / "hub"
    snapshot = cache / "models--alice--se-model" / "snapshots" / ("0" * 40)
    shared = tmp_path / "shared"
    export(se_file, shared, "folder")
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(shared / name, snapshot / name)
    (cache / "models--alice--se-model" / "refs").mkdir()
    (cache / "models--alice--se-model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    cached = snapshot / "model.safetensors"
    before = _digest(cached)
    for args in (["fold", "hf-hub:alice/se-model", "-o", cached, "--no-latency"],
                 ["export", "hf-hub:alice/se-model", "-o", cached, "--format", "safetensors"]):
        code, _, err = cli(*args, "--force")
        assert code == 2 and "input" in err and err.count("\n") == 1, (args, err)
        assert _digest(cached) == before
