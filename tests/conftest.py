import json
import os
import signal
import sys

# seify's Triton kernels run on CPU in the tests, under Triton's interpreter. Triton reads this when a kernel is
# decorated, its own library's included, so it is set before anything imports torch (which may import Triton).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from seify.finetune.progress import PlainLog  # noqa: E402

# The models the coverage and profile tests share: timm and torchvision families with residual, activation and
# module placements.
TIMM = ["resnet18", "resnet50", "resnext26ts", "resnetv2_50", "regnetx_002", "densenet121", "mobilenetv2_100",
        "convnext_atto"]  # VGG, with its 100M-parameter classifier, is converted in test_families
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5", "regnet_x_400mf"]
CASES = [name for name in TIMM] + [f"torchvision:{name}" for name in TORCHVISION]

# Eqn. 5 with timm's biases: each block of a stage with C output channels adds 2*C*(C/16) + C/16 + C.
STAGES = [(3, 256), (4, 512), (6, 1024), (3, 2048)]


def analytic_added(stages=STAGES, r=16):
    return sum(n * (2 * c * (c // r) + c // r + c) for n, c in stages)


def build(spec: str):
    """A fresh model for a spec, built the way its library builds it (not through seify)."""
    import timm
    import torchvision
    if spec.startswith("torchvision:"):
        return torchvision.models.get_model(spec.split(":", 1)[1], weights=None)
    return timm.create_model(spec)


if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per test process: the workers share the cores
    torch.set_num_threads(1)


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


# The tests that take most of a minute each (see --durations).
LONGEST = ("test_sigkill_before_every_rename_then_resume_is_exact", "test_demo_reaches_90_percent",
           "test_compare_writes_its_files_and_resumes_after_a_kill", "test_two_process_gloo_job",
           "test_analyze_fold_profile_and_export_on_the_named_networks",
           "test_two_ranks_killed_and_resumed_match_the_run_never_stopped",
           "test_sigkill_with_loading_processes_resumes_exactly")


def pytest_collection_modifyitems(items):
    """The longest tests first, then the other slow ones: with parallel workers the long jobs start early instead
    of running alone at the end (longest-first scheduling)."""
    items.sort(key=lambda item: (item.originalname not in LONGEST, item.get_closest_marker("slow") is None))


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
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                with torch.no_grad():
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


# ------------------------------------------------------------------ fine-tuning on tiny data


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """4 classes of textures, 8 training and 4 validation images each, 32 px."""
    from seify.images.synthetic import make_dataset
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=8, val_per_class=4, size=32)


# Fine-tuning tests use timm's test_resnet (373K parameters, four residual blocks) so that a run's weights,
# optimizer state and checkpoints stay small; the product is exercised on resnet18 by the demo and the benchmark.
ARCH = "test_resnet"


@pytest.fixture(scope="session")
def se_file(tmp_path_factory):
    """A trained-looking model (1000 classes) converted to SE at 32 px, as a seify file."""
    import timm

    import seify
    folder = tmp_path_factory.mktemp("m")
    trained = save_weights(realistic(timm.create_model(ARCH)), folder / "trained.safetensors")
    result = seify.convert(ARCH, weights=trained, input_size=(3, 32, 32))
    return str(seify.save(result, folder / "se.safetensors"))


@pytest.fixture(scope="session")
def gated_file(tmp_path_factory, se_file):
    """``se_file`` with every SE block's fc2 drawn at random: gates that vary with the input, as after training
    (a fresh conversion's gates are constant, and would hide a broken squeeze or excitation)."""
    import seify
    from seify.se import SqueezeExcite
    model = seify.load(se_file)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, SqueezeExcite)):
            block.fc2.weight.copy_(torch.randn(block.fc2.weight.shape, generator=g))
    recipe = seify.checkpoint.read_recipe(se_file)
    return str(seify.checkpoint.save(model, tmp_path_factory.mktemp("g") / "gated.safetensors", recipe))


@pytest.fixture(scope="session")
def plain4(tmp_path_factory):
    """A plain 4-class checkpoint, as a user who trained one on the same classes has it."""
    import timm
    return save_weights(realistic(timm.create_model(ARCH, num_classes=4)),
                        tmp_path_factory.mktemp("t4") / "plain-4.safetensors")


def config(out, **kw):
    """A fine-tuning config small enough for the test suite."""
    from seify.finetune.config import FinetuneConfig
    base = dict(out=str(out), epochs=2, batch_size=8, img_size=32, workers=0, device="cpu", log_every=0,
                lr=1e-3, warmup_epochs=0.5, threads=1)
    return FinetuneConfig(**{**base, **kw})


class KillAt(PlainLog):
    """A fine-tuning log that sends this process SIGTERM after a given step, as a scheduler or a user would."""
    at = 6

    def step(self, batch, loss, top1, lr, rate):
        self.count = getattr(self, "count", 0) + 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def rows_of(out):
    """The metrics rows of the epochs a run finished (epoch 0, the starting model, left out)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["epoch"] > 0]
