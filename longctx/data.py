"""Data: a byte-level corpus as a memmap, random windows of seq_len + 1 tokens, and a
synthetic passkey-retrieval task whose accuracy by distance shows whether long context is used.

Batches are dicts: "tokens" (B, T + 1) long, and for the passkey task "answer" (B, T + 1) bool
(the positions whose prediction is scored) and "bucket" (B,) long (the distance bucket).
Context parallel: every rank of one CP group reads the same windows (samplers use the
data-parallel rank and size); the LightningModule cuts each rank's shard after the shift.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from .attention.branches import check_positive_int

VAL_PERCENT = 5  # files whose path hashes below this go to validation


# Where pip puts packages, inside the standard library's folder: not the standard library. Left
# out of the default corpus, which is then the same on every install of one Python release (with
# them it was 18,248 files and 229 MB here, the standard library's own .py files 1,790 and 32 MB).
INSTALLED_PACKAGES = frozenset({"site-packages", "dist-packages"})


def _files(root: Path, suffixes: tuple[str, ...] | None, skip: frozenset = frozenset()) -> list[Path]:
    """Files under root with one of `suffixes` (any, if None), sorted; folders named in `skip`
    are not entered."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        paths = map(Path(folder).joinpath, names)
        found += [p for p in paths if (suffixes is None or p.suffix in suffixes) and p.is_file()]
    return sorted(found)


