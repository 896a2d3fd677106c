"""The project's LightningCLI: `python train.py fit --config configs/X.yaml`."""
from __future__ import annotations

import inspect
import math
import os
import sys

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .attention import resolve
from .checkpoint import CheckpointError, read_checkpoint
from .data import TextDataModule
from .lit_module import LongContextLM
from .oom import is_host_oom, oom_message
from .preemption import StopOnSignal, StoppedBySignal
from .resume import find_last, take_architecture, take_unset, version_of
from .tokenizer import load_tokenizer

# The vocabulary a tokenizer's is padded to.
VOCAB_MULTIPLE = 64
# Data settings that the model takes too, given once (as data.*).
LINKS = (("seq_len", "seq_len"), ("passkey_buckets", "passkey_buckets"))


def run_name(attention: dict | None, seq_len: int, task: str = "text", data_dir: str | None = None,
             subcommand: str = "fit", tokenizer: str | None = None) -> str:
    """<variant>-<length>[-<data>][-<tokenizer>][-passkey][-validate], e.g. improved_dilated-32k:
    runs of several variants on the same data overlay in one TensorBoard; other data (a folder or
    a dataset's name), another tokenizer, another task or a validation alone get names of their own."""
    name = resolve((attention or {}).get("class_path", "improved_dilated")).name
    length = f"{seq_len // 2**20}m" if seq_len % 2**20 == 0 else f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)
    parts = [name, length]
    if data_dir and task == "text":
        parts.append(os.path.basename(os.path.normpath(data_dir)))
    if tokenizer:
        path = os.path.normpath(tokenizer)
        parts.append(os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "tokenizer.json"
                     else os.path.splitext(os.path.basename(path))[0])
    if task != "text":
        parts.append(task)
    if subcommand != "fit":
        parts.append(subcommand)
    return "-".join(parts)


def _run_name(cfg, subcommand: str) -> str:
    data = cfg["data"]
    return run_name(cfg["model"].get("attention"), data["seq_len"], data.get("task", "text"),
                    data.get("data_dir") or data.get("hf_dataset"), subcommand, data.get("tokenizer"))


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}


class LongCtxCLI(LightningCLI):
    """LightningCLI with the runs' names, resuming by `--ckpt_path last`, the checks Lightning
    does not make, StopOnSignal on every run, and `--print_config` printing what runs. Offers
    fit and validate (the data has no test split; generation is `python -m longctx.generate`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # AdamW with its warm-up and cosine schedule is the module's; LightningCLI's --optimizer
        # and --lr_scheduler would silently replace both.
        kwargs.setdefault("auto_configure_optimizers", False)
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        extra = defaults.get("callbacks") or []
        defaults["callbacks"] = [StopOnSignal(), *(extra if isinstance(extra, list) else [extra])]
        self.resume_version: int | None = None  # the run folder `--ckpt_path last` continues
        self._print_config: str | None = None
        super().__init__(LongContextLM, TextDataModule, *args, trainer_defaults=defaults, **kwargs)

    @staticmethod
    def subcommands() -> dict:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in LINKS:
            parser.link_arguments(f"data.{source}", f"model.{target}")

    def parse_arguments(self, parser, args) -> None:
        """As LightningCLI's, but --print_config is held back until before_instantiate_classes has
        filled in the logger, precision and plugins, so that it prints what runs."""
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)) and any(str(a).split("=")[0] == "--print_config" for a in argv):
            self._print_config = next(str(a) for a in argv if str(a).split("=")[0] == "--print_config")
            args = [a for a in argv if str(a).split("=")[0] != "--print_config"]
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which loads the whole checkpoint to put every saved
        hyper-parameter over the command line's: `last` is found here (train.py's runs are
        versioned folders, where Lightning's search does not look), the file is checked, and
        only the architecture comes from it (resume.py), with data settings left at their
        defaults (a validation without --config evaluates what was trained)."""
        subcommand = self.config.get("subcommand")
        cfg = self.config.get(subcommand) if subcommand else None
        path = cfg.get("ckpt_path") if cfg else None
        if path is None or path in ("best", "hpc"):
            return
        if path == "last":
            folders = self._checkpoint_folders(cfg, subcommand)
            if folders is None:
                return  # a logger of the user's: Lightning's own search
            path = find_last(folders)
            if path is None:
                rank_zero_info(f"--ckpt_path last: no last.ckpt in {' or '.join(folders)}; training starts at step 0")
                cfg["ckpt_path"] = None
                return
            cfg["ckpt_path"] = path
            if subcommand == "fit":
                self.resume_version = version_of(path)
            rank_zero_info(f"--ckpt_path last: resuming from {path}")
        saved = read_checkpoint(path)
        taken = take_architecture(cfg["model"], saved["hyper_parameters"], _defaults(LongContextLM), path)
        taken += take_unset(cfg["data"], saved.get("datamodule_hyper_parameters", {}), _defaults(TextDataModule), "data")
        for source, target in LINKS:  # the links were applied when parsing, before these were taken
            cfg["model"][target] = cfg["data"][source]
        if taken:
            rank_zero_info(f"from the checkpoint: {', '.join(taken)}")

    def _checkpoint_folders(self, cfg, subcommand: str) -> list[str] | None:
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
            return [os.path.join(root, "runs", _run_name(cfg, "fit"), "version_*", "checkpoints")]
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
        self._vocabulary(cfg)
        if trainer.get("fast_dev_run"):
            # A smoke test writes nothing: Lightning's loggers are off under it, but
            # ModelCheckpoint.on_train_end still saves last.ckpt, into default_root_dir.
            trainer["callbacks"] = [c for c in trainer.get("callbacks") or []
                                    if not str(c.get("class_path", "")).endswith("ModelCheckpoint")]
            trainer["enable_checkpointing"] = False
        if trainer.get("logger") in (None, True):
            save_dir = os.path.join(trainer.get("default_root_dir") or ".", "runs")
            trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": save_dir, "name": _run_name(cfg, self.subcommand),
                                               "version": self.resume_version}}
        if self._print_config is not None:
            skip_null = self._print_config.partition("=")[2] == "skip_null"
            parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
            print(parser.dump(cfg, skip_none=skip_null, skip_validation=True), end="")
            sys.exit(0)

    def _vocabulary(self, cfg) -> None:
        """model.vocab_size follows data.tokenizer: left at its default it becomes the tokenizer's
        vocabulary padded to a multiple of 64 (the head's matmuls run on whole tensor-core tiles);
        set, it must hold the tokenizer's."""
        spec = cfg["data"].get("tokenizer")
        if spec is None:
            return
        tokens = load_tokenizer(spec).vocab_size
        padded = -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        given = cfg["model"]["vocab_size"]
        if given == _defaults(LongContextLM)["vocab_size"]:
            cfg["model"]["vocab_size"] = padded
            rank_zero_info(f"model.vocab_size={padded}: data.tokenizer's {tokens} tokens, padded to a multiple of "
                           f"{VOCAB_MULTIPLE}")
        elif given < tokens:
            raise ValueError(f"model.vocab_size={given} is smaller than data.tokenizer={spec!r}'s {tokens} tokens: "
                             f"use at least {tokens}, or leave it unset for {padded}")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(oom_message(self.model, self.datamodule, e)) from e
        except RuntimeError as e:
            if not is_host_oom(e):
                raise
            raise torch.OutOfMemoryError(oom_message(self.model, self.datamodule, e, device="CPU")) from e


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
