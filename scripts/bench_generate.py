"""Decode speed and cache memory of the dilated cache against a dense full KV cache, per context.

The LongNet-size model (12 x 768, 12 heads, bf16 weights), LongNet's layout up to each context
(segments 2048·2^i, dilations 2^i), batch 1: a prompt of the context's length is prefilled
(timed, against the training forward's rate on the same prompt), then tokens are decoded with the
step replayed from a CUDA graph. The dense baseline is the same weights with one branch over the
whole context (exact dense causal attention) and a full cache: decoded eagerly with SDPA over the
filled prefix (flash or cuDNN, no mask) and graphed through the same step as ours (the split-rows
kernel over the masked full buffer); the faster is reported. Its cache is filled with random
values: decode time does not depend on them. Also: dilated_sdpa_tokens_per_s, our step with the
PyTorch path (one SDPA call over the masked rows, the write by indexing) instead of the kernels;
dilated_eager_tokens_per_s, our step not replayed from a CUDA graph. *_step_floor_fraction: the
bytes a step must read (every weight, the cache's rows) at the copy bandwidth measured in the
run, over the step's time (1.0 would be bound by memory).
`python scripts/bench_generate.py --help` for the options. GPU only.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

import longctx.decode
from longctx.attention import ImprovedDilatedAttention
from longctx.kernels import compiled_triton
from longctx.decode import Decoder, qkv_of, attention_output
from longctx.model import LongNetLM, bound_rotation


def layout(T: int) -> dict:
    ws = [w for w in (2048 << i for i in range(16)) if w <= T] or [T]
    return dict(segment_lengths=ws, dilation_rates=[1 << i for i in range(len(ws))])


def timed(fn, n: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


@torch.no_grad()
def dense_eager_step(model, ks, vs, token, t):
    """One dense decode step: SDPA of the new query over the cache's first t + 1 rows."""
    x = model.embed(token[:, None])
    angles = (torch.tensor([float(t)], device="cuda") * model.rotary.inv_freq)[None, None, None, :]
    rope = bound_rotation(angles.cos(), angles.sin())
    for block, k_cache, v_cache in zip(model.blocks, ks, vs):
        q, k, v = qkv_of(block.attn, block.norm1(x), rope)
        k_cache[:, :, t], v_cache[:, :, t] = k[:, 0], v[:, 0]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, : t + 1], v_cache[:, :, : t + 1])
        h, y = block.norm2.add(x, attention_output(block.attn, out[:, :, 0]))
        x = h + block.mlp(y)
    return model.head(model.norm(x))[:, 0]


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy of 1 GiB moves (read plus write): the bound a
    decode step's reads are compared with, measured in the same run."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * src.element_size() / timed(lambda: dst.copy_(src), 20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576], help="contexts")
    p.add_argument("--new_tokens", type=int, default=64, help="decode steps timed per case")
    p.add_argument("--out", help="a JSON file for the results")
    args = p.parse_args(argv)
    results = []
    bandwidth = copy_bandwidth()
    for T in args.lengths:
        torch.manual_seed(0)
        model = LongNetLM(256, 768, 12, 12, ImprovedDilatedAttention, layout(T)).cuda().to(torch.bfloat16).eval()
        prompt = torch.randint(0, 256, (1, T), device="cuda")
        with torch.no_grad():
            model.features(prompt)  # compile and tune the kernels at this length
            forward_s = timed(lambda: model.features(prompt), 1)
        decoder = Decoder(model, 1, torch.bfloat16, "cuda")
        decoder.capture()
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = decoder.prefill(prompt)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        token = logits.argmax(-1)
        ours = timed(lambda: decoder.step(token), args.new_tokens)
        # The same step by the PyTorch path: one SDPA call over the masked rows, writes by indexing.
        longctx.decode.compiled_triton = lambda device: False
        fused = Decoder(model, 1, torch.bfloat16, "cuda")
        fused.capture()
        longctx.decode.compiled_triton = compiled_triton
        fused.t.fill_(T)
        fused_s = timed(lambda: fused.step(token), args.new_tokens)
        del fused
        eager = Decoder(model, 1, torch.bfloat16, "cuda")  # not captured: every launch from Python
        eager.t.fill_(T)
        eager_s = timed(lambda: eager.step(token), args.new_tokens)
        del eager
        # A step reads every weight once and the whole cache (the graphed step attends over all
        # of its rows, masked): its time at the copy bandwidth is the step's floor.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        row = dict(context=T, branches=len(layout(T)["segment_lengths"]), prefill_s=prefill_s, forward_s=forward_s,
                   dilated_tokens_per_s=1 / ours, dilated_sdpa_tokens_per_s=1 / fused_s,
                   dilated_eager_tokens_per_s=1 / eager_s, dilated_cache_gib=decoder.nbytes() / 2**30,
                   dilated_step_floor_fraction=(weight_bytes + decoder.nbytes()) / bandwidth / ours)
        del decoder
        torch.cuda.empty_cache()
        # Dense: the same weights, one branch over the whole context, a full cache.
        dense = LongNetLM(256, 768, 12, 12, ImprovedDilatedAttention,
                          dict(segment_lengths=[T + args.new_tokens], dilation_rates=[1])).cuda().to(torch.bfloat16)
        dense.load_state_dict(model.state_dict())
        dense.eval()
        del model
        graphed = Decoder(dense, 1, torch.bfloat16, "cuda")
        graphed.capture()
        for cache in graphed.caches:
            cache.k.normal_()
            cache.v.normal_()
        graphed.t.fill_(T)
        dense_graph = timed(lambda: graphed.step(token), args.new_tokens)
        ks = [c.k for c in graphed.caches]
        vs = [c.v for c in graphed.caches]
        dense_eager = timed(lambda: dense_eager_step(dense, ks, vs, token, T), args.new_tokens)
        row.update(dense_graph_tokens_per_s=1 / dense_graph, dense_eager_tokens_per_s=1 / dense_eager,
                   dense_cache_gib=graphed.nbytes() / 2**30,
                   dense_step_floor_fraction=(weight_bytes + graphed.nbytes() * T / (T + args.new_tokens))
                   / bandwidth / min(dense_graph, dense_eager))
        best = max(row["dense_graph_tokens_per_s"], row["dense_eager_tokens_per_s"])
        row.update(speedup=row["dilated_tokens_per_s"] / best, memory_ratio=row["dense_cache_gib"] / row["dilated_cache_gib"],
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        print(json.dumps(row), flush=True)
        results.append(row)
        del graphed, dense, ks, vs
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           copy_bytes_per_s=bandwidth, results=results), f, indent=1)


if __name__ == "__main__":
    main()
