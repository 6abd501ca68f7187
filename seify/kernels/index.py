"""Where a kernel's tile lies in a feature map, in 64-bit arithmetic: a sample's offset (n x its stride) passes
2**31 on a large batch of large maps (64 x 2048 x 128 x 128 elements already), which 32-bit indices wrap."""
import triton
import triton.language as tl


@triton.jit
def offsets(n, c, hw, sn, sc, shw):
    """Element offsets of the (channels ``c``) x (positions ``hw``) tile of sample ``n``."""
    return n.to(tl.int64) * sn + c[:, None].to(tl.int64) * sc + hw[None, :].to(tl.int64) * shw
