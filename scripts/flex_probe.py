"""Can a Triton kernel run the dedup plan (dedup_probe.py) fast enough? FlexAttention as the proxy.

dedup_probe.py showed that scoring each distinct (query, key) pair once, with its branch count m
added as log m to its score, would take 3.43 ms of cuDNN calls at 64K (90% of dense, counted), if
the weight were free; cuDNN has no cheap way to add it. FlexAttention compiles an attention kernel
in Triton with any score modification, so it can add the weight exactly: in the LongNet layout
the count of a level-i pair is min(l_q, l_k) − i + 1, where l(p) = 1 + #{j ≥ 2 : p ≡ h mod r_j}
depends on the residue of p only, and log is monotone, so log m = min(log(l_q − i + 1),
log(l_k − i + 1)): one per-row and one per-column term and a min per score.

Prints, per length, forward and forward+backward of: dense causal SDPA (cuDNN) and flex; the
current plan's calls in cuDNN and in flex; the dedup plan in flex with and without the weight.
The check merges the dedup plan's flex outputs by their LSEs and compares them with
tests/reference.py: on the CPU the output in float64 (eager flex, which has no backward there),
on the GPU output and gradients in float32 (compiled flex).

Usage: python scripts/flex_probe.py [lengths...]
"""
import sys

import torch
import torch.nn.functional as F
from dedup_probe import DILATIONS, SEGMENTS, dedup_plan  # scripts/ is on sys.path as a script
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from longctx.attention.branches import dilated_flops, plan
from longctx.attention.improved import kernel_rows

torch._dynamo.config.recompile_limit = 256  # one compile per (shape, score_mod) of the plans
torch._dynamo.config.accumulated_recompile_limit = 4096


def log_weight(qp, level, rs):
    """score_mod adding log m for a call of `level` over piece qp's rows (keys share its layout)."""
    h0 = qp.heads[0]
    step = qp.heads[1] - qp.heads[0] if len(qp.heads) > 1 else 0
    big = max(rs) * 1024  # keeps p − h non-negative; a multiple of every r

    def row_term(idx, h, dtype):
        head = h0 + h * step
        x = head % qp.r + idx * qp.r + big - head  # ≡ p − h (mod max r): segments start at multiples of it
        lev = 1 + sum(((x & (r - 1)) == 0).to(torch.int32) for r in rs[1:])
        return torch.log((lev - level + 1).to(dtype))

    def mod(score, b, h, q_idx, kv_idx):
        return score + torch.minimum(row_term(q_idx, h, score.dtype), row_term(kv_idx, h, score.dtype))
    return mod


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


class Calls:
    """The flex calls of a plan: [(query piece, key piece, causal, level or None)]."""

    def __init__(self, calls, rs, weighted, device, compiled):
        self.calls, self.fn = calls, torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        self.mods = [log_weight(qp, lvl, rs) if weighted and lvl else None for qp, _, _, lvl in calls]
        self.masks = {}
        for qp, _, c, _ in calls:
            if c and qp.rows not in self.masks:
                self.masks[qp.rows] = create_block_mask(causal, None, None, qp.rows, qp.rows, device=device)

    def args(self, q, k, v, grad=False):
        """Per call, its kernels' (N, g, m, D) q/k/v views of (B, T, H, D) inputs; with `grad`,
        detached leaves (so that a timing leaves out autograd's copies back into q/k/v)."""
        views = [[kernel_rows(x, p) for x, p in ((q, qp), (k, kp), (v, kp))] for qp, kp, _, _ in self.calls]
        return [[x.detach().requires_grad_() for x in a] for a in views] if grad else views

    def run(self, args):
        """[(out (N, g, m, D), lse (N, g, m))] per call."""
        res = []
        for (qp, _, c, _), mod, a in zip(self.calls, self.mods, args):
            o, aux = self.fn(*a, score_mod=mod, block_mask=self.masks[qp.rows] if c else None,
                             return_aux=AuxRequest(lse=True))
            res.append((o, aux.lse))
        return res


