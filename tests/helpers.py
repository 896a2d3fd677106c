"""Test-only Lightning callbacks, importable by class_path when tests/ is on PYTHONPATH."""
import os

import lightning as L
import torch


class RecordFirstStep(L.Callback):
    """Saves, per rank, what the first training step saw: the initial weights (rank 0), the
    batch window, the rank's input/target shard and position offset, its loss and the
    gradients after DDP's all-reduce. Written to $RECORD_DIR/rank{R}.pt."""

    def on_train_start(self, trainer, pl_module):
        self.record = {"hparams": dict(pl_module.hparams), "layout": pl_module.layout.__dict__,
                       "state_dict": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            x, y = pl_module.shard(batch["tokens"])
            self.record.update(window=batch["tokens"].clone(), x=x.clone(), y=y.clone(),
                               pos_offset=pl_module.layout.cp_rank * x.shape[1])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if "grads" not in self.record:
            self.record["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.record["loss"] = outputs["loss"].item()
            torch.save(self.record, os.path.join(os.environ["RECORD_DIR"], f"rank{trainer.global_rank}.pt"))
