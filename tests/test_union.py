"""The union kernels (longctx/kernels/union.py) against tests/reference.py, which builds the
multiset of branch pairs from the design's masks and shares no code with them. Without a GPU they
run in Triton's interpreter (tests/conftest.py) in float32; GPU parity in bf16/fp16 is in test_gpu.py."""
import contextlib
import os

import pytest
import torch

from longctx.kernels import SUPPORTED, union
from conftest import load_script
from reference import reference_attention

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs Triton >= 3.6 (installed by the test extra)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def layouts(L, n):
    return [L << i for i in range(n)], [1 << i for i in range(n)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", [
    (1, 256, 5, 16, 64, 3, False),  # three levels, heads beyond every dilation's offsets
    (2, 512, 3, 16, 64, 2, False),  # batch 2, eight level-1 segments, four top-level ones
    (1, 128, 2, 32, 32, 1, False),  # one branch, no weights (the op takes cuDNN; head_split launches this way)
    # head_split: heads 0-2 branch 1, 3-4 branch 2 (offsets 1, 0), 5-6 branch 3 (offsets 1, 2)
    (2, 256, 7, 16, 32, 3, True),
], ids=lambda c: f"B{c[0]}-T{c[1]}-H{c[2]}-L{c[4]}-n{c[5]}" + ("-split" if c[6] else ""))
def test_union_matches_the_reference_output_lse_and_gradients(case, causal):
    B, T, H, D, L, n, split = case
    ws, rs = layouts(L, n)
    lay = union.Layout(L, n, split)
    assert union.layout(T, H, D, ws, rs, split) == (lay if n > 1 else None)  # one branch: the op takes cuDNN
    g = torch.Generator().manual_seed(T + n)
    # q/k/v as strided views of one fused (B, T, 3, H, D) projection, as the model passes them
    # inputs rounded to the kernels' dtype first, so the reference sees exactly what they see
    qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64).to(DTYPE).double()
    dout = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(DTYPE).double()
    q, k, v = (x.to(DEVICE, DTYPE) for x in qkv.unbind(2))
    scale = 0.3  # not 1/sqrt(D): the scale must reach every pass
    # the kernels write every element themselves, zeros included: fill fresh buffers with NaN
    with poisoned_empty(DEVICE):
        out, lse = union.forward(q, k, v, lay, causal, scale)
        dq, dk, dv = union.backward(dout.to(DEVICE, DTYPE), q, k, v, out, lse, lay, causal, scale)
    exact_in = [x.clone().requires_grad_() for x in qkv.unbind(2)]
    exact = reference_attention(*exact_in, ws, rs, causal, head_split=split, scale=scale)
    grads = torch.autograd.grad(exact, exact_in, dout)
    tol = 1e-5 if DTYPE == torch.float32 else 3e-2
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, dq, dk, dv], [exact, *grads]):
        assert (got.double().cpu() - want).abs().max() <= tol * want.abs().max(), name
    # the LSE is log Σ_i Σ_keys exp(score) over every branch's keys: the merged LSE of docs/design.md#the-merge-longnet-eq-10
    # (−inf where a head keeps a position in no branch, which only head_split has here)
    counts_lse = reference_lse(qkv.unbind(2)[:2], ws, rs, causal, scale, split)
    assert torch.equal(lse.cpu().isinf(), counts_lse.isinf())
    kept = counts_lse.isfinite()
    assert split == (not kept.all())
    assert (lse.double().cpu()[kept] - counts_lse[kept]).abs().max() <= 1e-4


@contextlib.contextmanager
def poisoned_empty(device):
    """torch.empty on `device` returns NaN-filled floating tensors inside the block."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.device.type == torch.device(device).type else t
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def reference_lse(qk, ws, rs, causal, scale, head_split=False):
    """(B, T, H) log Σ over every branch's kept keys of exp(score), from reference.pair_counts."""
    from reference import pair_counts
    q, k = qk
    B, T, H, _ = q.shape
    counts = pair_counts(T, H, ws, rs, causal, head_split)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + torch.log(counts)
    return torch.logsumexp(scores, -1).transpose(1, 2)


