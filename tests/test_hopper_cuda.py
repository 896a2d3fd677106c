"""The CUDA passes' switch, gates and place in the union op (longctx/kernels/hopper_cuda.py) on the
CPU; their parity with the reference is tests/test_gpu.py's test_gpu_hopper_cuda_parity, where their
rows are tests/test_ws_layout.py's."""
import ctypes
import re
import types
import warnings

import pytest
import torch

from longctx.kernels import hopper_cuda, union


@pytest.mark.parametrize("setting,enabled", [(None, False), ("0", False), ("1", True), ("yes", False)])
def test_cuda_forward_is_off_unless_the_environment_says_1(setting, enabled, reload_with_env):
    """Not yet measured faster than the Triton local pass, so only LONGCTX_HOPPER_CUDA=1 turns it on."""
    assert reload_with_env(hopper_cuda, "LONGCTX_HOPPER_CUDA", setting).ENABLED is enabled


def test_watchdog_build_is_its_own_library(reload_with_env):
    """LONGCTX_CUDA_WATCHDOG=1 compiles the waits that trap instead of hanging (a debugging aid for
    the probes): another define, so another library beside the plain one, never mistaken for it."""
    plain = reload_with_env(hopper_cuda, "LONGCTX_CUDA_WATCHDOG", None)
    assert not plain.WATCHDOG and not any("WS_WATCHDOG" in flag for flag in plain.FLAGS)
    plain_lib = plain.target()
    watched = reload_with_env(hopper_cuda, "LONGCTX_CUDA_WATCHDOG", "1")
    assert watched.WATCHDOG and sum(flag.startswith("-DWS_WATCHDOG=") for flag in watched.FLAGS) == 1
    assert watched.target() != plain_lib and watched.target().parent == plain_lib.parent


def test_the_library_is_named_by_every_source_and_header():
    """target() digests SOURCES and HEADERS: every .cu and .cuh file the build compiles or includes,
    so that an edited header can never load a library built before the edit."""
    folder = hopper_cuda.SOURCES[0].parent
    assert set(hopper_cuda.SOURCES) == set(folder.glob("*.cu"))
    assert set(hopper_cuda.HEADERS) == set(folder.glob("*.cuh"))


