"""GPU parity (run on a lent GPU with scripts/gpu_check.sh; skipped on CPU-only machines).
The same rule as the CPU suite: error vs the float64 reference at most 2x the error of the
reference itself computed in the low precision."""
import pytest
import torch

from longctx.attention import DilatedAttention, ImprovedDilatedAttention, RingDilatedAttention, sdpa
from reference import reference_attention

pytestmark = pytest.mark.gpu

CASES = [
    (257, 4, 64, [64, 128, 512], [1, 2, 4], False),  # odd T, clipped and tail segments
    (1000, 6, 64, [128, 256], [2, 4], True),  # no dilation 1, head_split
    (2048, 8, 64, [1024, 1024, 1024], [1, 2, 4], False),  # the seed's layout at 2K
    (2048, 8, 128, [512, 2048], [1, 4], False),
    (1024, 16, 64, [256, 1024], [1, 4], False),  # r = 4 over 16 heads: gathered pieces
]


def err(a, b):
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op_cls", [ImprovedDilatedAttention, RingDilatedAttention, DilatedAttention], ids=lambda c: c.__name__)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-D{c[2]}" for c in CASES])
def test_gpu_parity(case, causal, op_cls, dtype, backend, monkeypatch):
    monkeypatch.setattr(sdpa, "CUDA_BACKEND", backend)
    T, H, D, ws, rs, hs = case
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v, dout = (torch.randn(1, T, H, D, device="cuda", dtype=torch.float64, generator=g) for _ in range(4))
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = op_cls(ws, rs, head_split=hs)(*low, is_causal=causal)
    grads = torch.autograd.grad(out, low, dout.to(dtype))
    exact_in = [x.clone().requires_grad_() for x in (q, k, v)]
    exact = reference_attention(*exact_in, ws, rs, causal, hs)
    exact_grads = torch.autograd.grad(exact, exact_in, dout)
    ref_in = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, ws, rs, causal, hs, dtype=dtype)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err(out, exact) <= 2 * err(ref, exact) + 1e-6
    for name, gr, rg, eg in zip("qkv", grads, ref_grads, exact_grads):
        assert err(gr, eg) <= 2 * err(rg, eg) + 1e-6, name


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("head_split", [False, True], ids=["merged", "disjoint"])
def test_gpu_fused_qkv_views_batch_two(head_split, backend, monkeypatch):
    """q/k/v as views of one (B, T, 3, H, D) projection, batch 2 with a tail segment (the
    batch and segment axes do not fold into one view there): the kernels read the views."""
    monkeypatch.setattr(sdpa, "CUDA_BACKEND", backend)
    T, H, D, ws, rs = 1000, 8, 64, [256, 512], [1, 2]
    g = torch.Generator(device="cuda").manual_seed(7)
    qkv, dout = (torch.randn(2, T, *s, D, device="cuda", dtype=torch.float64, generator=g) for s in ((3, H), (H,)))
    low = qkv.to(torch.bfloat16).requires_grad_()
    out = ImprovedDilatedAttention(ws, rs, head_split=head_split)(*low.unbind(2), is_causal=True)
    (grad,) = torch.autograd.grad(out, low, dout.to(torch.bfloat16))
    exact_in = qkv.clone().requires_grad_()
    exact = reference_attention(*exact_in.unbind(2), ws, rs, True, head_split)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, dout)
    ref_in = qkv.to(torch.bfloat16).requires_grad_()
    ref = reference_attention(*ref_in.unbind(2), ws, rs, True, head_split, dtype=torch.bfloat16)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout.to(torch.bfloat16))
    assert err(out, exact) <= 2 * err(ref, exact) + 1e-6
    assert err(grad, exact_grad) <= 2 * err(ref_grad, exact_grad) + 1e-6