def positions(p, B):
    """(B·N, g, m) sequence positions and head indices of piece p's rows."""
    s = torch.arange(B * p.num_segments) % p.num_segments
    h = torch.tensor(p.heads)
    j = torch.arange(p.rows)
    pos = p.start + s[:, None, None] * p.seg_len + (h % p.r)[None, :, None] + j[None, None, :] * p.r
    return pos, h[None, :, None].expand_as(pos), (torch.arange(B * p.num_segments) // p.num_segments)[:, None, None].expand_as(pos)


def merged(results, calls, shape):
    """Eq. 10 over the calls' (out, lse), functionally (autograd flows): (B, T, H, D) output."""
    B, T, H, D = shape
    lses, outs = [], []
    for (o, lse), (qp, _, _, _) in zip(results, calls):
        pos, h, b = (t.to(o.device) for t in positions(qp, B))
        acc = torch.float64 if o.dtype == torch.float64 else torch.float32
        lses.append(torch.full((B, T, H), float("-inf"), device=o.device, dtype=acc).index_put((b, pos, h), lse.to(acc)))
        outs.append(torch.zeros(B, T, H, D, device=o.device, dtype=acc).index_put((b, pos, h), o.to(acc)))
    lse = torch.logsumexp(torch.stack(lses), 0)
    return sum(torch.exp(l - lse)[..., None] * o for l, o in zip(lses, outs))


def dedup_calls(T, H, ws, rs):
    return [(qp, kp, c, lvl) for lvl, qp, kp, c in dedup_plan(T, H, ws, rs)]


def check(device, dtype):
    """Dedup plan in flex, merged, against the reference (CPU) or the op (GPU)."""
    sys.path.insert(0, "tests")
    from reference import reference_attention
    if device == "cpu":
        ws, rs, T, H, D = (16, 32, 64, 128), (1, 2, 4, 8), 256, 6, 16
    else:
        ws, rs, T, H, D = (256, 512, 1024, 2048), (1, 2, 4, 8), 4096, 12, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, T, H, D, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(4))
    calls = dedup_calls(T, H, ws, rs)
    flex = Calls(calls, rs, True, device, device != "cpu")
    grads = device != "cpu"  # flex has no backward on the CPU
    xs = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    out = merged(flex.run(flex.args(*xs)), calls, q.shape)
    got = [out, *(torch.autograd.grad(out, xs, do.to(out.dtype)) if grads else [])]
    rs_ = [x.detach().clone().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*rs_, ws, rs, is_causal=True)
    want = [ref, *torch.autograd.grad(ref, rs_, do.double())]
    errs = [((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in zip(got, want)]
    print(f"check {device} {dtype} T={T}: max |err| / max |ref| of out, dq, dk, dv:",
          " ".join(f"{e:.1e}" for e in errs), flush=True)
    return errs


def main():
    if not torch.cuda.is_available():
        check("cpu", torch.float64)
        return
    from kernel_probe import bench
    from dedup_probe import time_calls
    check("cuda", torch.float32)
    H, D = 12, 64
    for T in [int(x) for x in sys.argv[1:]] or [65536, 262144]:
        counted = 3.5 * dilated_flops(1, T, H, D, SEGMENTS, DILATIONS, False, True)
        dense = 3.5 * 4 * H * D * T * T / 2
        q, k, v, do = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        f = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        fb = bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), (qt, kt, vt), do.transpose(1, 2)))
        print(f"T={T} dense sdpa: fwd {f:.3f} ms fwd+bwd {fb:.3f} ms ({dense / fb / 1e9:.0f} TF/s)", flush=True)
        mask = create_block_mask(causal, None, None, T, T, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        f = bench(lambda: flex(qt, kt, vt, block_mask=mask))
        fb = bench(lambda: torch.autograd.grad(flex(qt, kt, vt, block_mask=mask), (qt, kt, vt), do.transpose(1, 2)))
        print(f"T={T} dense flex: fwd {f:.3f} ms fwd+bwd {fb:.3f} ms ({dense / fb / 1e9:.0f} TF/s)", flush=True)
        now = [(p, p, True, None) for p in plan(T, H, SEGMENTS, DILATIONS, False)]
        f, b = time_calls([c[:3] for c in now], q, k, v, D)
        print(f"T={T} now, cuDNN: fwd {f:.3f} ms fwd+bwd {f + b:.3f} ms ({counted / (f + b) / 1e9:.0f} counted TF/s)")
        new = dedup_calls(T, H, SEGMENTS, DILATIONS)
        f, b = time_calls([c[:3] for c in new], q, k, v, D)
        print(f"T={T} dedup unweighted, cuDNN: fwd {f:.3f} ms fwd+bwd {f + b:.3f} ms ({counted / (f + b) / 1e9:.0f} counted TF/s)")
        for name, calls, weighted in (("now", now, False), ("dedup unweighted", new, False), ("dedup weighted", new, True)):
            fc = Calls(calls, DILATIONS, weighted, "cuda", True)
            leaves = fc.args(q, k, v, grad=True)
            flat = [x for a in leaves for x in a]

            def fwd_bwd():
                outs = [o for o, _ in fc.run(leaves)]
                torch.autograd.grad(outs, flat, [torch.ones_like(o) for o in outs])
            with torch.no_grad():
                f = bench(lambda: fc.run(fc.args(q, k, v)))
            fb = bench(fwd_bwd)
            print(f"T={T} {name}, flex: fwd {f:.3f} ms fwd+bwd {fb:.3f} ms ({counted / fb / 1e9:.0f} counted TF/s)", flush=True)


if __name__ == "__main__":
    main()