def test_without_nvcc_the_other_passes_run_after_one_warning(monkeypatch):
    """No CUDA compiler: build says so, and available() warns once and answers False (cached),
    so the union op keeps its Triton and Gluon local passes instead of failing."""
    monkeypatch.setattr(hopper_cuda, "nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="no nvcc"):
        hopper_cuda.build()
    hopper_cuda.library.cache_clear()
    hopper_cuda.available.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert hopper_cuda.available() is False
            assert hopper_cuda.available() is False
        assert len(caught) == 1 and "the other local passes run" in str(caught[0].message)
    finally:
        hopper_cuda.library.cache_clear()
        hopper_cuda.available.cache_clear()


def test_cuda_forward_takes_only_bf16_heads_of_64_read_in_place(monkeypatch):
    """readable: bf16, D = 64, rows one TMA map reads (a fused projection's views too); and the
    gate never opens for CPU tensors, switched on or not."""
    qkv = torch.zeros(2, 256, 3, 4, 64, dtype=torch.bfloat16)
    assert hopper_cuda.readable(*qkv.unbind(2))
    assert hopper_cuda.readable(torch.zeros(2, 256, 4, 64, dtype=torch.bfloat16))
    assert not hopper_cuda.readable(qkv.unbind(2)[0].half())
    assert not hopper_cuda.readable(torch.zeros(2, 256, 4, 32, dtype=torch.bfloat16))
    assert not hopper_cuda.readable(torch.zeros(2, 4, 256, 64, dtype=torch.bfloat16).transpose(1, 2))  # heads apart
    monkeypatch.setattr(hopper_cuda, "ENABLED", True)
    lay = union.layout(256, 4, 64, [128, 256], [1, 2], False)
    assert not hopper_cuda.use_forward(*qkv.unbind(2), lay)


@pytest.mark.parametrize("T,H,ws,rs,head_split,taken", [
    (4096, 12, [256, 512, 1024, 2048], [1, 2, 4, 8], False, True),
    (8192, 8, [1024, 2048, 4096], [1, 2, 4], True, True),  # the seed preset's layout
    (4096, 4, [256, 512, 1024, 2048, 4096], [1, 2, 4, 8, 16], False, True),  # five branches' weights, the most
    (32768, 6, [1024 << i for i in range(6)], [1 << i for i in range(6)], False, False),  # six: too many
    (2048, 4, [128, 256, 512, 1024], [1, 2, 4, 8], True, True),  # head_split over four, one map a dilation
    (4096, 5, [128, 256, 512, 1024, 2048], [1, 2, 4, 8, 16], True, False),  # over five: no fifth map
    (1024, 4, [64, 128, 256], [1, 2, 4], False, False),  # 64-row segments: not whole 128-row items
    (3072, 6, [192, 384, 768], [1, 2, 4], True, False),  # 192 rows: one and a half items
])
def test_cuda_kernels_take_whole_items_and_their_branch_limits(T, H, ws, rs, head_split, taken):
    """takes(): which union layouts the CUDA kernels compute (the rest keep the Triton and Gluon
    passes): segments of whole 128-row items; weight terms of at most five branches; head_split
    over at most four (a tensor map for each dilation 1, 2, 4, 8)."""
    lay = union.layout(T, H, 64, ws, rs, head_split)
    assert lay is not None, "a layout the union kernels take"
    assert hopper_cuda.takes(lay) is taken


def test_union_runs_the_cuda_passes_in_place_of_the_triton_ones(monkeypatch):
    """Where the CUDA kernels take the upper passes too, union.forward and union.backward run
    hopper_cuda's four passes (local, then upper, each direction) and no Triton pass of their own.
    Each CUDA pass stood in for by the Triton pass it replaces (interpreted), the op's output, LSE
    and gradients equal the plain op's: an upper pass run twice, skipped, or run before the local
    pass that makes what it reads would change them."""
    if not union.SUPPORTED:
        pytest.skip("needs Triton >= 3.6 (installed by the test extra)")
    B, T, H, D, causal, scale = 1, 512, 2, 64, True, 0.3
    lay = union.layout(T, H, D, [256, 512], [1, 2], False)
    assert hopper_cuda.takes(lay) and hopper_cuda.takes_upper(lay)
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(B, T, H, D, generator=g) for _ in range(4))

    def run():
        out, lse = union.forward(q, k, v, lay, causal, scale)
        return out, lse, *union.backward(dout, q, k, v, out, lse, lay, causal, scale)

    want = run()
    calls = []

    def forward(name, passes):  # the Triton forward pass that a CUDA one replaces, recorded
        def stand_in(q, k, v, out, lse, *_):
            calls.append(name)
            union.triton_forward(q, k, v, out, lse, lay, causal, scale, passes)
        return stand_in

    def backward(name, passes, dout, out, lse, stats, grads):  # the same for the backward's two
        calls.append(name)
        for direction in ("dq", "dkdv"):
            union.triton_backward(direction, dout, q, k, v, out, lse, stats, grads, lay, causal, scale, passes)

    monkeypatch.setattr(hopper_cuda, "use_forward", lambda *a: True)
    monkeypatch.setattr(hopper_cuda, "use_backward", lambda *a: True)
    monkeypatch.setattr(hopper_cuda, "local_forward", forward("local_forward", ("local",)))
    monkeypatch.setattr(hopper_cuda, "upper_forward", forward("upper_forward", ("upper",)))
    monkeypatch.setattr(hopper_cuda, "local_backward", lambda q, k, v, dout, out, lse, stats, grads, *_:
                        backward("local_backward", ("local",), dout, out, lse, stats, grads))
    monkeypatch.setattr(hopper_cuda, "upper_backward", lambda q, k, v, dout, stats, grads, *_:  # (reads no O, LSE)
                        backward("upper_backward", ("upper",), dout, dout, stats, stats, grads))
    got = run()
    assert calls == ["local_forward", "upper_forward", "local_backward", "upper_backward"]
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        assert torch.equal(a, b), name


def c_prototypes() -> dict:
    """The C entry points of hopper_cuda.SOURCES: name -> [(C type, parameter name)], in order."""
    found = {}
    for path in hopper_cuda.SOURCES:
        for name, params in re.findall(r'extern "C" int (\w+)\(([^)]*)\)', path.read_text()):
            found[name] = [re.fullmatch(r"(.*?)\s*(\w+)", " ".join(p.split())).groups() for p in params.split(",")]
    return found


def test_declared_argument_types_are_the_c_prototypes():
    """hopper_cuda.SIGNATURES, which ctypes converts every call's arguments by, against the
    prototypes in the .cu sources: the same entry points, the same count, and each argument's type
    (a pointer, long long, int or float), so that no argument is shifted into its neighbour's place."""
    def ctype(c: str):
        return (ctypes.c_void_p if "*" in c else ctypes.c_longlong if c == "long long" else ctypes.c_float
                if c == "float" else ctypes.c_int if c == "int" else c)
    prototypes = c_prototypes()
    assert set(prototypes) == set(hopper_cuda.SIGNATURES) == {"ws_fwd", "ws_bwd", "ws_fwd_upper", "ws_bwd_upper"}
    for name, params in prototypes.items():
        assert [ctype(c) for c, _ in params] == hopper_cuda.SIGNATURES[name], name