@pytest.mark.parametrize("ws, rs, T, head_split, why", [
    ([64, 128, 256], [1, 2, 4], 256, False, None),
    ([64, 128, 256], [1, 2, 4], 256, True, None),
    ([64, 128, 256], [1, 2, 4], 384, False, "T not a multiple of the largest segment (a tail segment)"),
    ([64, 128, 256], [1, 2, 4], 384, True, "T not a multiple of the largest segment (a tail segment)"),
    ([64, 128, 256], [1, 2, 4], 128, False, "the largest segment is clipped"),
    ([64, 192, 256], [1, 3, 4], 768, False, "dilations do not double"),
    ([64, 192, 256], [1, 3, 4], 768, True, "dilations do not double"),
    ([64, 64, 64], [1, 2, 4], 256, False, "segments do not grow with the dilation (the seed's layout)"),
    ([128, 256], [2, 4], 256, False, "no dilation 1"),
    ([32, 64, 128], [1, 2, 4], 128, False, "L / r_n = 8 rows: below a 16-row tile"),
    ([32, 64, 128], [1, 2, 4], 128, True, None),  # each head's rows step by r: 32 of them a segment
    ([8, 16, 32], [1, 2, 4], 128, True, "L = 8 rows a segment: below a 16-row tile"),
    ([64], [1], 256, False, "one branch: nothing to merge, cuDNN is faster"),
    ([256], [1], 256, True, "one branch: nothing to merge, cuDNN is faster"),
])
def test_union_layout_accepts_only_longnets_geometry(ws, rs, T, head_split, why):
    got = union.layout(T, 4, 16, ws, rs, head_split)
    assert (got is None) == (why is not None), why
    if why is None:
        assert got == (ws[0], len(ws), head_split)


def test_union_layout_needs_a_tileable_head_dim_and_a_head_per_branch():
    assert union.layout(256, 4, 64, [64, 128, 256], [1, 2, 4], False) == (64, 3, False)
    assert union.layout(256, 4, 48, [64, 128, 256], [1, 2, 4], False) is None
    assert union.layout(256, 4, 256, [64, 128, 256], [1, 2, 4], False) is None
    assert union.layout(256, 3, 64, [64, 128, 256], [1, 2, 4], True) == (64, 3, True)
    assert union.layout(256, 2, 64, [64, 128, 256], [1, 2, 4], True) is None


def test_small_head_split_launches_take_64_row_tiles():
    """The seed preset at 8K with head_split (8 heads: 3 of r = 1, 3 of r = 2, 2 of r = 4, so
    5·T rows a batch) on an H100's 132 SMs: 320 and 640 tiles of 128 rows take the small tiles,
    1,280 (batch 4) SPLIT_CONFIG's; without head_split every launch takes CONFIG's."""
    assert [union.few_tiles(B, 8192, 8, 3, 132) for B in (1, 2, 4)] == [True, True, False]
    assert union.few_tiles(4, 8192, 8, 3, 1000)  # a GPU with many more SMs
    assert union._tiles("fwd", 1024, 1, union.SMALL_CONFIG)[0] == union.SMALL_CONFIG["fwd"][0] == 64
    cpu = torch.empty(4, 8192, 8, 64)
    assert union.config_for(cpu, union.Layout(1024, 3, True)) is union.SPLIT_CONFIG
    assert union.config_for(cpu, union.Layout(1024, 3, False)) is union.CONFIG


def test_few_tiles_follows_small_tiles_after_a_first_call(monkeypatch):
    """The GPU test that forces SPLIT_CONFIG sets SMALL_TILES = 0 after other tests asked the
    same shape: the answer must follow the threshold, not a cached one (it did not, 2026-12-04)."""
    assert union.few_tiles(1, 8192, 8, 3, 132)
    monkeypatch.setattr(union, "SMALL_TILES", 0)
    assert not union.few_tiles(1, 8192, 8, 3, 132)


