"""Data: a corpus as a token memmap (bytes, or a tokenizer's ids: corpus.py), random windows of
seq_len + 1 tokens, and a synthetic passkey-retrieval task whose accuracy by distance shows
whether long context is used.

Batches are dicts: "tokens" (B, T + 1) long, and for the passkey task "answer" (B, T + 1) bool
(the positions whose prediction is scored) and "bucket" (B,) long (the distance bucket).
Context parallel: every rank of one CP group reads the same windows (samplers use the
data-parallel rank and size); the LightningModule cuts each rank's shard after the shift.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from . import corpus
from .checks import check_positive_int
from .tokenizer import Tokenizer, load_tokenizer

VAL_PERCENT = corpus.VAL_PERCENT
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")


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
    before the end, which reads `<key?DDDDD>`; the answer's digit tokens are scored. Distance
    bucket b of `buckets` covers [T·2^(b−buckets), T·2^(b+1−buckets)) tokens before the end.
    With a tokenizer the pieces are its tokens: the filler is a slice of one tokenized stream of
    random letters, the key and question are tokenized apart, so the scored tokens are known."""

    DIGITS = 5

    def __init__(self, seq_len: int, n: int, seed: int, buckets: int, tokenizer: Tokenizer | None = None):
        tok = tokenizer or Tokenizer()
        self.encode = lambda text: np.asarray(tok.encode(text), dtype=np.int64)
        self.key, self.ask, self.close = (self.encode(s) for s in ("<key=", "<key?", ">"))
        digits = [self.encode(str(d) * self.DIGITS) for d in range(10)]
        self.need = len(self.key) + len(self.ask) + 2 * (len(self.close) + max(map(len, digits)))
        if seq_len < 4 * self.need:
            raise ValueError(f"data.seq_len={seq_len} is too short for the passkey task: need >= {4 * self.need}")
        letters = np.random.default_rng(seed).integers(ord("a"), ord("z") + 1, size=seq_len + 1, dtype=np.uint8)
        self.filler = self.encode(letters.tobytes().decode())
        self.filler = np.tile(self.filler, -(-2 * (seq_len + 1) // len(self.filler)))  # room for random offsets
        self.max_token = int(max(self.filler.max(), *(x.max() for x in (self.key, self.ask, self.close, *digits))))
        self.seq_len, self.n, self.seed, self.buckets = seq_len, n, seed, buckets

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        T = self.seq_len + 1
        bucket = i % self.buckets
        digits = self.encode("".join(map(str, rng.integers(0, 10, size=self.DIGITS))))
        key = np.concatenate([self.key, digits, self.close])
        ask = np.concatenate([self.ask, digits, self.close])
        lo = max(self.need, int(T * 2.0 ** (bucket - self.buckets)))
        hi = max(lo + 1, min(T - len(key), int(T * 2.0 ** (bucket + 1 - self.buckets))))
        distance = int(rng.integers(lo, hi))  # from the key's start to the end
        start = int(rng.integers(0, len(self.filler) - T + 1))
        seq = self.filler[start : start + T].copy()
        seq[T - distance : T - distance + len(key)] = key
        seq[T - len(ask) :] = ask
        answer = np.zeros(T, dtype=bool)
        answer[T - len(self.close) - len(digits) : T - len(self.close)] = True
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
    """Training windows from a corpus (the built-in one, a folder of your files, a Hugging Face
    dataset, or tokens you prepared) or the synthetic passkey task, for every data-parallel rank.

    Args:
        seq_len: tokens per training window (linked to model.seq_len).
        batch_size: windows per step on each data-parallel rank.
        task: text (next-token prediction on the corpus) or passkey (synthetic long-range recall).
        data_dir: a folder of your own text, .jsonl or .parquet files; null: this Python's standard-library sources.
        tokenizer: a tokenizer.json, a folder holding one, or a SentencePiece .model; null: bytes (256 tokens).
        text_field: the field holding the text in .jsonl, .parquet and Hugging Face dataset records.
        hf_dataset: a Hugging Face dataset name (streamed; needs internet) or local dataset folder, instead of data_dir.
        tokens_dtype: read data_dir as already tokenized data, train.bin and val.bin of this dtype (e.g. uint16).
        cache_dir: where prepared corpora are kept, one folder each.
        train_windows: windows in a training epoch.
        val_windows: windows in a validation pass.
        passkey_buckets: distance buckets of the passkey task.
        num_workers: DataLoader worker processes.
        seed: window offsets and shuffling.
    """

    def __init__(self, seq_len: int = 1024, batch_size: int = 8, task: str = "text", data_dir: str | None = None,
                 tokenizer: str | None = None, text_field: str = "text", hf_dataset: str | None = None,
                 tokens_dtype: str | None = None, cache_dir: str = "data", train_windows: int = 20000,
                 val_windows: int = 64, passkey_buckets: int = 4, num_workers: int = 0, seed: int = 1234):
        super().__init__()
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size), ("train_windows", train_windows),
                           ("val_windows", val_windows), ("passkey_buckets", passkey_buckets)):
            check_positive_int(f"data.{key}", value)
        if task not in ("text", "passkey"):
            raise ValueError(f"data.task={task!r} must be 'text' or 'passkey'")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"data.data_dir={data_dir!r} does not exist or is not a folder")
        if tokens_dtype is not None and (tokens_dtype not in TOKEN_DTYPES or data_dir is None):
            raise ValueError(f"data.tokens_dtype={tokens_dtype!r} must be one of {list(TOKEN_DTYPES)}, with data.data_dir "
                             "the folder holding train.bin and val.bin")
        if hf_dataset is not None and data_dir is not None:
            raise ValueError(f"data.hf_dataset={hf_dataset!r} and data.data_dir={data_dir!r}: give one source")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.task = seq_len, batch_size, task
        self.tokenizer = load_tokenizer(tokenizer)

    def corpus_folder(self) -> tuple[str, Path]:
        """(source, cache folder) of the corpus to train on."""
        h = self.hparams
        if h.hf_dataset is not None:
            source = h.hf_dataset
        else:
            source = "stdlib" if h.data_dir is None else str(Path(h.data_dir).resolve())
        return source, Path(h.cache_dir) / corpus.cache_name(h.data_dir, h.hf_dataset, self.tokenizer)

    def prepare_data(self) -> None:
        h = self.hparams
        if self.task != "text" or h.tokens_dtype is not None:
            return
        source, folder = self.corpus_folder()
        if (folder / "meta.json").exists():
            return
        raw = self.tokenizer.kind == "bytes"
        if h.hf_dataset is not None:
            docs, total = corpus.hub_documents(h.hf_dataset, "train", h.text_field, raw), None
        else:
            root, files = corpus.source_files(h.data_dir)
            docs, total = corpus.documents(root, files, h.text_field, raw), len(files)
        corpus.build(docs, folder, self.tokenizer, source, total)

    def _split(self, name: str) -> np.ndarray:
        h = self.hparams
        if h.tokens_dtype is not None:
            return corpus.load_tokens(Path(h.data_dir), name, h.tokens_dtype)
        return corpus.load_split(self.corpus_folder()[1], name)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.task == "passkey":
            self.train_set = PasskeyDataset(h.seq_len, h.train_windows, h.seed, h.passkey_buckets, self.tokenizer)
            self.val_set = PasskeyDataset(h.seq_len, h.val_windows, h.seed + 1, h.passkey_buckets, self.tokenizer)
            return
        self.train_set = WindowDataset(self._split("train"), h.seq_len, h.train_windows, h.seed, True, "train")
        self.val_set = WindowDataset(self._split("val"), h.seq_len, h.val_windows, h.seed, False, "validation")

    def max_token(self) -> int:
        """The largest token id the model will see (a tokenizer's vocabulary bounds it)."""
        if self.task == "passkey":
            return self.train_set.max_token
        if self.tokenizer.kind != "bytes":
            return self.tokenizer.vocab_size - 1
        return int(max(self.train_set.tokens.max(), self.val_set.tokens.max()))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id decodes to: the denominator of bits per byte."""
        return self.tokenizer.token_bytes()

    def state_dict(self) -> dict:
        """Kept in every checkpoint: the tokenizer itself, so generation needs nothing else."""
        return {"tokenizer": self.tokenizer.serialized()}

    def load_state_dict(self, state: dict) -> None:
        pass  # the tokenizer comes from data.tokenizer, which resuming takes from the checkpoint

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
