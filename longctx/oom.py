"""Out of memory: the run's size and the memory savers it does not use yet, in one paragraph."""
from __future__ import annotations

# The CPU allocator's words for an allocation that failed (Linux/macOS, Windows).
HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_host_oom(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(words in str(error) for words in HOST_OOM)


def oom_message(model, datamodule, error: Exception, device: str = "GPU") -> str:
    """The run's size and the memory savers it does not use yet."""
    h = model.hparams
    cp = model.layout.cp_size
    batch = getattr(datamodule, "batch_size", "?")
    on_gpu = device == "GPU"
    hints = []
    if not h.activation_checkpointing:
        hints.append("model.activation_checkpointing=true")
    if not h.mlp_chunk_tokens:
        hints.append("model.mlp_chunk_tokens=131072 (the SwiGLU in chunks, as configs/seq/1m.yaml)")
    if on_gpu and h.activation_checkpointing and not getattr(h, "offload_checkpoints", False) and not h.compile:
        hints.append("model.offload_checkpoints=true (the checkpointed blocks' inputs in host memory: 2M tokens "
                     "fit an 80 GB H100)")
    if on_gpu and h.compile:
        hints.append("model.compile=false (eager, configs/seq/1m.yaml's step peaks at 60 GiB on an H100, "
                     "compiled at 67-70 GiB)")
    if batch != 1:
        hints.append("a smaller data.batch_size")
    hints.append(f"a ring variant over more {'GPUs' if on_gpu else 'processes'} "
                 "(configs/attention/ring_dilated.yaml)")
    said = str(error)
    said = said[said.index("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in said else said
    return (f"out of {device} memory training {model.variant} at seq_len {h.seq_len} ({h.seq_len // cp} tokens per "
            f"rank), batch_size {batch}, {h.n_layers} layers x d_model {h.d_model}, "
            f"activation_checkpointing={h.activation_checkpointing}. Try {', '.join(hints)}. "
            f"PyTorch said: {said.splitlines()[0][:300]}")
