"""Would scoring each shared (query, key) pair once be faster? A prototype, timed against the op.

In the LongNet layout (w_i = 2·w_{i-1}, r_{i-1} | r_i, causal) every causal pair of branch i whose
query and key lie in one segment of branch i − 1 is also a pair of branch i − 1. Eq. 10 is one
softmax over the multiset union of the branches' pairs, so each distinct pair can be scored once
with its count m added as log m to its score (tests/reference.py computes it that way). Then:
- level 1: branch 1's causal segments, every pair weighted by m = min(l_q, l_k), where l(p) is the
  highest branch that keeps position p for that head;
- level i ≥ 2: only the pairs new to branch i, queries in the second half of a segment of w_i
  against keys in its first half: a full (not causal) block, weighted by min(l_q, l_k) − i + 1.
The weight rides in extra head-dim columns: q' = [q, 1[l_q ≥ j] …], k' = [k, c_j·1[l_k ≥ j] …]
with scale·c_j = log((j − i + 1)/(j − i)), each c_j split into two bfloat16 columns (hi + lo)
so that it is exact to ~1e-5. cuDNN takes q/k of 72 columns with v of 64.

Usage: python scripts/dedup_probe.py [lengths...]  (GPU: checks against the reference, then times
the current pieces' kernels against this plan's; CPU: the check only, in float64).
"""
import math
import sys

import torch
from kernel_probe import bench  # scripts/ is on sys.path when this runs as a script

from longctx.attention.branches import Piece, branch_pieces, plan, strided_groups
from longctx.attention.improved import kernel_rows, merge_piece, write_grad
from longctx.attention.kernels import attn_bwd, attn_fwd

SEGMENTS, DILATIONS = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)


def levels(T, H, rs, device):
    """(T, H) int: the highest branch index i (1-based) whose offset keeps position p for head h."""
    p, h = torch.arange(T, device=device)[:, None], torch.arange(H, device=device)[None, :]
    lev = torch.zeros(T, H, dtype=torch.long, device=device)
    for i, r in enumerate(rs, 1):
        lev = torch.where(p % r == h % r, i, lev)
    return lev


