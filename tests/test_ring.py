"""RingDilatedAttention in real multi-process gloo groups (P = 2 and 4) against the
single-process reference on the full sequence, outputs and gradients."""
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import ring_workers
from longctx.attention import ImprovedDilatedAttention, RingDilatedAttention
from longctx.kernels import SUPPORTED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, out_dir) -> list[int]:
    """Run fn on `world` gloo ranks (a rank's failed assertion raises here); return what each
    rank reports it checked."""
    mp.start_processes(fn, args=(world, free_port(), str(out_dir)), nprocs=world, join=True, start_method="spawn")
    return [int((out_dir / f"rank{r}.txt").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_reference(world, tmp_path):
    checked = spawn(ring_workers.core_cases, world, tmp_path)
    # (case, causal) pairs whose layout this world size serves, each checked on every rank
    assert checked == [{2: 8, 4: 10}[world]] * world  # P=2 cannot serve the last case (72 % 48)


@pytest.mark.skipif(not SUPPORTED, reason="needs Triton >= 3.6 (installed by the test extra)")
def test_ring_through_combine_matches_reference(tmp_path):
    assert spawn(ring_workers.core_cases_combined, 2, tmp_path) == [8, 8]


def test_ring_multihead_parameter_gradients(tmp_path):
    assert spawn(ring_workers.multihead_case, 2, tmp_path) == [10, 10]  # all 10 parameters compared


def test_layout_errors_are_raised_on_every_rank(tmp_path):
    assert spawn(ring_workers.layout_error, 2, tmp_path) == [2, 2]


def test_a_failing_rank_does_not_hang_the_others():
    code = (
        "import sys; sys.path.insert(0, 'tests'); import torch.multiprocessing as mp, ring_workers, test_ring;"
        "mp.start_processes(ring_workers.one_rank_fails, args=(2, test_ring.free_port()), nprocs=2, start_method='spawn')"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rank 0 failed on purpose" in proc.stderr
    assert time.monotonic() - start < 120


def test_single_rank_is_exactly_improved():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 4, 8, generator=g).requires_grad_() for _ in range(3))
    ws, rs = [8, 16, 64], [1, 2, 4]
    for causal in (False, True):
        a = ImprovedDilatedAttention(ws, rs)(q, k, v, is_causal=causal)
        b = RingDilatedAttention(ws, rs)(q, k, v, is_causal=causal)
        assert torch.equal(a, b)
        da, db = (torch.autograd.grad(o, (q, k, v), torch.ones_like(o)) for o in (a, b))
        assert all(torch.equal(x, y) for x, y in zip(da, db))
