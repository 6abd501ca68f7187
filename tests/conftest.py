import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def save_weights(model, path):
    """Write a model's weights to disk, as users have them."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_model
        save_model(model, str(path))
    else:
        torch.save(model.state_dict(), path)
    return str(path)


def outputs(model, size=64, batch=2, seed=1):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the seify command in this process: returns (exit code, stdout, stderr)."""
    from seify.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["seify", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return run
