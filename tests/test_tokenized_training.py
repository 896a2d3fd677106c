"""Training with a tokenizer through train.py as a user runs it: every variant fits and resumes;
bits per byte counts the bytes the tokens decode to (checked against a hand count); the passkey
task plants and scores tokens; the checkpoint carries the tokenizer."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from longctx.attention import REGISTRY
from longctx.cli import cli_main
from longctx.data import PasskeyDataset
from longctx.tokenizer import from_serialized, load_tokenizer, train_bpe

TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")
TEXT = ("def tokens(text):\n    return text.split()\n\nclass Window:\n    size = 64\n" * 30 +
        "The long context model reads every window of text and predicts the next token.\n" * 40)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    texts = folder / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"doc{i}.txt").write_text(TEXT[i * 200:] + TEXT[: i * 200])
    train_bpe([TEXT] * 3, 384).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json", texts


def test_bits_per_byte_counts_the_decoded_bytes(bpe, tmp_path):
    path, texts = bpe
    cli = cli_main(["fit", "--config", TINY, f"--data.tokenizer={path}", f"--data.data_dir={texts}",
                    f"--data.cache_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                    "--trainer.limit_val_batches=1", "--data.val_windows=4", "--trainer.val_check_interval=2"])
    tok = load_tokenizer(str(path))
    assert tok.vocab_size % 64 and cli.model.hparams.vocab_size == 384  # the tokenizer's, padded to a multiple of 64
    batch = torch.stack([cli.datamodule.val_set[i]["tokens"] for i in range(4)])
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        nats = F.cross_entropy(cli.model.eval()(x).flatten(0, 1), y.reshape(-1), reduction="sum").item()
    nbytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for row in y)  # every window decoded whole
    assert nbytes > 2 * y.numel()  # a BPE token is several bytes: bits per token would be far off
    metrics = cli.trainer.callback_metrics
    assert metrics["val/bpb"].item() == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-4)
    assert metrics["val/loss"].item() == pytest.approx(nats / y.numel(), rel=1e-4)


def test_the_passkey_task_plants_tokens(bpe):
    tok = load_tokenizer(str(bpe[0]))
    data = PasskeyDataset(seq_len=256, n=8, seed=0, buckets=4, tokenizer=tok)
    for i in range(8):
        item = data[i]
        tokens, answer = item["tokens"], item["answer"]
        assert tokens.shape == (257,) and int(tokens.max()) < tok.vocab_size <= data.max_token + 200
        digits = tok.decode(tokens[answer].tolist())
        assert digits.isdigit() and len(digits) == 5
        text = tok.decode(tokens.tolist())
        assert text.endswith(f"<key?{digits}>") and f"<key={digits}>" in text


@pytest.mark.parametrize("variant", sorted(REGISTRY))
def test_every_variant_trains_and_resumes_with_a_tokenizer(variant, bpe, corpus, forked, tmp_path):
    path, texts = bpe
    args = [f"--data.tokenizer={path}", f"--data.data_dir={texts}", f"--data.cache_dir={corpus}",
            f"--trainer.default_root_dir={tmp_path}", "--config", f"{ROOT}/configs/attention/{variant}.yaml",
            "--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.save_last=true"]
    rc, out = forked([*args, "--trainer.max_steps=2"], cwd=tmp_path)
    assert rc == 0, out[-2000:]
    rc, out = forked([*args, "--trainer.max_steps=3", "--ckpt_path=last"], cwd=tmp_path)
    assert rc == 0, out[-2000:]
    assert "--ckpt_path last: resuming from" in out
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and saved["hyper_parameters"]["vocab_size"] == 384
    assert from_serialized(saved["TextDataModule"]["tokenizer"]).encode(TEXT[:80]) == load_tokenizer(str(path)).encode(TEXT[:80])


def test_the_readme_command_with_a_tokenizer(bpe, corpus, forked, tmp_path):
    """configs/quickstart.yaml on the built-in corpus with --data.tokenizer, as the README says."""
    rc, out = forked([f"--data.tokenizer={bpe[0]}", f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp_path}",
                      "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
                      "--trainer.enable_progress_bar=false"], cwd=tmp_path, config=f"{ROOT}/configs/quickstart.yaml",
                     timeout=300)
    assert rc == 0, out[-2000:]
    tokens = load_tokenizer(str(bpe[0])).vocab_size
    assert f"model.vocab_size=384: data.tokenizer's {tokens} tokens, padded to a multiple of 64" in out
    assert list((tmp_path / "runs").glob(f"improved_dilated-512-{bpe[0].parent.name}/version_0/checkpoints/*.ckpt"))