def test_gpu_combine_matches_the_piecewise_float32_merge(monkeypatch):
    """The LongNet layout at 32K: the one-pass combine (the default here) against improved.py's
    piece-by-piece float32 merge. Same float32 sums in another order, rounded once; cuDNN's dQ
    itself varies from run to run (atomics), so the two agree to bf16 rounding in norm. (The union
    kernels, which take this layout by default, are off: both runs take the per-branch path.)"""
    from longctx.attention import pieces
    from longctx.kernels import combine, union

    monkeypatch.setattr(union, "ENABLED", False)

    T, H, D, ws, rs = 32768, 12, 64, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, dout = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    op = ImprovedDilatedAttention(ws, rs)
    assert pieces.use_combine(q, *pieces.pieces_of(T, H, tuple(ws), tuple(rs), False))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(combine, "ENABLED", enabled)
        out = op(q, k, v, is_causal=True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        a, b = a.double(), b.double()
        assert (a - b).norm() <= 2 ** -8 * b.norm(), name  # one branch left out: ~0.05


@pytest.mark.parametrize("layout", ["combine", "merged", "disjoint", "union", "union-split"])
def test_gpu_forward_backward_capture_in_a_cuda_graph(layout, monkeypatch):
    """The op makes no host synchronisation: fwd+bwd captures in a CUDA graph (benchmark
    --cuda-graph, torch.compile's reduce-overhead) and its replay equals the eager result.
    LongNet's layout: the union kernels, or (turned off) the per-branch paths."""
    from longctx.kernels import union
    from longctx.benchmark import graphed

    monkeypatch.setattr(union, "ENABLED", layout.startswith("union"))
    head_split = layout in ("disjoint", "union-split")
    T, H, D, ws, rs = 4096, 16, 64, [512, 1024, 2048, 4096], [1, 2, 4, 8]  # strided; gathered for r = 4
    if layout == "combine":  # 12 heads: every piece strided, so the pieces combine in one pass
        H = 12
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v, dout = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    op = ImprovedDilatedAttention(ws, rs, head_split=head_split)
    results = []

    def step():
        out = op(q, k, v, is_causal=True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))

    replay = graphed(step)  # warm-up calls and the capture append; the capture's tensors are last
    captured = results[-1]
    for t in captured:
        t.zero_()
    replay()
    step()
    eager = results[-1]
    torch.cuda.synchronize()
    for name, a, b in zip(["out", "dq", "dk", "dv"], captured, eager):
        torch.testing.assert_close(a, b, msg=name)  # not bitwise: the dQ accumulation uses atomics


def test_gpu_training_step_synchronises_once(tmp_path, monkeypatch):
    """A train.py step (progress bar, TensorBoard, checkpointing, the presets' callbacks) waits
    for the GPU once: for the event behind the loss's copy to the host, in on_after_backward,
    with the backward already queued. Any other synchronisation (sync debug mode's warnings:
    .item(), blocking copies; it does not see event waits) leaves the GPU idle while the host
    runs Lightning's step-end work; reading the loss before the backward was queued left it
    idle 2.7 ms a step at 32K."""
    import os
    import traceback
    import warnings

    import lightning as L

    from longctx.cli import cli_main

    class SyncCounter(L.Callback):  # syncs from one step end to the next: data, step, hooks
        def __init__(self):
            self.steps, self._scope, self._caught = [], None, []

        def wait(self, event):  # torch.cuda.Event.synchronize, counted while a step is watched
            if self._scope is not None:
                frames = [f for f in traceback.extract_stack() if not f.filename.endswith("test_gpu.py")][-3:]
                self._caught.append("event " + " <- ".join(f"{os.path.basename(f.filename)}:{f.name}"
                                                           for f in reversed(frames)))
            return self._real_wait(event)

        def _show(self, message, *args, **kwargs):
            if "synchroniz" in str(message):  # the call chain, innermost first
                frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")][-6:]
                self._caught.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._scope is not None:
                torch.cuda.set_sync_debug_mode(0)
                self._scope.__exit__(None, None, None)
                self.steps.append(self._caught)
                self._scope, self._caught = None, []
            if 2 <= batch_idx < 5:  # after warm-up: the allocator and cuDNN's plans are settled
                torch.cuda.set_sync_debug_mode("warn")  # before the capture: this call warns itself
                self._scope = warnings.catch_warnings()
                self._scope.__enter__()
                warnings.simplefilter("always")
                warnings.showwarning = self._show

    counter = SyncCounter()
    counter._real_wait = torch.cuda.Event.synchronize
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda event: counter.wait(event))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli_main(["fit", "--config", f"{root}/tests/configs/tiny.yaml", f"--data.cache_dir={tmp_path}/data",
              "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", "--trainer.logger=true",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.log_every_n_steps=1",
              "--trainer.enable_progress_bar=true", "--trainer.enable_checkpointing=true",
              "--trainer.callbacks+=longctx.callbacks.StepStatsMonitor", "--trainer.gradient_clip_val=1.0",
              "--trainer.max_steps=7"],
             trainer_defaults={"callbacks": [counter]})
    assert len(counter.steps) == 3
    for places in counter.steps:
        assert len(places) == 1 and places[0].startswith("event lit_module.py:on_after_backward"), \
            f"synchronisations in one step: {places}"


