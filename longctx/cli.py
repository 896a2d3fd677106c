"""The project's LightningCLI: `python train.py fit --config configs/X.yaml`."""
from __future__ import annotations

import os
import sys

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from .data import TextDataModule
from .lit_module import LongContextLM
from .model import resolve_attention, variant_name


def run_name(attention: dict | None, seq_len: int) -> str:
    """e.g. improved_dilated-32k: runs of several variants overlay in one TensorBoard."""
    cls = resolve_attention((attention or {}).get("class_path", "improved_dilated"))
    length = f"{seq_len // 2**20}m" if seq_len % 2**20 == 0 else f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)
    return f"{variant_name(cls)}-{length}"


class LongCtxCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LongContextLM, TextDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data.passkey_buckets", "model.passkey_buckets")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        trainer = cfg["trainer"]
        if trainer.get("precision") is None:  # bf16-mixed on a GPU, fp32 elsewhere
            on_gpu = torch.cuda.is_available() and trainer.get("accelerator") in (None, "auto", "gpu", "cuda")
            trainer["precision"] = "bf16-mixed" if on_gpu else "32-true"
        max_steps = trainer.get("max_steps")
        if max_steps is not None and (max_steps == 0 or max_steps < -1):
            raise ValueError(f"trainer.max_steps={max_steps} must be positive (or -1 for no limit)")
        if not trainer.get("plugins"):  # a kill while saving leaves the previous checkpoint intact
            trainer["plugins"] = [{"class_path": "longctx.checkpoint.AtomicCheckpointIO"}]
        if trainer.get("logger") in (None, True):
            name = run_name(cfg["model"].get("attention"), cfg["data"]["seq_len"])
            save_dir = os.path.join(trainer.get("default_root_dir") or ".", "runs")
            trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": save_dir, "name": name}}


    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(oom_message(self.model, self.datamodule, e)) from e


def oom_message(model, datamodule, error: Exception) -> str:
    """The run's size and the memory savers it does not use yet."""
    h = model.hparams
    cp = model.layout.cp_size
    batch = getattr(datamodule, "batch_size", "?")
    hints = []
    if not h.activation_checkpointing:
        hints.append("model.activation_checkpointing=true")
    if not h.mlp_chunk_tokens:
        hints.append("model.mlp_chunk_tokens=131072 (the SwiGLU in chunks, as configs/seq/1m.yaml)")
    if h.activation_checkpointing and not getattr(h, "offload_checkpoints", False) and not h.compile:
        hints.append("model.offload_checkpoints=true (the checkpointed blocks' inputs in host memory: 2M tokens "
                     "fit an 80 GB H100)")
    if h.compile:
        hints.append("model.compile=false (eager, configs/seq/1m.yaml's step peaks at 60 GiB on an H100, "
                     "compiled at 67-70 GiB)")
    if batch != 1:
        hints.append("a smaller data.batch_size")
    hints.append("a ring variant over more GPUs (configs/attention/ring_dilated.yaml)")
    return (f"out of GPU memory training {model.variant} at seq_len {h.seq_len} ({h.seq_len // cp} tokens per rank), "
            f"batch_size {batch}, {h.n_layers} layers x d_model {h.d_model}, "
            f"activation_checkpointing={h.activation_checkpointing}. Try {', '.join(hints)}. "
            f"CUDA said: {str(error).splitlines()[0][:300]}")


def main() -> None:
    """`python train.py ...`: a configuration mistake or a stop is one paragraph on stderr and
    a non-zero exit, not a stack trace."""
    try:
        cli_main()
    except (ValueError, NotImplementedError, FloatingPointError, MisconfigurationException,
            torch.OutOfMemoryError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (ValueError, NotImplementedError, MisconfigurationException)) else 1)


def cli_main(args=None, **kwargs) -> LongCtxCLI:
    """Entry point; tests pass `args` (a list) instead of sys.argv."""
    return LongCtxCLI(args=args, **kwargs)
