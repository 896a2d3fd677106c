"""Tokenizers of every kind, made here (nothing is downloaded): round trips, the bytes each token
decodes to (bits per byte's denominator), the end-of-text id, the checkpoint's copy, load errors,
and the offline training command."""
import subprocess
import sys

import numpy as np
import pytest

from longctx.tokenizer import Tokenizer, from_serialized, load_tokenizer, train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3,
         "naïve café — ünïcödé, 東京 and emoji 🚀 too", "for i in range(10):\n    print(i * i)\n"] * 4


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(TEXTS, 300).save(str(path))
    return path


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(TEXTS * 5))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tiny"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return folder / "tiny.model"


def kinds(bpe, sentencepiece):
    return {"bytes": load_tokenizer(None), "huggingface": load_tokenizer(str(bpe)),
            "huggingface folder": load_tokenizer(str(bpe.parent)), "sentencepiece": load_tokenizer(str(sentencepiece))}


@pytest.mark.parametrize("kind", ["bytes", "huggingface", "huggingface folder", "sentencepiece"])
def test_round_trip_and_bytes_per_token(kind, bpe, sentencepiece):
    tok = kinds(bpe, sentencepiece)[kind]
    counts = tok.token_bytes()
    assert counts.shape == (tok.vocab_size,)
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert counts[ids].sum() == len(text.encode("utf-8")), (kind, text)  # exact for these kinds
    rebuilt = from_serialized(tok.serialized())
    assert rebuilt.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and rebuilt.fingerprint == tok.fingerprint


def test_end_of_text_and_fingerprints(bpe, sentencepiece):
    hf, sp = load_tokenizer(str(bpe)), load_tokenizer(str(sentencepiece))
    assert hf.eot_id == 0 and hf.token_bytes()[0] == 0  # <|endoftext|>, decoding to nothing
    assert sp.eot_id == 2  # SentencePiece's </s>
    assert Tokenizer().eot_id is None and Tokenizer().vocab_size == 256
    assert len({hf.fingerprint, sp.fingerprint, Tokenizer().fingerprint}) == 3


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"data.tokenizer='.*nope.json' does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"is a folder without a tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"data.tokenizer='.*broken.json' is not a tokenizer.json or SentencePiece"):
        load_tokenizer(str(tmp_path / "broken.json"))
    (tmp_path / "random.model").write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match=r"random.model' is not a tokenizer.json or SentencePiece model that loads"):
        load_tokenizer(str(tmp_path / "random.model"))


def test_the_training_command_writes_a_tokenizer(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("\n".join(TEXTS))
    (texts / "b.jsonl").write_text('{"text": "a record of its own"}\n{"text": "and another one"}\n')
    out = subprocess.run([sys.executable, "-m", "longctx.tokenizer", "train", f"--data_dir={texts}", "--vocab_size=280",
                          f"--out={tmp_path}/tok/tokenizer.json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 280 and tok.decode(tok.encode("another record")) == "another record"
    assert "wrote" in out.stderr and "from 2 files" in out.stderr


@pytest.mark.parametrize("argv,message", [
    (["--vocab_size=10"], "--vocab_size=10 must be at least 257"),
    (["--data_dir={empty}"], "contains no files to train on"),
])
def test_the_training_command_refuses_bad_settings_with_status_2(argv, message, tmp_path, capsys):
    from longctx.tokenizer import main
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["train", *(a.format(empty=tmp_path / "empty") for a in argv), f"--out={tmp_path}/tokenizer.json"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "tokenizer.json").exists()
