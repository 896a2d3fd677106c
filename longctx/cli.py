"""The project's LightningCLI: `python train.py fit --config configs/X.yaml`."""
from __future__ import annotations

import inspect
import math
import os
import sys

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .checkpoint import CheckpointError, read_checkpoint
from .data import TextDataModule
from .lit_module import LongContextLM
from .model import resolve_attention, variant_name
from .preemption import StopOnSignal, StoppedBySignal
from .resume import find_last, take_architecture, version_of

# The CPU allocator's words for an allocation that failed (Linux/macOS, Windows).
HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def run_name(attention: dict | None, seq_len: int) -> str:
    """e.g. improved_dilated-32k: runs of several variants overlay in one TensorBoard."""
    cls = resolve_attention((attention or {}).get("class_path", "improved_dilated"))
    length = f"{seq_len // 2**20}m" if seq_len % 2**20 == 0 else f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)
    return f"{variant_name(cls)}-{length}"


class LongCtxCLI(LightningCLI):
    """LightningCLI with the runs' names, resuming by `--ckpt_path last`, the checks Lightning
    does not make, and StopOnSignal on every run."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        extra = defaults.get("callbacks") or []
        defaults["callbacks"] = [StopOnSignal(), *(extra if isinstance(extra, list) else [extra])]
        self.resume_version: int | None = None  # the run folder `--ckpt_path last` continues
        super().__init__(LongContextLM, TextDataModule, *args, trainer_defaults=defaults, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data.passkey_buckets", "model.passkey_buckets")

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which loads the whole checkpoint to put every saved
        hyper-parameter over the command line's: `last` is found here (train.py's runs are
        versioned folders, where Lightning's search does not look), the file is checked, and
        only the architecture comes from it (resume.py)."""
        subcommand = self.config.get("subcommand")
        cfg = self.config.get(subcommand) if subcommand else None
        path = cfg.get("ckpt_path") if cfg else None
        if path is None or path in ("best", "hpc"):
            return
        if path == "last":
            folders = self._checkpoint_folders(cfg)
            if folders is None:
                return  # a logger of the user's: Lightning's own search
            path = find_last(folders)
            if path is None:
                rank_zero_info(f"--ckpt_path last: no last.ckpt in {' or '.join(folders)}; training starts at step 0")
                cfg["ckpt_path"] = None
                return
            cfg["ckpt_path"], self.resume_version = path, version_of(path)
            rank_zero_info(f"--ckpt_path last: resuming from {path}")
        saved = read_checkpoint(path)
        defaults = {k: p.default for k, p in inspect.signature(LongContextLM.__init__).parameters.items()}
        taken = take_architecture(cfg["model"], saved["hyper_parameters"], defaults, path)
        if taken:
            rank_zero_info(f"from the checkpoint: {', '.join(taken)}")

    def _checkpoint_folders(self, cfg) -> list[str] | None:
        """Where this run's checkpoints are (glob patterns), or None when a logger of the user's
        decides it. Each fresh run with the default logger is a new runs/NAME/version_N."""
        trainer = cfg["trainer"]
        for callback in trainer.get("callbacks") or []:
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and dirpath:
                return [str(dirpath)]
        root, logger = trainer.get("default_root_dir") or ".", trainer.get("logger")
        if logger is False:
            return [os.path.join(root, "checkpoints")]
        if logger in (None, True):
            name = run_name(cfg["model"].get("attention"), cfg["data"]["seq_len"])
            return [os.path.join(root, "runs", name, "version_*", "checkpoints")]
        return None

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        trainer = cfg["trainer"]
        if trainer.get("precision") is None:  # bf16-mixed on a GPU, fp32 elsewhere
            on_gpu = torch.cuda.is_available() and trainer.get("accelerator") in (None, "auto", "gpu", "cuda")
            trainer["precision"] = "bf16-mixed" if on_gpu else "32-true"
        max_steps = trainer.get("max_steps")
        if max_steps is not None and (max_steps == 0 or max_steps < -1):
            raise ValueError(f"trainer.max_steps={max_steps} must be positive (or -1 for no limit)")
        clip = trainer.get("gradient_clip_val")
        if clip is not None and not (clip >= 0 and math.isfinite(clip)):  # Lightning turns clipping off
            raise ValueError(f"trainer.gradient_clip_val={clip} must be a number >= 0 (0 or null: no clipping)")
        if not trainer.get("plugins"):  # a kill while saving leaves the previous checkpoint intact
            trainer["plugins"] = [{"class_path": "longctx.checkpoint.AtomicCheckpointIO"}]
        if trainer.get("logger") in (None, True):
            name = run_name(cfg["model"].get("attention"), cfg["data"]["seq_len"])
            save_dir = os.path.join(trainer.get("default_root_dir") or ".", "runs")
            trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": save_dir, "name": name, "version": self.resume_version}}

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(oom_message(self.model, self.datamodule, e)) from e
        except RuntimeError as e:
            if not any(words in str(e) for words in HOST_OOM):
                raise
            raise torch.OutOfMemoryError(oom_message(self.model, self.datamodule, e, device="CPU")) from e


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


def main() -> None:
    """`python train.py ...`: a configuration mistake, an unreadable checkpoint or a stop is one
    paragraph on stderr and a non-zero exit, not a stack trace. A stop by SIGTERM or SIGINT
    exits 143 or 130 after saving a checkpoint (preemption.py)."""
    try:
        cli_main()
    except StoppedBySignal as e:
        if e.rank == 0:
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, NotImplementedError, FloatingPointError, MisconfigurationException, CheckpointError,
            torch.OutOfMemoryError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (ValueError, NotImplementedError, MisconfigurationException)) else 1)


def cli_main(args=None, **kwargs) -> LongCtxCLI:
    """Entry point; tests pass `args` (a list) instead of sys.argv."""
    return LongCtxCLI(args=args, **kwargs)
