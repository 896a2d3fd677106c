"""Stopping on SIGTERM or SIGINT with a checkpoint to resume from.

A cluster pre-empts a job with SIGTERM (SLURM, Kubernetes) and then, after a grace period,
SIGKILL; a user stops a run with Ctrl-C (SIGINT). Either way the steps since the last checkpoint
should not be lost, and the exit status should say the run did not finish.

Lightning's own SIGTERM handling is replaced while training: it ends the run with exit status 0
and no checkpoint, and under DDP its handler broadcasts from inside the signal handler, which
mismatches the collectives the other ranks are in.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import lightning as L

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):
    """Training stopped on a signal after a complete step, whose checkpoint is at `path`."""

    def __init__(self, signum: int, step: int, path: str, rank: int):
        self.signum, self.step, self.path, self.rank = signum, step, path, rank
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}: saved {path}; resume with --ckpt_path last")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's convention,
        on global rank 0. Other ranks exit 0: their state is in rank 0's checkpoint, and a child
        that exits non-zero makes Lightning's process observer SIGKILL rank 0 before it reports."""
        return 128 + self.signum if self.rank == 0 else 0


def last_checkpoint_path(trainer) -> str:
    """Where `--ckpt_path last` looks first: last.ckpt in the ModelCheckpoint's folder, or, with
    no checkpoint callback, in the run's folder (the one Lightning's default callback would use).
    Every rank must call it (trainer.log_dir broadcasts under DDP)."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    if not folder:
        folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
    return os.path.join(folder, "last.ckpt")


class StopOnSignal(L.Callback):
    """On SIGTERM or SIGINT: finish the optimizer step in progress, write last.ckpt atomically,
    and raise StoppedBySignal, which train.py turns into one line and exit status 143 / 130.
    Under DDP every rank stops after the same step: the request travels in the step's loss
    all-reduce (LongContextLM.signal_received -> stop_signal), so no collective is added. A
    second signal stops at once, as without this callback. train.py adds it to every run."""

    def __init__(self):
        self._previous: dict[int, object] | None = None
        self._step_before = -1

    def _install(self, pl_module) -> None:
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if pl_module.signal_received:  # the second: stop now
                signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
                signal.raise_signal(signum)
                return
            pl_module.signal_received = signum
            print(f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

        self._previous = {s: signal.signal(s, handler) for s in SIGNALS}

    def _restore(self) -> None:
        if self._previous is not None:
            for s, h in self._previous.items():
                signal.signal(s, h)
            self._previous = None

    # Lightning installs its handlers just before the sanity check: ours go in after them.
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = pl_module.stop_signal  # the same on every rank
        if not signum or trainer.global_step == self._step_before:  # none, or mid gradient accumulation
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # that was the last step: the run ends as it would have
        path = last_checkpoint_path(trainer)
        if trainer.checkpoint_callback is not None and os.path.dirname(path) == trainer.checkpoint_callback.dirpath:
            # Its saved state then names this file as its own last: resumed, it overwrites it
            # instead of writing a last-v1.ckpt beside it.
            trainer.checkpoint_callback.last_model_path = path
        trainer.save_checkpoint(path, weights_only=False)
        raise StoppedBySignal(signum, trainer.global_step, path, trainer.global_rank)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()
