"""The CUDA local passes' switch and gates (longctx/kernels/hopper_cuda.py) on the CPU; their parity
with the reference is tests/test_gpu.py's test_gpu_hopper_cuda_parity."""
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
