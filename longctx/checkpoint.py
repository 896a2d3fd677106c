"""Checkpoint files: written so that a crash, a full disk or a second run in the same folder
cannot corrupt them, and read with an error that says what is wrong with the file."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import socket
import zipfile

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

# The errors that mean "no room": a full disk, a quota, a file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(Exception):
    """A checkpoint could not be written; the message names the file and the last good one."""


def _no_space(error: BaseException) -> bool:
    """Whether `error` or an error it was raised from is a full disk. torch.save reports a
    failed write as RuntimeError("unexpected pos ..."), raised while handling the OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def _tmp_prefix(path: str) -> str:
    """What the temporary files of `path` written on this host start with: hidden, beside it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{socket.gethostname()}.")


def _tmp_name(path: str) -> str:
    """A temporary file unique to this process and call; it names the pid that wrote it, so a
    later save can tell a dead writer's leftover."""
    return f"{_tmp_prefix(path)}{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _remove_leftovers(path: str) -> None:
    """Temporary files of `path` left by writers of this host that no longer run (a SIGKILL
    while saving): each can be as large as a checkpoint."""
    folder = os.path.dirname(path)
    prefix = os.path.basename(_tmp_prefix(path))
    for entry in os.listdir(folder or "."):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix):].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, entry))
            except FileNotFoundError:
                pass  # another run removed it first
        except PermissionError:
            pass  # a live process of another user


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temporary file unique to this process beside `path`, fsyncs it, then renames it
    over `path` (atomic on one filesystem): a process killed while saving leaves the previous
    checkpoint intact, and two runs saving into one folder never take each other's file. A
    failed write removes its partial file; a full disk says so and names the last good
    checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.last_saved: tuple[str, int] | None = None  # (path, global step) of the last good save

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: the store's own semantics
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _remove_leftovers(path)
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if _no_space(e):
                raise CheckpointError(self._disk_full(path)) from e
            raise
        self.last_saved = (path, checkpoint.get("global_step", -1))

    @staticmethod
    def write(checkpoint: dict, f) -> None:
        """Serialise into the open file: straight to disk, not through a copy in memory first
        (TorchCheckpointIO's way, which doubles the host memory a save needs)."""
        torch.save(checkpoint, f)

    def _disk_full(self, path: str) -> str:
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        if self.last_saved and os.path.exists(self.last_saved[0]):
            good = f"the last good checkpoint is {self.last_saved[0]} (step {self.last_saved[1]})"
        elif os.path.exists(path):
            good = f"the previous {path} is intact"
        else:
            good = "no checkpoint of this run was written"
        return (f"no space left on the device writing the checkpoint {path} ({free / 2**20:.1f} MiB free there); "
                f"the partial file was removed and {good}. Free some space (or point the checkpoints elsewhere) "
                "and resume with --ckpt_path last")


def read_checkpoint(path: str, key: str = "ckpt_path") -> dict:
    """A Lightning checkpoint of train.py, memory-mapped (only what is used gets read), or a
    ValueError naming the setting (key), the path and what is wrong with it."""
    where = f"{key}={path!r}"
    if not os.path.exists(path):
        raise ValueError(f"{where} does not exist")
    if os.path.isdir(path):
        found = sorted(p for p in os.listdir(path) if p.endswith(".ckpt"))
        hint = f": it holds {found[:5]}" if found else ""
        raise ValueError(f"{where} is a folder, not a checkpoint file: give one of the .ckpt files in it{hint}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{where} is empty (0 bytes): it was not written completely")
    if not zipfile.is_zipfile(path):
        # A checkpoint is a zip archive whose directory is written last.
        with open(path, "rb") as f:
            cut_short = f.read(4) == b"PK\x03\x04"
        raise ValueError(f"{where} is truncated: its end is missing (a copy or save cut short)" if cut_short else
                              f"{where} is not a PyTorch checkpoint (not the zip archive torch.save writes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{where} is not a checkpoint written by train.py: it holds objects other than "
                              "tensors and plain values") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where} could not be read: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        keys = list(ckpt)[:4] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{where} is not a train.py checkpoint: it has no 'state_dict' and 'hyper_parameters' "
                              f"(it holds {keys}: a plain model state_dict is not a run's checkpoint)")
    return ckpt
