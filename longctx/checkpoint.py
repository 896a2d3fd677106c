"""Checkpoint writing that a crash cannot corrupt."""
from __future__ import annotations

import os

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `path.tmp`, fsyncs it, then renames it over `path`: a process killed while saving
    leaves the previous checkpoint intact (os.replace is atomic on one filesystem)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: the store's own semantics
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
