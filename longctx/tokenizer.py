"""Tokenizers: bytes (the default), a Hugging Face `tokenizer.json` (or a folder holding one, as
`transformers` saves it), or a SentencePiece `.model`; and a byte-level BPE trained offline:

    python -m longctx.tokenizer train --data_dir DIR --vocab_size 32000 --out tokenizer.json

Every kind gives ids in [0, vocab_size), an end-of-text id that separates documents, a
fingerprint (the file's SHA-256, part of every cache key), and `token_bytes()`: how many UTF-8
bytes each token contributes to decoded text, which makes bits per byte comparable across
tokenizers (docs/design.md#training).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np

# End-of-text tokens of common tokenizers (GPT-2 and ours, Llama 3, Llama 2 / Mistral / T5, Gemma).
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """encode(text) -> ids; decode(ids) -> text; vocab_size; eot_id (None: documents are joined
    without a separator); fingerprint; token_bytes() -> (vocab_size,) int64; serialized() -> what
    a checkpoint keeps to rebuild it (from_serialized)."""

    kind = "bytes"
    vocab_size = 256
    eot_id: int | None = None
    unk_id: int | None = None  # the id of text the tokenizer cannot encode (None: it encodes any)
    fingerprint = "bytes"
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def serialized(self) -> dict:
        return {"kind": "bytes"}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (GPT-2, Llama 3, Mistral, Qwen files all load)."""

    kind = "huggingface"

    def __init__(self, text: str, fingerprint: str, name: str):
        from tokenizers import Tokenizer as HF

        self.tok = HF.from_str(text)
        self.text, self.fingerprint, self.name = text, fingerprint, name
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.eot_id = next((vocab[n] for n in EOT_NAMES if n in vocab), None)
        unk = getattr(self.tok.model, "unk_token", None)  # byte-level BPE has none: any text encodes
        self.unk_id = vocab.get(unk) if unk else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        # The library spreads a batch over its own threads (RAYON_NUM_THREADS, default: all cores).
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """Byte-level BPE: one byte a character of the token (exact). Otherwise a piece's text with
        SentencePiece's "▁" as a space, "<0xNN>" pieces one byte, WordPiece's "##" dropped."""
        import json

        decoder = json.loads(self.text).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if "ByteLevel" in kinds:
                out[i] = len(token)
            elif BYTE_PIECE.fullmatch(token) and "ByteFallback" in kinds:
                out[i] = 1
            else:
                out[i] = len(token.removeprefix("##").replace("\u2581", " ").encode("utf-8"))
        return out

    def serialized(self) -> dict:
        return {"kind": self.kind, "text": self.text, "name": self.name}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, proto: bytes, fingerprint: str, name: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.proto, self.fingerprint, self.name = proto, fingerprint, name
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            piece = self.sp.id_to_piece(i)
            out[i] = 1 if self.sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def serialized(self) -> dict:
        return {"kind": self.kind, "proto": self.proto, "name": self.name}


def load_tokenizer(spec: str | None, key: str = "data.tokenizer") -> Tokenizer:
    """None: bytes. A tokenizer.json, a folder holding one, or a SentencePiece .model file;
    ValueError naming `key` and the path for anything else."""
    if spec is None:
        return Tokenizer()
    path = Path(spec)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise ValueError(f"{key}={spec!r} is a folder without a tokenizer.json or tokenizer.model")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{key}={spec!r} does not exist: give a tokenizer.json, a folder holding one, or a "
                         "SentencePiece .model (train one with python -m longctx.tokenizer train)")
    data = path.read_bytes()
    fingerprint = hashlib.sha256(data).hexdigest()
    name = path.parent.name if path.name in ("tokenizer.json", "tokenizer.model") else path.stem
    try:
        # A tokenizer.json is a JSON object; a SentencePiece model a protobuf, whose first byte
        # may be a newline (field 1's tag), so the suffix decides before the content does.
        if path.suffix != ".model" and data.lstrip()[:1] == b"{":
            return HFTokenizer(data.decode("utf-8"), fingerprint, name)
        return SentencePieceTokenizer(data, fingerprint, name)
    except ImportError as e:
        raise ValueError(f"{key}={spec!r} needs the {e.name} package: pip install -e '.[data]'") from None
    except Exception as e:  # the libraries' parse errors have no common type
        raise ValueError(f"{key}={spec!r} is not a tokenizer.json or SentencePiece model that loads "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def from_serialized(state: dict) -> Tokenizer:
    """The tokenizer a checkpoint kept (Tokenizer.serialized)."""
    kind = state["kind"]
    if kind == "bytes":
        return Tokenizer()
    if kind == "huggingface":
        return HFTokenizer(state["text"], hashlib.sha256(state["text"].encode()).hexdigest(), state["name"])
    return SentencePieceTokenizer(state["proto"], hashlib.sha256(state["proto"]).hexdigest(), state["name"])


def train_bpe(texts, vocab_size: int, total: int | None = None):
    """A byte-level BPE (GPT-2's byte alphabet, so any text encodes) with <|endoftext|> as id 0,
    trained on an iterator of texts with the `tokenizers` trainer and its progress bar."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_NAMES[0]], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=total)
    return tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m longctx.tokenizer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a folder (default: the built-in corpus)")
    t.add_argument("--data_dir", help="a folder of text, .jsonl or .parquet files; default: this Python's "
                                      "standard-library sources")
    t.add_argument("--text_field", default="text", help="the field holding the text in .jsonl and .parquet files")
    t.add_argument("--vocab_size", type=int, default=32000, help="tokens in the vocabulary (default 32000)")
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    args = p.parse_args(argv)
    from .corpus import documents, source_files

    if args.vocab_size < 257:  # t.error: usage, one line, exit status 2, as train.py and generate.py
        t.error(f"--vocab_size={args.vocab_size} must be at least 257 (256 bytes and <|endoftext|>)")
    try:
        root, files = source_files(args.data_dir)
    except ValueError as e:
        t.error(str(e))
    tok = train_bpe((text for _, text in documents(root, files, args.text_field)), args.vocab_size, len(files))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens, from {len(files)} files under {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
