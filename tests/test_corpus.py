"""Preparing corpora: folders of text, JSONL and Parquet files into token memmaps of the right
dtype, with every document's tokens counted by hand; the cache keyed by the tokenizer; an
interrupted build leaves nothing that is taken for complete; bad inputs are named."""
import json

import numpy as np
import pytest

from longctx import corpus
from longctx.data import TextDataModule
from longctx.tokenizer import Tokenizer, load_tokenizer, train_bpe

DOCS = {"notes/a.txt": "first document, plain text\n", "b.txt": "second one: def f(x): return x\n",
        "c.txt": "a third text " * 40}
RECORDS = ["a record in a JSON line", "another record", "r\u00e9sum\u00e9 of the third"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe([*DOCS.values(), *RECORDS] * 3, 320).save(str(path))
    return load_tokenizer(str(path))


@pytest.fixture
def folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "texts"
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(RECORDS)))
    pq.write_table(pa.table({"text": RECORDS[::-1], "n": [1, 2, 3]}), root / "e.parquet")
    return root


def build(folder, tokenizer, out, raw=False):
    root, files = corpus.source_files(str(folder))
    return corpus.build(corpus.documents(root, files, "text", raw), out, tokenizer, str(folder), len(files))


def test_a_folder_of_text_jsonl_and_parquet_becomes_tokens(folder, bpe, tmp_path):
    meta = build(folder, bpe, tmp_path / "cache")
    texts = [*DOCS.values(), *RECORDS, *RECORDS]
    expected = sum(len(bpe.encode(t)) + 1 for t in texts)  # each document, then <|endoftext|>
    assert meta["dtype"] == "uint16" and meta["documents"] == len(texts)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == expected
    assert meta["tokenizer"]["fingerprint"] == bpe.fingerprint
    train, val = (corpus.load_split(tmp_path / "cache", s) for s in ("train", "val"))
    assert train.dtype == np.uint16
    decoded = bpe.decode(np.concatenate([train, val]))
    for t in texts:
        assert t in decoded
    assert np.count_nonzero(np.concatenate([train, val]) == bpe.eot_id) == len(texts)


def test_bytes_keep_the_files_as_they_are(folder, tmp_path):
    meta = build(folder, Tokenizer(), tmp_path / "cache", raw=True)
    assert meta["dtype"] == "uint8"
    data = b"".join(corpus.load_split(tmp_path / "cache", s).tobytes() for s in ("train", "val"))
    for t in DOCS.values():
        assert t.encode() + b"\n" in data
    assert "résumé".encode() in data


def test_a_vocabulary_over_65536_takes_uint32(folder, tmp_path):
    class Wide(Tokenizer):
        kind, vocab_size, eot_id, name, fingerprint = "wide", 70000, 69999, "wide", "f" * 64

        def encode(self, text):
            return [69000 + b for b in text.encode()]

    meta = build(folder, Wide(), tmp_path / "cache")
    tokens = corpus.load_split(tmp_path / "cache", "train")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32 and tokens.max() == 69999


def test_an_interrupted_build_leaves_no_cache(folder, bpe, tmp_path):
    root, files = corpus.source_files(str(folder))

    def docs():
        for i, doc in enumerate(corpus.documents(root, files)):
            if i == 3:
                raise KeyboardInterrupt
            yield doc

    with pytest.raises(KeyboardInterrupt):
        corpus.build(docs(), tmp_path / "cache", bpe, "x")
    assert list(tmp_path.iterdir()) == [tmp_path / "texts"]  # neither the cache nor its temporary folder
    build(folder, bpe, tmp_path / "cache")
    assert (tmp_path / "cache" / "meta.json").exists()


def test_the_cache_is_keyed_by_the_tokenizer(folder, bpe):
    plain, tokenized = (corpus.cache_name(str(folder), None, t) for t in (Tokenizer(), bpe))
    assert plain.startswith("texts-") and tokenized.startswith(plain) and tokenized.endswith(bpe.fingerprint[:10])
    assert corpus.cache_name(None, None, Tokenizer()).startswith("stdlib-py")


def test_records_without_the_text_field_are_named(folder, bpe, tmp_path):
    with pytest.raises(ValueError, match=r"data.text_field='body' is not a field of the records in .*d.jsonl "
                                         r"\(they have \['id', 'text'\]\)"):
        root, files = corpus.source_files(str(folder))
        corpus.build(corpus.documents(root, files, "body"), tmp_path / "cache", bpe, "x")
    assert not (tmp_path / "cache").exists()


def test_a_memmap_that_does_not_match_its_meta_is_refused(folder, bpe, tmp_path):
    build(folder, bpe, tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    meta["dtype"] = "uint32"
    (tmp_path / "cache" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train.bin has \d+ bytes but meta.json says \d+ uint32 tokens"):
        corpus.load_split(tmp_path / "cache", "train")


def test_already_tokenized_data_loads_directly(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 500
    ids.tofile(tmp_path / "train.bin")
    ids[:300].tofile(tmp_path / "val.bin")
    dm = TextDataModule(seq_len=64, batch_size=2, data_dir=str(tmp_path), tokens_dtype="uint16", train_windows=8)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.max_token() == 499 and len(dm.train_set.tokens) == 1000
    (tmp_path / "val.bin").write_bytes(b"\0" * 301)
    with pytest.raises(ValueError, match=r"data.tokens_dtype='uint16': .*val.bin has 301 bytes, not a whole number"):
        dm.setup("fit")


def test_a_hugging_face_dataset_by_name_or_path(tmp_path):
    """data.hf_dataset streams a dataset through `datasets` (here a local one: no network)."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    texts = [f"record number {i} of a dataset, with enough text to cut windows from. " * 3 for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    dm = TextDataModule(seq_len=32, batch_size=2, hf_dataset=str(folder), text_field="content",
                        cache_dir=str(tmp_path / "cache"), train_windows=8)
    dm.prepare_data()
    dm.setup("fit")
    data = b"".join(corpus.load_split(dm.corpus_folder()[1], s).tobytes() for s in ("train", "val"))
    assert len(data) == sum(len(t.encode()) + 1 for t in texts) and texts[7].encode() in data
