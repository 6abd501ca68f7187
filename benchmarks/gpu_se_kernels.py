"""Where SE's time goes on a GPU: one SE site (gate, scale, residual sum) forward + backward, in variants.

    PYTHONPATH=. python benchmarks/gpu_se_kernels.py
"""
import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from seify.surgery import SEOptions
from seify.surgery import add_se as convert
from seify.timing import interleaved_medians


def site(variant, x, sc, w1, b1, w2, b2):
    if variant == "no SE (x + shortcut)":
        return x + sc
    if variant.startswith("adaptive_avg_pool2d"):
        z = F.adaptive_avg_pool2d(x, 1).flatten(1)
    elif variant.startswith("sum/HW"):
        z = x.sum((2, 3), dtype=torch.float32) / (x.shape[2] * x.shape[3])
    else:
        z = x.mean((2, 3))
    s = torch.sigmoid(F.linear(F.relu(F.linear(z, w1, b1)), w2, b2)).to(x.dtype)[:, :, None, None]
    if variant.endswith("mul+add"):
        return x * s + sc
    return torch.addcmul(sc, x, s)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    variants = ["no SE (x + shortcut)", "mean + addcmul", "mean + mul+add", "adaptive_avg_pool2d + addcmul",
                "sum/HW + addcmul"]
    for n, c, h in [(128, 256, 56), (128, 2048, 7)]:
        for fmt in (torch.channels_last, torch.contiguous_format):
            x = torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
            sc = torch.randn_like(x)
            x.requires_grad_(True)
            rd = c // 16
            w1, b1 = torch.randn(rd, c, device="cuda", requires_grad=True), torch.zeros(rd, device="cuda")
            w2, b2 = torch.randn(c, rd, device="cuda", requires_grad=True), torch.zeros(c, device="cuda")
            g = torch.randn_like(x)

            def run(v, x=x, sc=sc, w1=w1, b1=b1, w2=w2, b2=b2, g=g):
                def f():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = site(v, x, sc, w1, b1, w2, b2)
                    out.backward(g)
                return f
            ms = interleaved_medians([run(v) for v in variants], 30, 5, torch.cuda.synchronize)
            name = "channels_last" if fmt is torch.channels_last else "NCHW"
            timings = "; ".join(f"{v} {1000 * t:.3f} ms" for v, t in zip(variants, ms, strict=True))
            print(f"{n}x{c}x{h}x{h} {name}: {timings}", flush=True)
    model = convert(timm.create_model("resnet50"), SEOptions(), (3, 224, 224)).model.cuda().train()
    model.to(memory_format=torch.channels_last)
    x = torch.randn(128, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(x).float().sum().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
