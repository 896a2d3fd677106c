"""The decode step's split-rows attention kernel (longctx/kernels/decode.py) against softmax
attention written out in float64. Without a GPU it runs in Triton's interpreter."""
import pytest
import torch

from longctx.kernels import SUPPORTED
from longctx.kernels import decode

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs Triton >= 3.6")


def reference(q, k, v, valid, scale):
    s = torch.einsum("bhd,bhrd->bhr", q.double(), k.double()) * scale
    s = s.masked_fill(~valid[None], float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)  # a head with no valid row: all weights 0
    return torch.einsum("bhr,bhrd->bhd", w, v.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_attention_matches_softmax_over_the_valid_rows(monkeypatch, dtype):
    # Small chunks: R = 100 rows make four chunks of 32, the last one partly past R.
    monkeypatch.setattr(decode, "CHUNK", 32)
    monkeypatch.setattr(decode, "ROWS", 16)
    monkeypatch.setattr(decode, "MERGE", 2)  # the merge loops over the chunks two at a time
    g = torch.Generator().manual_seed(0)
    B, H, R, D = 2, 4, 100, 16
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = (3 * torch.randn(B, H, R, D, generator=g)).to(dtype)  # wide scores: the running max moves
    v = torch.randn(B, H, R, D, generator=g).to(dtype)
    valid = torch.rand(H, R, generator=g) < 0.6
    valid[1] = False  # a head with no valid row
    valid[2] = False
    valid[2, 70:75] = True  # only the third chunk: the others hold no valid row
    out = decode.attend(q, k, v, valid, 0.25)
    expected = reference(q, k, v, valid, 0.25)
    assert out.dtype == dtype and out.shape == (B, H, D)
    assert torch.all(out[:, 1] == 0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_store_writes_the_kept_heads_rows_and_nothing_else():
    g = torch.Generator().manual_seed(1)
    B, H, R, D, nb = 2, 3, 10, 8, 2
    k_cache, v_cache = torch.randn(B, H, R, D, generator=g), torch.randn(B, H, R, D, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(B, 1, 3, H, D, generator=g)  # strided views, as the step's projection makes them
    k, v = qkv[:, 0, 1], qkv[:, 0, 2]
    kept = torch.tensor([[True, False, True], [False, True, False]])
    rows = torch.tensor([[0, 0, 4], [5, 9, 5]])  # (branch, head): row 0 of head 1 is not written
    decode.store(k, v, k_cache, v_cache, kept, rows)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for i, h in [(0, 0), (0, 2), (1, 1)]:
        expected_k[:, h, rows[i, h]] = k[:, h]
        expected_v[:, h, rows[i, h]] = v[:, h]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