def test_the_register_cap_is_for_the_64_row_dkdv_tiles_alone():
    """168 registers fit a third 4-warp program an SM; on the other tilings the cap only spills
    (the 8-warp ones ran 2-3x slower under it)."""
    rows, _, warps, _ = union.CONFIG["dkdv"]
    assert union.register_cap("dkdv", rows, warps) == {"maxnreg": 168}
    assert union.register_cap("dkdv", 64, 4) == {"maxnreg": 168}
    assert union.register_cap("dkdv", 128, 4) == union.register_cap("dkdv", 64, 8) == {}
    assert union.register_cap("fwd", 64, 4) == union.register_cap("dq", 64, 4) == {}


def test_the_op_uses_union_only_for_compiled_half_precision():
    """The op takes the union path on a GPU in fp16/bf16 only: float32 would run tl.dot in TF32,
    and on the CPU the interpreter is for tests, far too slow to train."""
    lay = union.layout(256, 4, 16, [64, 128, 256], [1, 2, 4], False)
    assert not union.use(torch.empty(1, dtype=torch.float32), lay)
    assert not union.use(torch.empty(1, dtype=torch.bfloat16), lay)  # CPU
    assert not union.use(torch.empty(1, dtype=torch.bfloat16), None)


def test_sass_probe_counts_the_dkdv_loops_matmuls():
    """tools/kernels/sass_probe.py compiles the dK/dV local kernel for sm_90 without a GPU (in a fresh
    process: the interpreter that conftest.py selects has no compiler). Its tile (64 keys, 32
    queries, D = 64) is one m64 block a warpgroup, so each loop iteration's four matmuls issue
    k-steps of 16: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ 64 / 16 = 4 each, dV += Pᵀ·dO and dK += dSᵀ·Q 32 / 16 =
    2 each, 12 wgmma instructions, in both loops (the causal diagonal's and the rest)."""
    import re
    import subprocess
    import sys
    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, f"{ROOT}/tools/kernels/sass_probe.py", "dkdv", "local", "long", "64", "32", "4",
                          "3"], capture_output=True, text=True, env=env, timeout=300)
    if "cuobjdump" in out.stderr and "No such file" in out.stderr:
        pytest.skip("this Triton wheel carries no cuobjdump")
    assert out.returncode == 0, out.stderr[-2000:]
    loops = re.findall(r"loop at 0x[0-9a-f]+: (\d+) instructions an iteration, (\d+) with no wgmma in flight; (.*)",
                       out.stdout)
    assert len(loops) == 2, out.stdout
    # union.register_cap reaches the compiler: without it this kernel takes 181 registers since
    # the tile order by segment (Triton 3.6), two programs an SM
    regs = re.search(r"(\d+) registers, .*: (\d+) programs an SM", out.stdout)
    assert int(regs.group(1)) <= 168 and int(regs.group(2)) == 3, out.stdout
    for total, idle, counts in loops:
        assert re.search(r"\bHGMMA 12\b", counts), counts
        # P's exponentials need Sᵀ, so part of each iteration has nothing in flight, and part of
        # it runs while a matmul is
        assert 0 < int(idle) < int(total), (total, idle)


