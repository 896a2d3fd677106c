"""Do the LSE kernels take dilated rows as a strided view, with no copy?

Dilated rows of head h (offset o = h mod r) are every r-th token of a segment: in a
(B, T, H, D) buffer that is a view with row stride r·H·D, and heads sharing an offset are a view
with head stride r·D. If the kernels read such views directly, the per-piece gathers go.
For each backend this times forward and backward on the view and on a contiguous copy,
compares the results, and lists the device kernels the view call launched.

python scripts/stride_probe.py [T] [r]   (defaults: 65536 tokens, dilation 2, 12 heads of 64)
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from kernel_probe import bench  # scripts/ is on sys.path when this script runs
from longctx.attention import kernels


def dilated_view(x, w, r, o):
    """Heads o, o+r, ... at rows o, o+r, ... of every w-token segment, as (S, g, w/r, D)."""
    B, T, H, D = x.shape
    g = len(range(o, H, r))
    return x.as_strided((B * T // w, g, w // r, D), (w * H * D, r * D, r * H * D, 1), x.storage_offset() + o * H * D + o * D)


def kernels_of(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:70] for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA})


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    H, D, w = 12, 64, 2048 * r
    try:
        import triton
        print("triton", triton.__version__)
    except ImportError:
        print("no triton")
    q, k, v, do, out = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(5))
    for backend in ("cudnn", "flash"):
        kernels.CUDA_BACKEND = backend
        for causal in (True, False):
            views = [dilated_view(x, w, r, 0) for x in (q, k, v, do)]
            conts = [x.contiguous() for x in views]
            try:
                o_v, l_v = kernels.attn_fwd(*views[:3], causal, 0.125)
                o_c, l_c = kernels.attn_fwd(*conts[:3], causal, 0.125)
                fwd_err = (o_v.float() - o_c.float()).abs().max().item()
                # backward with the merged output as a strided view of an output buffer
                ov = dilated_view(out, w, r, 0)
                ov.copy_(o_c)
                g_v = kernels.attn_bwd(views[3], *views[:3], ov, l_c, causal, 0.125)
                g_c = kernels.attn_bwd(conts[3], *conts[:3], o_c, l_c, causal, 0.125)
                bwd_err = max((a.float() - b.float()).abs().max().item() for a, b in zip(g_v, g_c))
                tf_v = bench(lambda: kernels.attn_fwd(*views[:3], causal, 0.125))
                tf_c = bench(lambda: kernels.attn_fwd(*conts[:3], causal, 0.125))
                tb_v = bench(lambda: kernels.attn_bwd(views[3], *views[:3], ov, l_c, causal, 0.125))
                tb_c = bench(lambda: kernels.attn_bwd(conts[3], *conts[:3], o_c, l_c, causal, 0.125))
                print(f"{backend} causal={causal} view shape {tuple(views[0].shape)} strides {views[0].stride()}: "
                      f"fwd max|diff| {fwd_err:.3g} bwd {bwd_err:.3g}; fwd {tf_v:.3f} ms (view) vs {tf_c:.3f} (copy); "
                      f"bwd {tb_v:.3f} vs {tb_c:.3f}; grad strides {[tuple(g.stride()) for g in g_v]}")
                print("   fwd kernels:", kernels_of(lambda: kernels.attn_fwd(*views[:3], causal, 0.125)))
                print("   bwd kernels:", kernels_of(lambda: kernels.attn_bwd(views[3], *views[:3], ov, l_c, causal, 0.125)))
            except Exception as e:
                print(f"{backend} causal={causal}: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
