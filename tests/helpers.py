"""Test-only Lightning callbacks and checkpoint plugins, importable by class_path when tests/ is
on PYTHONPATH."""
import errno
import io
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


class LogLosses(L.Callback):
    """Appends "global_step loss lr" per training step to $LOSS_LOG (rank 0), flushed at once:
    the loss of the step just taken and the learning rate it used."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0 and outputs is not None:
            with open(os.environ["LOSS_LOG"], "a") as f:
                f.write(f"{trainer.global_step} {outputs['loss'].item():.8f} {self.lr!r}\n")


class SignalAtStep(L.Callback):
    """Sends `signum` to this process once global_step reaches `step`, on global rank `rank`
    (a scheduler that signals one process, as Kubernetes signals the main one)."""

    def __init__(self, step: int, signum: int = 15, rank: int = 0):
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class KillAtStep(L.Callback):
    """SIGKILLs this process (no clean-up, like a crash or a pre-empted node) once global_step
    reaches `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), 9)


class PoisonEmbedding(L.Callback):
    """Sets the embedding to NaN before step `step`; with `once`, restores it after that step."""

    def __init__(self, step: int, once: bool = False):
        self.step, self.once, self.saved = step, once, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.saved is None:
            w = pl_module.model.embed.weight
            self.saved = w.detach().clone()
            with torch.no_grad():
                w.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.once and self.saved is not None and trainer.global_step <= self.step + 1:
            with torch.no_grad():
                pl_module.model.embed.weight.copy_(self.saved)


class RaiseOnRank(L.Callback):
    """Raises on one rank at one step: a bad batch, an OOM on a single GPU (oom="gpu", injected)
    or a real allocation of 1 PiB that the CPU allocator refuses (oom="cpu")."""

    def __init__(self, rank: int, step: int, oom: str | None = None):
        self.rank, self.step, self.oom = rank, step, oom

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.oom == "gpu":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            if self.oom == "cpu":
                torch.empty(2**50, dtype=torch.uint8)
            raise RuntimeError(f"injected failure on rank {self.rank}")


from longctx.checkpoint import AtomicCheckpointIO  # noqa: E402


class FailOnNthSave(AtomicCheckpointIO):
    """The `nth` save writes through `fail(checkpoint, f)` instead of torch.save."""

    def __init__(self, nth: int = 2):
        super().__init__()
        self.nth, self.count = nth, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.count += 1
        return super().save_checkpoint(checkpoint, path, storage_options)

    def write(self, checkpoint, f):
        if self.count < self.nth:
            return super().write(checkpoint, f)
        self.fail(checkpoint, f)


class KillWhileSaving(FailOnNthSave):
    """Writes half of the `nth` checkpoint into the temporary file, then SIGKILLs the process."""

    def fail(self, checkpoint, f):
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), 9)


class DiskFullOnSave(FailOnNthSave):
    """The `nth` save writes part of the file and then fails as a full disk does: torch.save's
    RuntimeError raised while handling the write's OSError(ENOSPC)."""

    def fail(self, checkpoint, f):
        f.write(b"PK\x03\x04" + bytes(4096))
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4100 vs 4096")
