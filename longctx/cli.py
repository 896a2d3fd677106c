"""The project's LightningCLI: `python train.py fit --config configs/X.yaml`."""
from __future__ import annotations

import os

import torch
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
        if trainer.get("logger") in (None, True):
            name = run_name(cfg["model"].get("attention"), cfg["data"]["seq_len"])
            save_dir = os.path.join(trainer.get("default_root_dir") or ".", "runs")
            trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": save_dir, "name": name}}


def cli_main(args=None, **kwargs) -> LongCtxCLI:
    """Entry point; tests pass `args` (a list) instead of sys.argv."""
    return LongCtxCLI(args=args, **kwargs)