def test_gpu_fit_validates_under_cuda_graphs(tmp_path):
    """train.py with compile_mode reduce-overhead runs its sanity check, training steps and a
    validation in between (torch 2.11 failed at the first validation: pytorch#152887)."""
    import os

    from longctx.cli import cli_main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli = cli_main(["fit", "--config", f"{root}/tests/configs/tiny.yaml", f"--data.cache_dir={tmp_path}/data",
                    "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", "--trainer.max_steps=6",
                    "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=1",
                    "--trainer.val_check_interval=3", "--model.compile=true",
                    "--model.compile_mode=reduce-overhead", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 6
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


UNION_CASES = [  # (B, T, H, D, segment_lengths, dilation_rates): LongNet layouts the union kernels take
    (2, 4096, 12, 64, [256, 512, 1024, 2048], [1, 2, 4, 8]),
    (1, 2048, 8, 128, [512, 1024], [1, 2]),
    (1, 3072, 6, 32, [256, 512, 1024], [1, 2, 4]),  # three top-level segments, fewer heads than offsets
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op_cls", [ImprovedDilatedAttention, RingDilatedAttention], ids=lambda c: c.__name__)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_split", [False, True], ids=["all-heads", "head-split"])
@pytest.mark.parametrize("case", UNION_CASES, ids=[f"B{c[0]}-T{c[1]}-D{c[3]}" for c in UNION_CASES])
def test_gpu_union_kernels_parity(case, head_split, causal, op_cls, dtype, monkeypatch):
    """The op's union kernels (union.py: each distinct pair once, weighted; with head_split, one
    strided softmax per head), on q/k/v views of one fused projection: the same error rule
    against the float64 reference as every other path. The Triton passes throughout, as on GPUs
    other than sm_90 (test_gpu_hopper_backward_parity checks the Gluon ones)."""
    from longctx.kernels import hopper, union
    monkeypatch.setattr(hopper, "ENABLED", False)
    B, T, H, D, ws, rs = case
    assert union.use(torch.empty(1, device="cuda", dtype=dtype), union.layout(T, H, D, ws, rs, head_split))
    check_union_parity(case, head_split, causal, op_cls, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", UNION_CASES, ids=[f"B{c[0]}-T{c[1]}-D{c[3]}" for c in UNION_CASES])
def test_gpu_union_split_config_parity(case, causal, monkeypatch):
    """head_split launches with many tiles take SPLIT_CONFIG (the cases above, few tiles, take
    SMALL_CONFIG): the same parity with SMALL_TILES = 0."""
    from longctx.kernels import union
    monkeypatch.setattr(union, "SMALL_TILES", 0)
    B, T, H, D, ws, rs = case
    lay = union.layout(T, H, D, ws, rs, True)
    assert union.config_for(torch.empty(B, T, H, D, device="cuda"), lay) is union.SPLIT_CONFIG
    check_union_parity(case, True, causal, ImprovedDilatedAttention, torch.bfloat16)


HOPPER_CASES = [  # heads of 64: the layouts whose local backward passes run hopper.py's kernels on sm_90
    (2, 4096, 12, 64, [256, 512, 1024, 2048], [1, 2, 4, 8]),
    (1, 3072, 6, 64, [256, 512, 1024], [1, 2, 4]),  # three top-level segments, fewer heads than offsets
    (1, 1024, 4, 64, [64, 128, 256], [1, 2, 4]),  # one 64-row tile a segment: the diagonal only
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", HOPPER_CASES, ids=[f"B{c[0]}-T{c[1]}-L{c[4][0]}" for c in HOPPER_CASES])
def test_gpu_hopper_backward_parity(case, causal, dtype, monkeypatch):
    """On an sm_90 GPU the union backward's local dQ and dK/dV passes are the Gluon kernels
    (hopper.py), on q/k/v views of one fused projection: each runs once (counted), and the
    gradients keep the parity rule against the float64 reference."""
    calls = hopper_on(monkeypatch)
    check_union_parity(case, False, causal, ImprovedDilatedAttention, dtype)
    # once each, without RoPE (test_gpu_rotary_op_trains_like_rope_then_the_op rotates)
    assert calls == [("local_dq", False), ("local_dkdv", False)]


def hopper_on(monkeypatch) -> list:
    """hopper.py's Gluon backward passes switched on (skipping off sm_90), each call of them
    recorded as (name, whether it got RoPE's tables) in the list returned."""
    from longctx.kernels import hopper
    rope = lambda args: args[-1] is not None
    return sm90_kernels_on(monkeypatch, hopper, {"local_dq": rope, "local_dkdv": rope})


def sm90_kernels_on(monkeypatch, module, record: dict) -> list:
    """module's sm_90 kernels switched on (ENABLED; skipping off sm_90, where the Triton passes
    run and the union tests check them), each call of the functions named in `record` kept in
    the list returned as (name, record[name](its positional arguments))."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{module.__name__}'s kernels are for sm_90 GPUs; other GPUs run the Triton passes")
    monkeypatch.setattr(module, "ENABLED", True)
    calls = []
    for name, what in record.items():
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, name=name, what=what, real=real, **kw:
                            calls.append((name, what(a))) or real(*a, **kw))
    return calls


CUDA_CASES = [  # bf16 heads of 64, segments of whole 128-row items: hopper_cuda.py's local passes
    (2, 4096, 12, 64, [256, 512, 1024, 2048], [1, 2, 4, 8]),
    (1, 3072, 6, 64, [256, 512, 1024], [1, 2, 4]),  # three top-level segments, fewer heads than offsets
    (1, 4096, 4, 64, [256, 512, 1024, 2048, 4096], [1, 2, 4, 8, 16]),  # five branches' weights (the most)
    (1, 2048, 4, 64, [128, 256, 512, 1024], [1, 2, 4, 8]),  # one item a segment: the diagonal only
]
CUDA_UPPER_CASES = [  # segments of at least 128·2^(n−1) rows: the upper passes in CUDA too (hopper_cuda.takes_upper)
    (1, 4096, 3, 64, [512, 1024, 2048], [1, 2, 4]),  # three classes' tiles, two top-level segments
    (2, 2048, 6, 64, [256, 512], [1, 2]),  # two branches: one class, one level
    (1, 8192, 2, 64, [1024, 2048, 4096, 8192], [1, 2, 4, 8]),  # four branches: levels 2-4
]
CUDA_SPLIT_CASES = [  # head_split: each head group's rows 2^i apart, read in place through its own maps
    (2, 8192, 8, 64, [1024, 2048, 4096], [1, 2, 4]),  # the seed preset's layout, groups of 3, 3, 2 heads
    (1, 3072, 5, 64, [128, 256, 512], [1, 2, 4]),  # groups of 2, 2, 1; six top-level segments
    (1, 2048, 4, 64, [128, 256, 512, 1024], [1, 2, 4, 8]),  # four branches (the most), one head each
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case,head_split,upper",
                         [(c, False, False) for c in CUDA_CASES] + [(c, False, True) for c in CUDA_UPPER_CASES]
                         + [(c, True, False) for c in CUDA_SPLIT_CASES],
                         ids=[f"B{c[0]}-T{c[1]}-n{len(c[4])}" for c in CUDA_CASES]
                         + [f"upper-B{c[0]}-T{c[1]}-n{len(c[4])}" for c in CUDA_UPPER_CASES]
                         + [f"split-B{c[0]}-T{c[1]}-n{len(c[4])}" for c in CUDA_SPLIT_CASES])
def test_gpu_hopper_cuda_parity(case, head_split, upper, causal, monkeypatch):
    """With LONGCTX_HOPPER_CUDA on, on an sm_90 GPU, the union op's local passes are the CUDA
    kernels (hopper_cuda.py, counted: the forward, then dQ making STATS and dK/dV), and with
    segments of at least 128·2^(n−1) rows the upper passes too, on q/k/v views of one fused
    projection; the output and all three gradients keep the parity rule, with head_split too
    (where the kernels also zero what each head's branch skips)."""
    calls = hopper_cuda_on(monkeypatch)
    check_union_parity(case, head_split, causal, ImprovedDilatedAttention, torch.bfloat16)
    n = len(case[4])
    want = [("local_forward", n), ("upper_forward", n), ("local_backward", n), ("upper_backward", n)]
    assert calls == (want if upper else want[::2])


@pytest.mark.parametrize("case,dtype", [(HOPPER_CASES[2], torch.bfloat16), (CUDA_CASES[1], torch.float16)],
                         ids=["L64-bf16", "L256-fp16"])
def test_gpu_hopper_cuda_leaves_what_it_cannot_take(case, dtype, monkeypatch):
    """Switched on, the CUDA passes leave 64-row segments (half an item) and fp16 to the other
    passes: no call, and the same parity."""
    calls = hopper_cuda_on(monkeypatch)
    check_union_parity(case, False, True, ImprovedDilatedAttention, dtype)
    assert calls == []


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ws,upper", [([256, 512, 1024], False), ([512, 1024, 2048], True)], ids=["L256", "L512-upper"])
def test_gpu_hopper_cuda_under_rotary(ws, upper, causal, monkeypatch):
    """The LM block's path (attention/rotary.attend and attend_backward): rotated q and k in their
    own buffer, v a view of the fused projection (three row strides), the gradients views of one
    packed (B, T, 3, H, D) buffer, dQ and dK rotated back in the CUDA epilogue. Against the path
    off (the Triton forward and the Gluon backward, each checked against the reference above):
    the output, the LSE and the packed gradient within bf16 rounding; with 512-row segments the
    upper passes in CUDA too, dQ and dK added and rotated back in their epilogues."""
    from longctx.attention import rotary
    from longctx.model import Rotary

    B, T, H, D = 2, 2048, 6, 64
    config = (ws, [1, 2, 4], False, causal, D ** -0.5)
    g = torch.Generator(device="cuda").manual_seed(7)
    qkv, dout = (torch.randn(B, T, *s, D, device="cuda", dtype=torch.bfloat16, generator=g) for s in ((3, H), (H,)))
    cos, sin = (x.reshape(T, D // 2).contiguous() for x in Rotary(D).angles(T, 0, "cuda"))

    def run():
        out, lse, rotated = rotary.attend(qkv, cos, sin, *config)
        return out, lse, rotary.attend_backward(dout, qkv, rotated, cos, sin, out, lse, *config)

    want = run()
    calls = hopper_cuda_on(monkeypatch)
    out, lse, dqkv = run()
    passes = [("local_forward", 3), ("upper_forward", 3), ("local_backward", 3), ("upper_backward", 3)]
    assert calls == (passes if upper else passes[::2])
    # two roundings to bf16 of float32 results that differ in their last bits: 2^-6 relative
    assert torch.allclose(out.float(), want[0].float(), rtol=1.6e-2, atol=2e-3)
    assert err(lse, want[1].double()) <= 1e-3
    for i, name in enumerate("qkv"):
        got, ref = dqkv[:, :, i].float(), want[2][:, :, i].float()
        assert (got - ref).norm() <= 1e-2 * ref.norm(), name


def hopper_cuda_on(monkeypatch) -> list:
    """hopper_cuda.py's local passes switched on (skipping off sm_90 or without nvcc), each call of
    them recorded in the list returned as (name, the layout's branch count)."""
    from longctx.kernels import hopper_cuda
    if hopper_cuda.nvcc() is None:
        pytest.skip("no nvcc to build hopper_cuda.py's kernels")
    # where each takes the layout
    return sm90_kernels_on(monkeypatch, hopper_cuda, {"local_forward": lambda a: a[5].n,
                                                      "upper_forward": lambda a: a[5].n,
                                                      "local_backward": lambda a: a[8].n,
                                                      "upper_backward": lambda a: a[6].n})


def check_union_parity(case, head_split, causal, op_cls, dtype):
    B, T, H, D, ws, rs = case
    g = torch.Generator(device="cuda").manual_seed(T + D)
    qkv, dout = (torch.randn(B, T, *s, D, device="cuda", dtype=torch.float64, generator=g) for s in ((3, H), (H,)))
    low = qkv.to(dtype).requires_grad_()
    out = op_cls(ws, rs, head_split=head_split)(*low.unbind(2), is_causal=causal)
    (grad,) = torch.autograd.grad(out, low, dout.to(dtype))
    exact_in = qkv.clone().requires_grad_()
    exact = reference_attention(*exact_in.unbind(2), ws, rs, causal, head_split=head_split)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, dout)
    ref_in = qkv.to(dtype).requires_grad_()
    ref = reference_attention(*ref_in.unbind(2), ws, rs, causal, head_split=head_split, dtype=dtype)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err(out, exact) <= 2 * err(ref, exact) + 1e-6
    for i, name in enumerate("qkv"):
        assert err(grad[:, :, i], exact_grad[:, :, i]) <= 2 * err(ref_grad[:, :, i], exact_grad[:, :, i]) + 1e-6, name


@pytest.mark.parametrize("compiled,gluon", [(False, False), (True, False), (False, True)],
                         ids=["eager", "compiled", "eager-hopper"])
def test_gpu_rotary_op_trains_like_rope_then_the_op(compiled, gluon, monkeypatch):
    """The LM in bf16 with RoPE inside the union op (attention/rotary.py) against the same model
    rotating q and k itself before the op (LONGCTX_ROTARY=0): the same loss, and gradients within
    bf16 rounding (relative norm), eagerly and under Inductor; `gluon`: with hopper.py's backward
    passes, whose epilogues rotate dQ and dK back (heads of 64 take them)."""
    import torch.nn.functional as F
    from longctx.attention import rotary
    from longctx.model import LongNetLM

    ropes = hopper_on(monkeypatch) if gluon else None

    torch.manual_seed(0)
    model = LongNetLM(256, 256, 2, 4, ImprovedDilatedAttention,
                      dict(segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4])).cuda()
    idx = torch.randint(0, 256, (2, 513), device="cuda")
    params = list(model.parameters())
    calls = []
    if not compiled:  # eagerly: which path each block took
        real = rotary.applies
        monkeypatch.setattr(rotary, "applies", lambda op, qkv: calls.append(real(op, qkv)) or calls[-1])
    results = []
    for enabled in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(rotary, "ENABLED", enabled)
        run = torch.compile(model) if compiled else model
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(run(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    assert calls == ([] if compiled else [False] * 2 + [True] * 2)  # per block, off then on
    if gluon:  # both passes in both blocks' backward, with RoPE once the op rotates
        assert ropes == ([("local_dq", False), ("local_dkdv", False)] * 2
                         + [("local_dq", True), ("local_dkdv", True)] * 2)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-3, atol=0)
    for a, b in zip(results[1][1], results[0][1]):
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm(), a.shape


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graphed"])
def test_gpu_decoding_matches_the_full_forward(graph):
    """Teacher-forced decoding in bf16 (the union kernels in prefill, the cache in decode; the
    step replayed from a CUDA graph or eager) against the full forward: within bf16 rounding."""
    from longctx.decode import Decoder
    from longctx.model import LongNetLM

    torch.manual_seed(0)
    model = LongNetLM(256, 256, 2, 4, ImprovedDilatedAttention,
                      dict(segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4])).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, 256, (2, 600), device="cuda")
    with torch.no_grad():
        full = model(idx).float()
    decoder = Decoder(model, 2, torch.bfloat16, "cuda")
    if graph:
        decoder.capture()
    logits = [decoder.prefill(idx[:, :300]).float().clone()]
    logits += [decoder.step(idx[:, t]).float().clone() for t in range(300, 599)]
    got, want = torch.stack(logits, 1), full[:, 299:599]
    assert (got - want).norm() <= 2e-2 * want.norm()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_gpu_chunked_loss_matches_the_plain_head_under_autocast():
    from longctx.loss import linear_cross_entropy
    import torch.nn.functional as F

    torch.manual_seed(0)
    h = torch.randn(5000, 256, device="cuda", requires_grad=True)
    w = torch.randn(32000, 256, device="cuda", requires_grad=True)
    t = torch.randint(0, 32000, (5000,), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, chunk=1024)
        plain = F.cross_entropy(F.linear(h, w).float(), t)
    g_ours, g_plain = torch.autograd.grad(ours, (h, w)), torch.autograd.grad(plain, (h, w))
    assert abs(ours.item() - plain.item()) <= 1e-3 * abs(plain.item())
    for a, b in zip(g_ours, g_plain):
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()
