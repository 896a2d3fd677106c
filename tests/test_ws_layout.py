"""The CUDA Hopper kernels' geometry, checked on the CPU: longctx/kernels/csrc/ws_layout.cuh (their
work items, λ and weight terms, written to compile for the host too) built with the host's C++
compiler into tests/ws_layout_pairs.cpp, which scores nothing but lists, per direction, every
(query, key) pair the local and upper passes visit and the weight each gets, read through the
kernels' accumulator layout. Against tests/reference.py's pair counts (the branches' key sets,
independent of the kernels): every pair of the layout visited exactly once, no other pair, and
its weight the number of branches that share it. The kernels' arithmetic and synchronisation
are the GPU tests' (tests/test_gpu.py -k hopper_cuda)."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from longctx.kernels import hopper_cuda, union
from reference import pair_counts

ROOT = Path(__file__).resolve().parent.parent
COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("no host C++ compiler (g++ or c++) to build tests/ws_layout_pairs.cpp")
    exe = tmp_path_factory.mktemp("ws_layout") / "pairs"
    subprocess.run([COMPILER, "-O2", "-std=c++17", "-I", str(ROOT / "longctx/kernels/csrc"),
                    str(ROOT / "tests/ws_layout_pairs.cpp"), "-o", str(exe)], check=True)
    return exe


CASES = [  # (B, T, H, segment lengths, dilations, head_split); each causal and not
    (1, 2048, 3, [512, 1024, 2048], [1, 2, 4], False),  # the upper passes' three classes of tiles, three offsets
    (2, 1024, 2, [256, 512], [1, 2], False),  # two branches, two batch elements, two top-level segments
    (1, 2048, 4, [128, 256, 512, 1024], [1, 2, 4, 8], False),  # local passes only (L < 128·2^3), four branches
    (2, 1024, 3, [128, 256, 512], [1, 2, 4], True),  # head_split: groups of one head, rows 2^i apart
    (1, 2048, 5, [256, 512, 1024], [1, 2, 4], True),  # groups of 2, 2, 1
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-n{len(c[3])}{'-split' * c[5]}" for c in CASES])
def test_cuda_kernels_visit_each_pair_once_with_its_weight(driver, tmp_path, case, causal):
    B, T, H, ws, rs, head_split = case
    lay = union.layout(T, H, 64, ws, rs, head_split)
    assert lay is not None and hopper_cuda.takes(lay), "a layout the CUDA kernels take"
    upper = hopper_cuda.takes_upper(lay)
    assert upper == (not head_split and ws[0] >= 128 << (len(rs) - 1))
    out = tmp_path / "pairs.bin"
    subprocess.run([str(driver), str(B), str(T), str(H), str(lay.L), str(lay.n), str(lay.n if head_split else 0),
                    str(int(causal)), str(int(upper)), str(out)], check=True)
    got = np.fromfile(out, dtype=np.uint8).reshape(3, 2, B, H, T, T)
    want = pair_counts(T, H, ws, rs, causal, head_split).numpy().astype(np.uint8)
    for direction, (count, weight) in zip(("forward", "dQ", "dK/dV"), got):
        for b in range(B):
            if not upper and not head_split:  # the local passes alone: the pairs of level 1
                level1 = want * local_mask(T, ws[0])
                assert np.array_equal(count[b], (level1 > 0).astype(np.uint8)), direction
                assert np.array_equal(weight[b][level1 > 0], level1[level1 > 0]), direction
                continue
            assert count[b].max() == 1, f"{direction}: a pair visited twice"
            assert np.array_equal(count[b], (want > 0).astype(np.uint8)), f"{direction}: pairs missed or extra"
            assert np.array_equal(weight[b][want > 0], want[want > 0]), f"{direction}: weights"


def local_mask(T: int, L: int) -> np.ndarray:
    """(T, T): 1 where query and key share an L-segment (the local passes' level)."""
    seg = np.arange(T) // L
    return (seg[:, None] == seg[None, :]).astype(np.uint8)


@pytest.mark.parametrize("T,H,ws,rs,head_split,upper", [
    (32768, 12, [2048 << i for i in range(5)], [1 << i for i in range(5)], False, True),  # the long preset
    (4096, 12, [256, 512, 1024, 2048], [1, 2, 4, 8], False, False),  # L < 128·2^3: class tiles would straddle
    (8192, 8, [1024, 2048, 4096], [1, 2, 4], True, False),  # head_split has no upper levels
    (2048, 6, [256, 512], [1, 2], False, True),
])
def test_cuda_upper_passes_take_tiles_of_one_class_within_a_segment(T, H, ws, rs, head_split, upper):
    lay = union.layout(T, H, 64, ws, rs, head_split)
    assert lay is not None
    assert hopper_cuda.takes_upper(lay) is upper