def _is_val(rel: str) -> bool:
    return int(hashlib.md5(rel.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def build_corpus(source: Path, out: Path, suffixes: tuple[str, ...] | None, skip: frozenset = frozenset()) -> dict:
    """Concatenate the bytes of every file under `source` (see _files) into out/{train,val}.bin
    with a progress bar; write meta.json last, so a half-built corpus is never taken for a
    finished one. The split is by file (_is_val); when that leaves a split empty (a folder of one
    file, say), by bytes instead: the last VAL_PERCENT% of the concatenation validates."""
    from tqdm.auto import tqdm

    files = _files(source, suffixes, skip)
    if not files:
        kind = " or ".join(suffixes) + " " if suffixes else ""
        raise ValueError(f"data.data_dir={str(source)!r} contains no {kind}files to train on")
    flags = [_is_val(str(p.relative_to(source))) for p in files]
    by_file = 0 < sum(flags) < len(files)
    total = sum(p.stat().st_size + 1 for p in files)
    cut = total - max(1, total * VAL_PERCENT // 100)  # where validation starts when split by bytes
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in ("train", "val"):
        tmp = out / f"{split}.bin.tmp"
        digest, n, pos = hashlib.sha256(), 0, 0
        lo, hi = (0, cut) if split == "train" else (cut, total)
        with open(tmp, "wb") as f:
            for path, is_val in tqdm(list(zip(files, flags)), desc=f"building {out.name}/{split}.bin", unit="file",
                                     leave=False):
                if by_file and is_val != (split == "val"):
                    continue
                data = path.read_bytes() + b"\n"
                if not by_file:
                    start, pos = pos, pos + len(data)
                    data = data[max(lo - start, 0):max(hi - start, 0)]
                f.write(data)
                digest.update(data)
                n += len(data)
        os.replace(tmp, out / f"{split}.bin")
        sizes[split] = dict(bytes=n, sha256=digest.hexdigest())
    meta = dict(source=str(source), files=len(files), split="by file" if by_file else "by bytes", splits=sizes)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    return meta


def load_split(folder: Path, split: str, verify: bool = True) -> np.memmap:
    """The split's tokens as a read-only uint8 memmap, checked against meta.json."""
    meta = json.loads((folder / "meta.json").read_text())
    expected = meta["splits"][split]
    path = folder / f"{split}.bin"
    size = path.stat().st_size if path.exists() else -1
    if size != expected["bytes"]:
        raise ValueError(
            f"corpus file {path} has {size} bytes but meta.json says {expected['bytes']}: it is truncated or "
            f"corrupt; delete {folder} to rebuild it"
        )
    if verify:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            raise ValueError(f"corpus file {path} does not match its checksum in meta.json: delete {folder} to rebuild it")
    return np.memmap(path, dtype=np.uint8, mode="r")


class WindowDataset(Dataset):
    """`n` windows of seq_len + 1 tokens at offsets drawn once from `seed` (random) or evenly
    spaced (validation)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, n: int, seed: int, random: bool, name: str):
        span = len(tokens) - (seq_len + 1)
        if span < 0:
            raise ValueError(
                f"the {name} split has {len(tokens)} tokens, fewer than one window of data.seq_len + 1 = {seq_len + 1}: "
                "use a shorter seq_len or more text"
            )
        if random:
            self.offsets = np.random.default_rng(seed).integers(0, span + 1, size=n)
        else:
            self.offsets = np.linspace(0, span, num=n).astype(np.int64)
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        o = int(self.offsets[i])
        return {"tokens": torch.from_numpy(self.tokens[o : o + self.seq_len + 1].astype(np.int64))}


class PasskeyDataset(Dataset):
    """Passkey retrieval: random-letter filler with `<key=DDDDD>` planted at a chosen distance
    before the end, which reads `<key?DDDDD>`; the five answer digits are scored. Distance
    bucket b of `buckets` covers [T·2^(b−buckets), T·2^(b+1−buckets)) tokens before the end."""

    KEY, ASK, DIGITS = b"<key=", b"<key?", 5

    def __init__(self, seq_len: int, n: int, seed: int, buckets: int):
        self.need = len(self.KEY) + len(self.ASK) + 2 * (self.DIGITS + 1)
        if seq_len < 4 * self.need:
            raise ValueError(f"data.seq_len={seq_len} is too short for the passkey task: need >= {4 * self.need}")
        self.seq_len, self.n, self.seed, self.buckets = seq_len, n, seed, buckets

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        T = self.seq_len + 1
        bucket = i % self.buckets
        tail = len(self.ASK) + self.DIGITS + 1
        lo = max(self.need, int(T * 2.0 ** (bucket - self.buckets)))
        hi = max(lo + 1, min(T - len(self.KEY) - self.DIGITS - 1, int(T * 2.0 ** (bucket + 1 - self.buckets))))
        distance = int(rng.integers(lo, hi))  # from the key's start to the end
        seq = rng.integers(ord("a"), ord("z") + 1, size=T, dtype=np.int64)
        digits = np.frombuffer(bytes(rng.integers(ord("0"), ord("9") + 1, size=self.DIGITS, dtype=np.uint8)), np.uint8)
        key = np.frombuffer(self.KEY, np.uint8).tolist() + digits.tolist() + [ord(">")]
        ask = np.frombuffer(self.ASK, np.uint8).tolist() + digits.tolist() + [ord(">")]
        start = T - distance
        seq[start : start + len(key)] = key
        seq[T - tail :] = ask
        answer = np.zeros(T, dtype=bool)
        answer[T - 1 - self.DIGITS : T - 1] = True
        return {"tokens": torch.from_numpy(seq), "answer": torch.from_numpy(answer), "bucket": torch.tensor(bucket)}


class ResumableSampler(DistributedSampler):
    """Training order for one data-parallel rank: a permutation of the windows drawn from
    (seed, epoch), dealt round-robin over ranks, full batches only. Iteration starts after the
    batches `position()` says this epoch already consumed, so `fit --ckpt_path` resumes a run
    killed mid-epoch on exactly the batch it would have seen next. (A DistributedSampler
    subclass, so Lightning keeps it instead of wrapping it with the world's rank.)"""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 position=None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n, self.batch_size, self.position = len(dataset), batch_size, position
        if self.n < batch_size * num_replicas:
            raise ValueError(f"data.train_windows={self.n} is less than one batch per rank "
                             f"(data.batch_size={batch_size} x {num_replicas} data-parallel ranks)")

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.num_replicas)

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = perm[: len(self) * self.num_replicas][self.rank :: self.num_replicas]
        skip = self.position() if self.position else 0
        return iter(mine[skip * self.batch_size :].tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ResumableSampler. Its position comes from the trainer's restored
    step, so its checkpoint state is only a record; having the interface tells Lightning that
    resuming mid-epoch is exact (and silences its warning that it might not be)."""

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "resumes_from": "trainer.global_step"}

    def load_state_dict(self, state: dict) -> None:
        pass  # ResumableSampler.position() reads the restored global_step


class TextDataModule(L.LightningDataModule):
    """Args:
        seq_len: tokens per training window (linked to model.seq_len).
        batch_size: windows per step per data-parallel rank.
        task: "text" (next-byte prediction on a corpus) or "passkey" (synthetic long-range recall).
        data_dir: a folder of your own text files (every file under it is read as bytes);
            None builds the default corpus from this Python's standard-library sources.
        cache_dir: where prepared corpora live (one folder per corpus).
        train_windows / val_windows: windows per training epoch / in validation.
        passkey_buckets: distance buckets of the passkey task.
        num_workers: DataLoader workers.
        seed: window offsets and shuffling.
    """

    def __init__(self, seq_len: int = 1024, batch_size: int = 8, task: str = "text", data_dir: str | None = None,
                 cache_dir: str = "data", train_windows: int = 20000, val_windows: int = 64, passkey_buckets: int = 4,
                 num_workers: int = 0, seed: int = 1234):
        super().__init__()
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size), ("train_windows", train_windows),
                           ("val_windows", val_windows), ("passkey_buckets", passkey_buckets)):
            check_positive_int(f"data.{key}", value)
        if task not in ("text", "passkey"):
            raise ValueError(f"data.task={task!r} must be 'text' or 'passkey'")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"data.data_dir={data_dir!r} does not exist or is not a folder")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.task = seq_len, batch_size, task

    def corpus_folder(self) -> tuple[Path, Path, tuple[str, ...] | None, frozenset]:
        """(source, cache folder, suffixes, folders skipped) of the corpus to train on."""
        if self.hparams.data_dir is None:
            source = Path(sysconfig.get_paths()["stdlib"])
            name = f"stdlib-py{platform.python_version()}"
            return source, Path(self.hparams.cache_dir) / name, (".py",), INSTALLED_PACKAGES
        source = Path(self.hparams.data_dir).resolve()
        tag = hashlib.md5(str(source).encode()).hexdigest()[:8]
        return source, Path(self.hparams.cache_dir) / f"{source.name}-{tag}", None, frozenset()

    def prepare_data(self) -> None:
        if self.task == "text":
            source, folder, suffixes, skip = self.corpus_folder()
            if not (folder / "meta.json").exists():
                build_corpus(source, folder, suffixes, skip)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.task == "passkey":
            self.train_set = PasskeyDataset(h.seq_len, h.train_windows, h.seed, h.passkey_buckets)
            self.val_set = PasskeyDataset(h.seq_len, h.val_windows, h.seed + 1, h.passkey_buckets)
            return
        folder = self.corpus_folder()[1]
        self.train_set = WindowDataset(load_split(folder, "train"), h.seq_len, h.train_windows, h.seed, True, "train")
        self.val_set = WindowDataset(load_split(folder, "val"), h.seq_len, h.val_windows, h.seed, False, "validation")

    def max_token(self) -> int:
        """The largest token id the model will see."""
        if self.task == "passkey":
            return ord("z")  # lowercase filler, digits and "<key=?>"; "z" is the largest
        return int(max(self.train_set.tokens.max(), self.val_set.tokens.max()))

    def _layout(self):
        layout = getattr(self.trainer.lightning_module, "layout", None) if self.trainer else None
        return (layout.dp_size, layout.dp_rank) if layout is not None else (1, 0)

    def _batches_done(self) -> int:
        """Batches of the current epoch already trained (non-zero only when resuming mid-epoch)."""
        t = self.trainer
        if t is None:
            return 0
        per_epoch = self._train_sampler.batches_per_epoch()
        done = t.global_step * t.accumulate_grad_batches - t.current_epoch * per_epoch
        return done if 0 < done < per_epoch else 0

    def train_dataloader(self) -> DataLoader:
        dp_size, dp_rank = self._layout()
        self._train_sampler = ResumableSampler(self.train_set, self.batch_size, self.hparams.seed, dp_size,
                                               dp_rank, position=self._batches_done)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=self._train_sampler, drop_last=True,
                                   num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
                                   pin_memory=self._pin_memory())

    def val_dataloader(self) -> DataLoader:
        dp_size, dp_rank = self._layout()
        sampler = (DistributedSampler(self.val_set, num_replicas=dp_size, rank=dp_rank, shuffle=False)
                   if dp_size > 1 else SequentialSampler(self.val_set))
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
                          pin_memory=self._pin_memory())

    def _pin_memory(self) -> bool:
        """Page-locked batches on a GPU: copying a pageable batch to the device first waits for
        all queued GPU work, so the next step's host work could not overlap this step's."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