def dedup_plan(T, H, ws, rs):
    """[(level, query piece, key piece, causal)]: level 1 is branch 1, level i > 1 the new pairs."""
    out = [(1, p, p, True) for p in branch_pieces(T, ws[0], rs[0], range(H), 0)]
    for i, (w, r) in enumerate(zip(ws[1:], rs[1:]), 2):
        for hs in strided_groups(range(H), r):
            m = w // (2 * r)
            out.append((i, Piece(w // 2, T // w, w, m, r, hs, i - 1), Piece(0, T // w, w, m, r, hs, i - 1), False))
    return out


def augmented(x, lev, level, k_branches, scale, is_key, width):
    """x (B, T, H, D) with the level's weight columns appended, zero-padded to `width` columns."""
    cols = []
    for j in range(level + 1, k_branches + 1):
        on = (lev >= j).to(torch.float64)
        if is_key:
            c = math.log((j - level + 1) / (j - level)) / scale
            hi = torch.tensor(c, dtype=x.dtype).to(torch.float64).item()
            cols += [on * hi, on * (c - hi)]
        else:
            cols += [on, on]
    B, T, H, D = x.shape
    extra = torch.zeros(B, T, H, width - D, dtype=x.dtype, device=x.device)
    for n, col in enumerate(cols):
        extra[..., n] = col.to(x.dtype)
    return torch.cat([x, extra], dim=-1)


def dedup_attention(q, k, v, ws, rs, width=72):
    """Forward and backward by the dedup plan: (out, lse, dout, [dq, dk, dv]) for a fixed dout."""
    B, T, H, D = q.shape
    scale = 1 / math.sqrt(D)
    lev = levels(T, H, rs, q.device)
    pieces = dedup_plan(T, H, ws, rs)
    need = max(2 * (len(ws) - lvl) for lvl, *_ in pieces)
    width = max(width, D + need)
    aug = {lvl: (augmented(q, lev, lvl, len(ws), scale, False, width), augmented(k, lev, lvl, len(ws), scale, True, width))
           for lvl in {p[0] for p in pieces}}
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(q.shape, dtype=acc)
    lse = q.new_full((B, T, H), float("-inf"), dtype=acc)
    for lvl, qp, kp, causal in pieces:  # level 1 comes first and covers its rows once: a plain write
        qa, ka = aug[lvl]
        o, l = attn_fwd(kernel_rows(qa, qp), kernel_rows(ka, kp), kernel_rows(v, kp), causal, scale)
        merge_piece(out, lse, qp, o.unflatten(0, (B, -1)), l.unflatten(0, (B, -1)), lvl == 1)
    out = out.to(q.dtype)
    dout = torch.cos(torch.arange(out.numel(), device=q.device, dtype=torch.float64)).view(out.shape).to(q.dtype)
    grads = [None, None, None]
    for lvl, qp, kp, causal in pieces:
        qa, ka = aug[lvl]
        dq, dk, dv = attn_bwd(kernel_rows(dout, qp), kernel_rows(qa, qp), kernel_rows(ka, kp), kernel_rows(v, kp),
                              kernel_rows(out, qp), kernel_rows(lse, qp), causal, scale)
        for i, (g, piece) in enumerate(((dq[..., :D], qp), (dk[..., :D], kp), (dv, kp))):
            write_grad(grads, i, piece, g, lvl == 1, q, acc)
    return out, lse, dout, [g.to(q.dtype) for g in grads]


def check(device, dtype):
    """The plan against tests/reference.py on a small LongNet-shaped layout."""
    sys.path.insert(0, "tests")
    from reference import reference_attention
    ws, rs, T, H, D = (16, 32, 64, 128), (1, 2, 4, 8), 256, 6, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, T, H, D, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3))
    out, _, dout, grads = dedup_attention(q, k, v, ws, rs)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, ws, rs, is_causal=True)
    ref.backward(dout.double())
    errs = [(a.double() - b).abs().max().item() for a, b in zip([out, *grads], [ref, qr.grad, kr.grad, vr.grad])]
    print(f"check {device} {dtype}: max |err| out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
    return errs


def time_calls(calls, q, k, v, width):
    """Median ms of every call's forward kernels, and of their backward kernels, back to back.
    calls: [(query piece, key piece, causal)]; q/k get `width` columns (random data: timing only)."""
    B, T, H, D = q.shape
    qa, ka = (torch.randn(B, T, H, width, device=q.device, dtype=q.dtype) for _ in range(2))
    args = [(kernel_rows(qa, qp), kernel_rows(ka, kp), kernel_rows(v, kp), causal) for qp, kp, causal in calls]
    outs = [attn_fwd(*a, 0.125) for a in args]
    dos = [torch.randn_like(o) for o, _ in outs]
    fwd = bench(lambda: [attn_fwd(*a, 0.125) for a in args])
    bwd = bench(lambda: [attn_bwd(d, a[0], a[1], a[2], o, l, a[3], 0.125) for d, a, (o, l) in zip(dos, args, outs)])
    return fwd, bwd


def main():
    if not torch.cuda.is_available():
        check("cpu", torch.float64)
        return
    check("cuda", torch.bfloat16)
    for T in [int(x) for x in sys.argv[1:]] or [65536, 131072]:
        H, D = 12, 64
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        now = [(p, p, True) for p in plan(T, H, SEGMENTS, DILATIONS, False)]
        new = [(qp, kp, c) for _, qp, kp, c in dedup_plan(T, H, SEGMENTS, DILATIONS)]
        counted = 4 * D * sum(p.num_segments * len(p.heads) * p.rows ** 2 for p, _, _ in now) / 2
        for name, calls, width in (("now d64", now, 64), ("dedup d64", new, 64), ("dedup d72", new, 72),
                                   ("dedup d80", new, 80)):
            f, b = time_calls(calls, q, k, v, width)
            print(f"T={T} {name}: fwd {f:.3f} ms bwd {b:.3f} ms total {f + b:.3f} ms "
                  f"({3.5 * counted / (f + b) / 1e9:.0f} counted TF/s)")


if __name__ == "__main__":
    main()
