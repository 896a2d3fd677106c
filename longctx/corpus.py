"""Prepared corpora: text in, token memmaps out, once, and checked every time they are read.

Sources: a folder of files (text files are read whole; `.jsonl`/`.json` lines and `.parquet`
files are records whose `text_field` holds the text, read with Hugging Face `datasets`,
streamed), a Hugging Face dataset by name or local path (streamed), or this Python's
standard-library sources (the default). Documents go to validation by a hash of their name
(VAL_PERCENT of them; where that leaves a split empty, the last VAL_PERCENT% of the tokens).

Output: a folder holding train.bin and val.bin (uint8 bytes, or uint16 / uint32 token ids: the
smallest that holds the vocabulary) and meta.json (the source, the tokenizer's fingerprint,
dtype, token counts and SHA-256 checksums). The folder is built under a temporary name and
renamed when complete, so an interrupted build is never taken for a finished one, and its name
carries the tokenizer's fingerprint, so another tokenizer never reuses it. Tokenizing runs in
batches through the tokenizer's own threads (every core), with a progress bar; only one batch
is in memory, so a corpus larger than RAM works.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sysconfig
from pathlib import Path

import numpy as np

from .tokenizer import Tokenizer

VAL_PERCENT = 5
RECORDS = (".jsonl", ".json", ".parquet")
# Where pip puts packages, inside the standard library's folder: not the standard library. Left
# out of the default corpus, which is then the same on every install of one Python release.
INSTALLED_PACKAGES = frozenset({"site-packages", "dist-packages"})
BATCH_CHARS = 1 << 22  # text tokenized per batch


def _files(root: Path, suffixes: tuple[str, ...] | None, skip: frozenset = frozenset()) -> list[Path]:
    """Files under root with one of `suffixes` (any, if None), sorted; folders in `skip` not entered."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        paths = map(Path(folder).joinpath, names)
        found += [p for p in paths if (suffixes is None or p.suffix in suffixes) and p.is_file()]
    return sorted(found)


def source_files(data_dir: str | None) -> tuple[Path, list[Path]]:
    """(root, files) of a corpus folder, or of the standard library's .py files by default."""
    if data_dir is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, _files(root, (".py",), INSTALLED_PACKAGES)
    root = Path(data_dir).resolve()
    files = _files(root, None)
    if not files:
        raise ValueError(f"data.data_dir={str(data_dir)!r} contains no files to train on")
    return root, files


def is_val(name: str) -> bool:
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def _records(path: Path, text_field: str):
    """The texts of a .jsonl/.json/.parquet file's records, streamed by `datasets`."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(f"reading {path.name} needs Hugging Face datasets: pip install -e '.[data]'") from None
    builder = "parquet" if path.suffix == ".parquet" else "json"
    rows = load_dataset(builder, data_files=str(path), split="train", streaming=True)
    for i, row in enumerate(rows):
        if text_field not in row:
            raise ValueError(f"data.text_field={text_field!r} is not a field of the records in {path} "
                             f"(they have {sorted(row)})")
        yield i, row[text_field]


def documents(root: Path, files: list[Path], text_field: str = "text", raw: bool = False):
    """(name, text) of every document: a whole text file (bytes, with raw) or one record."""
    for path in files:
        rel = str(path.relative_to(root))
        if path.suffix in RECORDS:
            for i, text in _records(path, text_field):
                yield f"{rel}:{i}", text.encode("utf-8") if raw else text
        else:
            data = path.read_bytes()
            yield rel, data if raw else data.decode("utf-8", errors="replace")


def hub_documents(name: str, split: str, text_field: str, raw: bool = False):
    """(name, text) of the records of a Hugging Face dataset (a hub name or a local path), streamed."""
    from datasets import load_dataset

    for i, row in enumerate(load_dataset(name, split=split, streaming=True)):
        if text_field not in row:
            raise ValueError(f"data.text_field={text_field!r} is not a field of {name!r} (it has {sorted(row)})")
        yield f"{i}", row[text_field].encode("utf-8") if raw else row[text_field]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def cache_name(data_dir: str | None, hf_dataset: str | None, tokenizer: Tokenizer) -> str:
    """The cache folder's name: the source, and for a tokenizer its name and fingerprint."""
    if hf_dataset is not None:
        base = f"{Path(hf_dataset).name}-{hashlib.md5(hf_dataset.encode()).hexdigest()[:8]}"
    elif data_dir is None:
        base = f"stdlib-py{platform.python_version()}"
    else:
        source = Path(data_dir).resolve()
        base = f"{source.name}-{hashlib.md5(str(source).encode()).hexdigest()[:8]}"
    return base if tokenizer.kind == "bytes" else f"{base}-{tokenizer.name}-{tokenizer.fingerprint[:10]}"


