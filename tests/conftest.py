import sys

import pytest
from torch import nn
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


def realistic(model, seed=0):
    """Give norms and layer scales trained-looking values.

    Fresh timm models zero their last BN per block and start layer scales at 1e-6, so every residual branch
    contributes nothing; a preservation test on such a model would pass whatever SE did to the branch.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                with torch.no_grad():
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()