def test_each_call_passes_every_argument_in_its_place(monkeypatch):
    """attend, gradients, upper_attend and upper_gradients against the prototypes' parameter
    names: each value where its name is (the C side recorded, not run), with tensors of distinct
    row strides and sizes that differ from each other, so that two swapped arguments show."""
    calls = []
    monkeypatch.setattr(hopper_cuda, "library", lambda: types.SimpleNamespace(
        **{name: types.SimpleNamespace(__name__=name) for name in hopper_cuda.SIGNATURES}))
    monkeypatch.setattr(hopper_cuda, "_call", lambda fn, *args: calls.append((fn.__name__, args)))
    B, T, H, W, scale = 3, 1024, 6, 256, 0.3
    bf16 = dict(dtype=torch.bfloat16)
    q = torch.zeros(B, T, 3, H, 64, **bf16)[:, :, 0]  # rows 3·H·64 apart, as the fused projection's
    k = torch.zeros(B, T, 2, H, 64, **bf16)[:, :, 1]
    v = torch.zeros(B, T, 4, H, 64, **bf16)[:, :, 2]
    dout, out = (torch.zeros(B, T, H, 64, **bf16) for _ in range(2))
    grads = tuple(torch.zeros(B, T, 5, H, 64, **bf16)[:, :, i] for i in range(3))  # a packed gradient's slots
    lse, stats = torch.zeros(B, T, H), torch.zeros(2, B * H, T)
    cos, sin = torch.zeros(T, 32), torch.zeros(T, 32)
    ptr = lambda x: x.data_ptr()
    rows = dict(q=ptr(q), k=ptr(k), v=ptr(v), q_row=q.stride(1), k_row=k.stride(1), v_row=v.stride(1), B=B, T=T,
                H=H, L=W, scale=pytest.approx(scale))
    bwd = dict(rows, dout=ptr(dout), do_row=dout.stride(1), stats=ptr(stats), grad_row=grads[0].stride(1))
    hopper_cuda.attend(q, k, v, out, lse, W, scale, True, 5, "ping-pong", ctas=7, split=4)
    want = [dict(rows, out=ptr(out), out_row=out.stride(1), lse=ptr(lse), causal=1, branches=5, split=4, mode=2,
                 ctas=7)]
    hopper_cuda.gradients(q, k, v, dout, stats, grads[:1], W, scale, True, 5, True, ctas=7, out=out, lse=lse,
                          rope=(cos, sin), overlap=False, split=4)
    want.append(dict(bwd, out=ptr(out), out_row=out.stride(1), lse=ptr(lse), rope_cos=ptr(cos), rope_sin=ptr(sin),
                     grad0=ptr(grads[0]), grad1=ptr(grads[0]), causal=1, branches=5, split=4, dq=1, overlap=0,
                     ctas=7))
    hopper_cuda.gradients(q, k, v, dout, stats, grads[1:], W, scale, False, 2, False, ctas=9, overlap=True)
    want.append(dict(bwd, out=None, out_row=0, lse=None, rope_cos=None, rope_sin=None, grad0=ptr(grads[1]),
                     grad1=ptr(grads[2]), causal=0, branches=2, split=0, dq=0, overlap=1, ctas=9))
    hopper_cuda.upper_attend(q, k, v, out, lse, W, scale, True, 5, ctas=7)
    want.append(dict(rows, out=ptr(out), out_row=out.stride(1), lse=ptr(lse), causal=1, branches=5, ctas=7))
    hopper_cuda.upper_gradients(q, k, v, dout, stats, grads[1:], W, scale, False, 4, False, ctas=9, rope=(cos, sin))
    want.append(dict(bwd, rope_cos=ptr(cos), rope_sin=ptr(sin), grad0=ptr(grads[1]), grad1=ptr(grads[2]), causal=0,
                     branches=4, dq=0, ctas=9))
    prototypes = c_prototypes()
    assert [name for name, _ in calls] == ["ws_fwd", "ws_bwd", "ws_bwd", "ws_fwd_upper", "ws_bwd_upper"]
    for (name, args), expected in zip(calls, want):
        params = [p for _, p in prototypes[name]]
        assert params[-1] == "stream" and len(args) == len(params) - 1, name  # _call appends the stream
        assert dict(zip(params, args)) == expected, name
