"""What calling fc1 and fc2 as modules costs (0.3.0's SE block, as timm's SEModule) against 0.2.0's matrix products on
their weights, which hid them from hooks, pruning and quantizers: seify's SE-ResNet-50 both ways, interleaved in
one process, CPU, one thread and two.

    PYTHONPATH=. python benchmarks/se_module_calls.py | tee benchmarks/se_module_calls.log
"""
from __future__ import annotations

import copy
import statistics

import timm
import torch
import torch.nn.functional as F

from seify.se import SqueezeExcite
from seify.surgery import SEOptions, add_se
from seify.timing import inference, interleaved_times


def matrix_products(self: SqueezeExcite, x: torch.Tensor) -> torch.Tensor:
    """0.2.0's excitation: fc1 and fc2 as matrix products on the pooled vector."""
    z = x.mean((2, 3)) if self.squeeze == "avg" else x.amax((2, 3))
    z = self.act(self.bn(F.linear(z, self.fc1.weight.flatten(1), self.fc1.bias)))
    s = self.gate(F.linear(z, self.fc2.weight.flatten(1), self.fc2.bias))
    return (s * self.scale if self.scale != 1.0 else s)[:, :, None, None]


def main() -> None:
    model = add_se(timm.create_model("resnet50"), SEOptions(), (3, 224, 224)).model.eval()
    old = copy.deepcopy(model)
    for block in (m for m in old.modules() if isinstance(m, SqueezeExcite)):
        block.excite = matrix_products.__get__(block)
    print(f"torch {torch.__version__}; seify SE-ResNet-50 (16 SE blocks), eager inference, medians of 30 paired runs")
    for threads, batch in ((1, 1), (2, 1), (2, 8)):
        torch.set_num_threads(threads)
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            assert torch.allclose(model(x), old(x), atol=1e-4)  # the same computation
        calls, products = interleaved_times([inference(model, x), inference(old, x)], 30, 5, lambda: None)
        ratios = sorted(a / b for a, b in zip(calls, products, strict=True))
        low, middle, high = statistics.quantiles(ratios, n=4)
        print(f"{threads} thread(s), batch {batch}: module calls {1000 * statistics.median(calls):.1f} ms, matrix "
              f"products {1000 * statistics.median(products):.1f} ms: {middle:.3f}x [{low:.3f} to {high:.3f}]")


if __name__ == "__main__":
    main()
