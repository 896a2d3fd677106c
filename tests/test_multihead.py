"""MultiheadDilatedAttention and ImprovedMultiheadDilatedAttention (docs/design.md#the-six-variants)."""
import pytest
import torch

from longctx.attention import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention
from reference import reference_attention

CLASSES = [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention]
E, H, WS, RS = 32, 4, [8, 16], [1, 2]


def build(cls, **kw):
    torch.manual_seed(0)
    return cls(E, H, WS, RS, **kw)


def rand(B=2, T=24, dtype=torch.float32, seed=1):
    return torch.randn(B, T, E, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_matches_hand_computation(layer_norm, causal):
    m = build(MultiheadDilatedAttention, layer_norm=layer_norm).double()
    x = rand(T=21).double()
    rope = lambda t: 2.0 * t  # any callable on (B, T, H, D); scaling q and k scales the scores by 4
    out, weights = m(x, is_causal=causal, rope=rope)
    assert weights is None

    def proj(lin):
        return (x @ lin.weight.T + lin.bias).unflatten(-1, (H, E // H))

    q, k, v = proj(m.q_proj), proj(m.k_proj), proj(m.v_proj)
    attn = reference_attention(2 * q, 2 * k, v, WS, RS, causal).flatten(-2)
    if layer_norm:
        mu, var = attn.mean(-1, keepdim=True), attn.var(-1, unbiased=False, keepdim=True)
        attn = (attn - mu) / torch.sqrt(var + 1e-5) * m.norm.weight + m.norm.bias
    expected = attn @ m.out_proj.weight.T + m.out_proj.bias
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_split", [False, True])
def test_improved_equals_multihead_with_same_weights(causal, head_split, dtype):
    ref = build(MultiheadDilatedAttention, head_split=head_split).to(dtype)
    imp = ImprovedMultiheadDilatedAttention(E, H, WS, RS, head_split=head_split).to(dtype)
    imp.load_state_dict(ref.state_dict(), strict=True)
    x = rand(T=29, dtype=dtype)
    outs, grads = [], []
    for m in (ref, imp):
        xi = x.clone().requires_grad_()
        out, _ = m(xi, is_causal=causal)
        out.square().sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters()} | {"input": xi.grad})
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    # float32 sums in another order: tolerance relative to the gradients' scale (k_proj.bias's
    # true gradient is 0, softmax being shift-invariant, so its own scale is rounding noise)
    scale = max(g.abs().max().item() for g in grads[0].values())
    for name, g in grads[0].items():
        atol = 1e-5 * scale if dtype == torch.float32 else None
        torch.testing.assert_close(g, grads[1][name], atol=atol, rtol=None if atol is None else 1.3e-6, msg=name)


def test_state_dicts_are_interchangeable():
    a, b = build(MultiheadDilatedAttention), build(ImprovedMultiheadDilatedAttention)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)
    assert set(sa) == {f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj", "norm") for w in ("weight", "bias")}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_parameter_gets_a_gradient(cls):
    m = build(cls)
    out, _ = m(rand(), is_causal=True)
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dtype_matrix(cls, dtype):
    m32 = build(cls)
    m = build(cls).to(dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    x = rand()
    out, _ = m(x.to(dtype).requires_grad_(), is_causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.float(), m32(x, is_causal=True)[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dtype_mismatch_is_a_clear_error(cls):
    m = build(cls)
    with pytest.raises(ValueError, match=r"query dtype torch.bfloat16 does not match the parameters' dtype torch.float32: cast the module"):
        m(rand().bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(rand().bfloat16())
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_causal_outputs_never_see_the_future(cls):
    m = build(cls)
    x = rand(T=32)
    base, _ = m(x, is_causal=True)
    for t in (0, 7, 17, 31):
        y = x.clone()
        y[:, t] += 3.0
        out, _ = m(y, is_causal=True)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_flops_include_projections(cls):
    m = build(cls)
    B, T = 2, 64
    assert m.flops(B, T) == 8 * B * T * E * E + m.attention.flops(B, T, H, E // H)
    assert m.flops(B, T, is_causal=True) == 8 * B * T * E * E + m.attention.flops(B, T, H, E // H, True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_errors(cls):
    m = build(cls)
    x = rand()
    with pytest.raises(NotImplementedError, match="cannot honour attn_mask/key_padding_mask"):
        m(x, attn_mask=torch.ones(24, 24, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="cannot honour attn_mask/key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(2, 24, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        m(x, need_weights=True)
    with pytest.raises(ValueError, match=r"query has shape \(24, 32\): expected \(batch, seq, embed_dim=32\)"):
        m(x[0])
    with pytest.raises(ValueError, match="must have the same shape"):
        m(x, x[:, :8], x[:, :8])
    with pytest.raises(ValueError, match="embed_dim=30 is not divisible by num_heads=4"):
        cls(30, 4, WS, RS)
    with pytest.raises(ValueError, match="num_heads=0 must be a positive integer"):
        cls(32, 0, WS, RS)
    with pytest.raises(ValueError, match="segment length 10 is not divisible by dilation rate 4"):
        cls(32, 4, [10], [4])