class _Split:
    """One output file: tokens appended with a running count and checksum."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.file = path, dtype, open(path, "wb")
        self.digest, self.tokens = hashlib.sha256(), 0

    def write(self, ids) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.tokens += len(data) // self.dtype.itemsize


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _move_tail(src: Path, dst: Path, keep: int, itemsize: int) -> None:
    """Append src's tokens after the first `keep` to dst and cut src there."""
    with open(src, "rb") as f, open(dst, "ab") as g:
        f.seek(keep * itemsize)
        shutil.copyfileobj(f, g)
    os.truncate(src, keep * itemsize)


def build(docs, out: Path, tokenizer: Tokenizer, source: str, total: int | None = None) -> dict:
    """Tokenize `docs` ((name, text) pairs) into out/{train,val}.bin and meta.json, built in a
    temporary folder renamed to `out` when complete; returns the meta."""
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{os.urandom(3).hex()}")
    tmp.mkdir(parents=True)
    try:
        splits = {name: _Split(tmp / f"{name}.bin", dtype) for name in ("train", "val")}
        # Bytes keep a newline after each document; a tokenizer its end-of-text token.
        sep = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
        batch, chars, count = [], 0, 0
        threads = os.cpu_count() or 1
        with tqdm(total=total, desc=f"tokenizing into {out.name}", unit="doc", leave=False) as bar:
            def flush():
                texts = [t for _, t in batch]
                if tokenizer.kind == "bytes":  # raw bytes as they are (texts are bytes here)
                    ids = [np.frombuffer(t + b"\n", np.uint8) for t in texts]
                else:
                    ids = [doc + sep for doc in tokenizer.encode_batch(texts, threads)]
                for (name, _), doc in zip(batch, ids):
                    splits["val" if is_val(name) else "train"].write(doc)
                bar.update(len(batch))
                batch.clear()

            for name, text in docs:
                batch.append((name, text))
                chars, count = chars + len(text), count + 1
                if chars >= BATCH_CHARS:
                    flush()
                    chars = 0
            flush()
        for s in splits.values():
            s.file.close()
        train, val = splits["train"], splits["val"]
        by = "by document"
        if not (train.tokens and val.tokens):  # one split empty: the last VAL_PERCENT% of the tokens validate
            total_tokens = train.tokens + val.tokens
            cut = total_tokens - max(1, total_tokens * VAL_PERCENT // 100)
            if val.tokens:  # everything went to validation: its head trains
                _move_tail(val.path, train.path, 0, dtype.itemsize)
            _move_tail(train.path, val.path, cut, dtype.itemsize)
            by = "by tokens"
        sums = {name: (s.digest.hexdigest() if by == "by document" else _sha256(s.path)) for name, s in splits.items()}
        meta = dict(source=source, documents=count, split=by, dtype=dtype.name,
                    tokenizer=dict(kind=tokenizer.kind, name=tokenizer.name, fingerprint=tokenizer.fingerprint,
                                   vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id),
                    splits={name: dict(tokens=s.path.stat().st_size // dtype.itemsize, bytes=s.path.stat().st_size,
                                       sha256=sums[name]) for name, s in splits.items()})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same build first: keep its
            shutil.rmtree(tmp, ignore_errors=True)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_split(folder: Path, split: str, verify: bool = True) -> np.memmap:
    """The split's tokens as a read-only memmap, checked against meta.json (size, and with
    verify its checksum)."""
    meta = json.loads((folder / "meta.json").read_text())
    expected = meta["splits"][split]
    dtype = np.dtype(meta.get("dtype", "uint8"))
    path = folder / f"{split}.bin"
    size = path.stat().st_size if path.exists() else -1
    tokens = expected.get("tokens", expected["bytes"])
    if size != expected["bytes"] or size != tokens * dtype.itemsize:
        raise ValueError(
            f"corpus file {path} has {size} bytes but meta.json says {tokens} {dtype.name} tokens "
            f"({expected['bytes']} bytes): it is truncated or corrupt; delete {folder} to rebuild it"
        )
    if verify and _sha256(path) != expected["sha256"]:
        raise ValueError(f"corpus file {path} does not match its checksum in meta.json: delete {folder} to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r")


def load_tokens(folder: Path, split: str, dtype: str) -> np.memmap:
    """Already tokenized data (nanoGPT's layout: train.bin and val.bin of `dtype` ids)."""
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise ValueError(f"data.tokens_dtype={dtype!r} reads data.data_dir as tokenized data, but {path} does not exist")
    itemsize = np.dtype(dtype).itemsize
    if path.stat().st_size % itemsize:
        raise ValueError(f"data.tokens_dtype={dtype!r}: {path} has {path.stat().st_size} bytes, not a whole number of "
                         f"{itemsize}-byte tokens")
    return np.memmap(path, dtype=dtype, mode="r")