def test_sass_probe_counts_what_runs_with_no_wgmma_in_flight():
    """sass_probe.exposed on a hand-written loop body: the wait for all wgmma groups and what
    follows it up to the next issue are exposed, counted over one pass of the cycle."""
    probe = load_script("tools/kernels/sass_probe")
    body = ["HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0", "FADD R1, R2, R3",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R4, R5", "FMUL R6, R4, R7",
            "HGMMA.64x64x16.F32.BF16 R56, R88, gdesc[UR12], R56, gsb0", "IMAD R8, R9, R10, R11"]
    assert probe.exposed(body) == 3  # the wait, MUFU and FMUL
    assert probe.exposed(body[:2] + body[5:]) == 0  # never waited on: always in flight
    # a wait with one group still pending is not idle
    assert probe.exposed(["WARPGROUP.DEPBAR.LE gsb0, 0x1", "FADD R1, R2, R3"] + body[:1]) == 0
    # the back edge carries the state: a body that starts after the wait still counts its first two
    assert probe.exposed(body[3:5] + body[5:] + body[:3]) == 3
    # occupancy: 165 registers round to 168 (3 × 168 × 128 = 64,512 of 65,536), 171 to 176 (2);
    # 255 at 4 warps (2) or 8 (1); shared memory: 72 KB + 1 KB three times in 228 KB, 80 KB twice
    assert [probe.programs_per_sm(r, w, 40_000) for r, w in [(165, 4), (168, 4), (171, 4), (255, 4), (255, 8)]] == \
        [3, 3, 2, 2, 1]
    assert [probe.programs_per_sm(100, 4, m) for m in (73_728, 81_920)] == [3, 2]
    assert probe.programs_per_sm(32, 1, 0) == 32  # the limit on programs


def test_union_probe_lays_head_splits_work_out_as_the_same_dense_segments():
    """union_probe compares the op with head_split against dense SDPA on the same pairs as one
    batch of segments: those segments' dense FLOPs must be the op's counted FLOPs,
    which layout.dilated_flops derives from the branches, not from segments."""
    from longctx.attention.layout import dilated_flops

    probe = load_script("tools/kernels/union_probe")
    seed = probe.SEED
    assert probe.split_segments(8192, seed) == (40, 1024)  # heads 3 / 3 / 2 in 8 / 4 / 2 segments
    for T, layout in [(8192, seed), (32768, seed), (4096, dict(seed, ws=[256, 512], rs=[1, 2], H=5))]:
        blocks, L = probe.split_segments(T, layout)
        counted = dilated_flops(1, T, layout["H"], 64, tuple(layout["ws"]), tuple(layout["rs"]), True, False)
        assert blocks * 4 * L * L * 64 == counted, (T, layout)


def test_hopper_pass_reads_only_rows_one_tma_view_holds():
    """hopper.py's Gluon dK/dV pass takes q/k/v/dO only where one 2-D TMA view over
    (batch·position, row stride) reads them in place: contiguous tensors and the slots of a fused
    (B, T, 3, H, D) projection, not heads far apart or rows off 16 bytes; and never off an sm_90
    GPU (here, the CPU: the union kernels' Triton pass runs)."""
    from longctx.kernels import hopper
    B, T, H, D = 2, 128, 3, 64
    qkv = torch.zeros(B, T, 3, H, D, dtype=torch.bfloat16)
    assert hopper._flat(torch.zeros(B, T, H, D, dtype=torch.bfloat16))
    assert all(hopper._flat(x) for x in qkv.unbind(2))
    assert not hopper._flat(torch.zeros(B, H, T, D, dtype=torch.bfloat16).transpose(1, 2))  # heads T·D apart
    row = H * D + 4  # rows 8 bytes off 16
    padded = torch.zeros(B * T * row, dtype=torch.bfloat16).as_strided((B, T, H, D), (T * row, row, D, 1))
    assert not hopper._flat(padded)
    assert not hopper._flat(torch.zeros(T, B, H, D, dtype=torch.bfloat16).transpose(0, 1))  # batches interleaved
    lay = union.layout(T, H, D, *layouts(64, 2), False)
    assert lay is not None and not hopper.use(*qkv.unbind(2), qkv[:, :, 0], lay)


@pytest.mark.parametrize("setting,enabled", [(None, True), ("0", False), ("1", True)])
def test_hopper_path_is_on_unless_the_environment_says_0(setting, enabled, reload_with_env):
    """hopper.py's Gluon passes are the default on sm_90 GPUs; LONGCTX_HOPPER=0 (only that)
    keeps the Triton local passes there, as docs/performance.md compares them."""
    from longctx.kernels import hopper
    assert reload_with_env(hopper, "LONGCTX_HOPPER", setting).ENABLED is enabled
