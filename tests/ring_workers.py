"""Rank bodies for the ring tests: run in real gloo process groups by tests/test_ring.py.
Each rank checks its own shard against the single-process reference and raises on mismatch."""
import datetime
import os

import torch
import torch.distributed as dist

from longctx.attention import DilatedAttention, MultiheadDilatedAttention, RingDilatedAttention, RingMultiheadDilatedAttention

# (T, H, D, segment_lengths, dilation_rates, head_split): at P = 2 and 4 these mix local branches
# (w <= T/P) with cross-rank ones (w > T/P), full and tail segments, dilation 1 and not.
CASES = [
    (32, 4, 8, [4, 8, 16, 32], [1, 2, 4, 8], False),  # P=4: two local, two cross; P=2: three local
    (32, 4, 8, [16, 64], [2, 4], False),  # clipped to T, no dilation 1 (uncovered rows)
    (48, 6, 8, [6, 24], [1, 2], True),  # P=2: cross branch of 24 = 1 shard; P=4: 2 segments of 2 ranks
    (64, 3, 16, [16, 32, 64], [1, 2, 4], True),
    (96, 4, 8, [12, 72], [1, 2], False),  # P=4: segments of 3 ranks, the tail segment on rank 3 alone
]


def servable(shard_len, T, ws, rs):
    for w, r in zip(ws, rs):
        w = min(w, T)
        if (w <= shard_len and shard_len % w) or (w > shard_len and (w % shard_len or shard_len % r)):
            return False
    return True


def report(out_dir, rank, checks):
    """What this rank verified, for the test process to assert on."""
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(str(checks))


def init(rank, world, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=20),
    )
    torch.set_num_threads(1)


def shard(x, rank, world):
    l = x.shape[1] // world
    return x[:, rank * l : (rank + 1) * l]


def core_cases(rank, world, port, out_dir):
    init(rank, world, port)
    ran = 0
    try:
        for T, H, D, ws, rs, head_split in CASES:
            if not servable(T // world, T, ws, rs):
                continue  # its ValueError is tested separately
            for causal in (False, True):
                g = torch.Generator().manual_seed(T + H + causal)
                q, k, v, dout = (torch.randn(2, T, H, D, generator=g) for _ in range(4))
                full = [x.clone().requires_grad_() for x in (q, k, v)]
                ref = DilatedAttention(ws, rs, head_split=head_split)(*full, is_causal=causal)
                ref_grads = torch.autograd.grad(ref, full, dout)
                local = [shard(x, rank, world).clone().requires_grad_() for x in (q, k, v)]
                out = RingDilatedAttention(ws, rs, head_split=head_split)(*local, is_causal=causal)
                grads = torch.autograd.grad(out, local, shard(dout, rank, world))
                where = f"rank {rank}/{world} T={T} w={ws} r={rs} head_split={head_split} causal={causal}"
                torch.testing.assert_close(out, shard(ref, rank, world), msg=lambda m: f"{where} out: {m}")
                for name, g_, rg in zip("qkv", grads, ref_grads):
                    torch.testing.assert_close(g_, shard(rg, rank, world), msg=lambda m: f"{where} d{name}: {m}")
                ran += 1
        report(out_dir, rank, ran)
    finally:
        dist.destroy_process_group()


def core_cases_combined(rank, world, port, out_dir):
    """core_cases with the pieces combined in one pass (kernels/combine.py; in Triton's interpreter
    without a GPU: TRITON_INTERPRET comes from the test process's environment)."""
    from longctx.kernels import combine

    combine.available = lambda device: True
    core_cases(rank, world, port, out_dir)


def multihead_case(rank, world, port, out_dir):
    init(rank, world, port)
    try:
        E, H, T, ws, rs = 32, 4, 32, [8, 32], [1, 2]
        torch.manual_seed(0)
        ref = MultiheadDilatedAttention(E, H, ws, rs)
        ring = RingMultiheadDilatedAttention(E, H, ws, rs)
        ring.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, T, E, generator=torch.Generator().manual_seed(1))
        ref_out, _ = ref(x, is_causal=True)
        ref_out.square().sum().backward()
        out, _ = ring(shard(x, rank, world), is_causal=True)
        out.square().sum().backward()  # each rank's loss covers its tokens; the sum is the full loss
        torch.testing.assert_close(out, shard(ref_out, rank, world))
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        scale = max(g.abs().max().item() for g in ref_grads.values())  # float32 sums in another order
        for name, p in ring.named_parameters():
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5 * scale, rtol=1.3e-6, msg=name)
        report(out_dir, rank, len(ref_grads))
    finally:
        dist.destroy_process_group()


def layout_error(rank, world, port, out_dir):
    """Every rank must raise the same ValueError, before any communication."""
    init(rank, world, port)
    try:
        x = torch.randn(1, 6, 2, 4)  # shard 6: segment 4 straddles ranks
        try:
            RingDilatedAttention([4], [1])(x, x, x)
        except ValueError as e:
            assert "segment length 4 does not divide the per-rank shard of 6 tokens" in str(e), str(e)
        else:
            raise AssertionError("no ValueError")
        try:
            RingDilatedAttention([12], [4])(x, x, x)  # spans 2 ranks but shard 6 % dilation 4 != 0
        except ValueError as e:
            assert "need segment length % shard == 0 and shard % dilation rate 4 == 0" in str(e), str(e)
        else:
            raise AssertionError("no ValueError")
        dist.barrier()  # everyone got here: nobody hung
        report(out_dir, rank, 2)
    finally:
        dist.destroy_process_group()


def one_rank_fails(rank, world, port):
    """Rank 0 raises before the ring; the others block in it until the group's timeout."""
    init(rank, world, port)
    if rank == 0:
        raise RuntimeError("rank 0 failed on purpose")
    x = torch.randn(1, 8, 2, 4)
    RingDilatedAttention([16], [1])(x, x, x)
