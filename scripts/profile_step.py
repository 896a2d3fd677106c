"""Where one training step of the LongNet-size LM (12 x 768, 12 heads) spends its GPU time.

The step is train.py's without Lightning (bf16 autocast, cross-entropy, clip 1.0, AdamW): it prints
the step time (CUDA events), the GPU-busy time per step (profiler) and the kernel time by family.
Run `python scripts/profile_step.py --help` for the options. GPU only.
"""
import argparse
import collections

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from longctx.attention import ImprovedDilatedAttention
from longctx.benchmark import timed
from longctx.model import LongNetLM

FAMILIES = [  # first match wins
    ("attention (cuDNN/flash)", ("cudnn", "flash", "fmha")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "sm90_")),
    ("combine (kernels/combine.py)", ("_merge_kernel", "_sum_kernel")),
    ("SwiGLU and RoPE (kernels/fused.py)", ("_swiglu", "_rope")),
    ("optimizer and clipping", ("multi_tensor_apply", "fused_adam")),
    ("union kernels (kernels/union_kernels.py)", ("_fwd_local", "_fwd_upper", "_dq_local", "_dq_upper", "_dkdv_local",
                                          "_dkdv_upper")),
    ("compiled (triton)", ("triton",)),
    ("reduce", ("reduce",)),
    ("elementwise / copy", ("elementwise", "copy", "cat", "fill", "index")),
    ("memcpy / memset", ("memcpy", "memset")),
]


def family(name: str) -> str:
    n = name.lower()
    return next((f for f, keys in FAMILIES if any(k in n for k in keys)), "other")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("T", type=int, nargs="?", default=32768, help="sequence length (default 32768)")
    p.add_argument("--dense", action="store_true",
                   help="one branch w = T, r = 1: exact dense causal attention through the same op")
    p.add_argument("--compile", choices=["eager", "default", "graphs", "autotune"], default="eager",
                   help="eager; torch.compile; with CUDA graphs (mode reduce-overhead, as configs/graphs.yaml); "
                        "or mode max-autotune (Inductor's own matmul templates)")
    p.add_argument("--whole", action="store_true", help="compile the model after RoPE's angles as one graph (as "
                   "train.py does without activation checkpointing) instead of each block")
    p.add_argument("--tune", action="store_true", help="Inductor's coordinate-descent tuning of its kernels")
    p.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--sync", action="store_true",
                   help="read the loss's finiteness on the host between forward and backward")
    p.add_argument("--foreach", action="store_true", help="AdamW's multi-tensor step instead of the fused one")
    p.add_argument("--bf16res", action="store_true", help="a bfloat16 residual stream (model.residual_dtype)")
    p.add_argument("--top", type=int, default=12, help="list the N longest kernels")
    p.add_argument("--by-op", action="store_true", help="also profile the CPU: kernels by the op that launched them")
    return p.parse_args(argv)


def main():
    args = parse_args()
    T, dense = args.T, args.dense
    mode = "max-autotune" if args.compile == "autotune" else "reduce-overhead"
    graphs = args.compile in ("graphs", "autotune")
    if args.tune:
        inductor_config.coordinate_descent_tuning = True
    compiled, ckpt, sync = args.compile != "eager", args.ckpt, args.sync
    ws = [T] if dense else [w for w in (2048 << i for i in range(12)) if w <= T]
    rs = [1] if dense else [1 << i for i in range(len(ws))]
    model = LongNetLM(256, 768, 12, 12, ImprovedDilatedAttention, dict(segment_lengths=ws, dilation_rates=rs),
                      activation_checkpointing=ckpt,
                      residual_dtype=torch.bfloat16 if args.bf16res else None).cuda()
    whole = args.whole
    if compiled and whole:
        model.trunk = torch.compile(model.trunk, mode=mode if graphs else None)
    elif compiled:
        for block in model.blocks:
            block.compile(mode=mode if graphs else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=None if args.foreach else True)
    tokens = torch.randint(0, 256, (1, T + 1), device="cuda")

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[0, 1:])
        if sync:
            assert torch.isfinite(loss).item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timed(step, torch.device("cuda"), warmup=4, repeats=5, max_seconds=600)[0]
    n = 3
    by_op = args.by_op  # which CPU op launched each kernel (a graph's replay for its own)
    with profile(activities=[ProfilerActivity.CUDA, *([ProfilerActivity.CPU] if by_op else [])]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    by_family, by_kernel = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_family[family(e.name)] += e.device_time / 1e3 / n
            by_kernel[e.name[:90]] += e.device_time / 1e3 / n
    busy = sum(by_family.values())
    print(f"T={T} {'dense' if dense else 'dilated'} compile={compiled}{' whole' if whole else ''} graphs={graphs} "
          f"mode={mode if graphs else 'default'} tune={inductor_config.coordinate_descent_tuning} "
          f"ckpt={ckpt} sync={sync} residual={model.residual_dtype or torch.float32} "
          f"fused_adamw={opt.defaults['fused'] is True}: step {ms:.1f} ms "
          f"({T / ms * 1e3:,.0f} tokens/s), GPU busy {busy:.1f} ms/step ({busy / ms:.0%}), "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    for f, t in by_family.most_common():
        print(f"  {f:28s} {t:8.2f} ms  {t / busy:6.1%}")
    for k, t in by_kernel.most_common(args.top):
        print(f"    {t:8.2f} ms  {k}")
    if by_op:
        launched = collections.Counter()
        for e in prof.events():
            for k in getattr(e, "kernels", []):
                launched[f"{e.name[:40]} -> {k.name[:70]}"] += k.duration / 1e3 / n
        print("  kernels by the CPU op that launched them:")
        for k, t in launched.most_common(args.top):
            print(f"    {t:8.2f} ms  {k}")


if __name__ == "__main__":
    main()
