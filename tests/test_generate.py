"""Generation with the bounded dilated KV cache: teacher-forced decoding equals the full forward
at every position for every variant and layout (float32, CPU); the cache holds
Σ_i ⌈w_i / r_i⌉ rows a head and does not grow; greedy decoding is deterministic and sampling
with a seed reproducible; the command decodes with the checkpoint's own tokenizer."""
import math
import os
import subprocess
import sys

import pytest
import torch

from longctx.attention import REGISTRY
from longctx.decode import Decoder
from longctx.generate import generate, sample
from longctx.lit_module import LongContextLM
from longctx.model import LongNetLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")
LAYOUTS = {  # (segment_lengths, dilation_rates, head_split)
    "longnet": ([8, 16, 32], [1, 2, 4], False),
    "longnet-head-split": ([8, 16, 32], [1, 2, 4], True),
    "no-r1-branch": ([6, 12], [2, 3], False),  # some positions of some heads are kept by no branch
}


def model_of(variant, layout, vocab=64):
    torch.manual_seed(0)
    ws, rs, hs = LAYOUTS[layout]
    return LongNetLM(vocab, 32, 2, 4, REGISTRY[variant], dict(segment_lengths=ws, dilation_rates=rs, head_split=hs)).eval()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("variant", sorted(REGISTRY))
def test_teacher_forced_decoding_equals_the_full_forward(variant, layout):
    """45 tokens (odd; past segments of 6, 8, 12, 16 and 32) from prompts of 1, 7, 16 and 33."""
    model = model_of(variant, layout)
    idx = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
    for prompt in (1, 7, 16, 33):
        decoder = Decoder(model, 2, torch.float32, "cpu")
        logits = [decoder.prefill(idx[:, :prompt])]
        logits += [decoder.step(idx[:, t]) for t in range(prompt, 44)]
        got, want = torch.stack(logits, 1), full[:, prompt - 1 : 44]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (prompt, (got - want).abs().max())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_cache_holds_the_segments_kept_rows_and_does_not_grow(layout):
    model = model_of("improved_dilated", layout)
    ws, rs, _ = LAYOUTS[layout]
    rows = sum(math.ceil(w / r) for w, r in zip(ws, rs))  # a head's kept rows of one segment per branch
    decoder = Decoder(model, 1, torch.float32, "cpu")
    for cache in decoder.caches:
        assert cache.k.shape == cache.v.shape == (1, 4, rows, 8)
    before = [(c.k.data_ptr(), c.k.numel()) for c in decoder.caches]
    decoder.prefill(torch.randint(0, 64, (1, 5)))
    for t in range(60):  # far past every segment length
        decoder.step(torch.tensor([t % 64]))
    assert [(c.k.data_ptr(), c.k.numel()) for c in decoder.caches] == before
    assert decoder.nbytes() == 2 * 2 * 4 * rows * 8 * 4  # 2 layers, k and v, 4 heads, D = 8, float32


def test_greedy_is_deterministic_and_sampling_reproducible_with_a_seed():
    model = model_of("improved_dilated", "longnet")
    prompt = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    greedy = [generate(model, prompt, 12, temperature=0) for _ in range(2)]
    assert torch.equal(*greedy) and torch.equal(greedy[0][:, :9], prompt)
    one_by_one = torch.cat([generate(model, prompt[i : i + 1], 12, temperature=0) for i in range(3)])
    assert torch.equal(greedy[0], one_by_one)  # a batch decodes each sequence as alone
    drawn = [generate(model, prompt, 12, temperature=1.0, top_k=20, top_p=0.9, seed=s) for s in (7, 7, 8)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_sampling_keeps_to_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, 2, None, g)) for _ in range(200)} == {0, 1}
    assert {int(sample(logits, 1.0, None, 0.75, g)) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reach 0.75
    assert int(sample(logits, 0.0, None, None, g)) == 0


def test_the_command_decodes_with_the_checkpoints_tokenizer(tmp_path):
    from longctx.cli import cli_main
    from longctx.tokenizer import train_bpe

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("def greet(name):\n    return 'hello ' + name\n" * 200)
    train_bpe([(texts / "a.txt").read_text()], 300).save(str(tmp_path / "tokenizer.json"))
    cli_main(["fit", "--config", TINY, f"--data.tokenizer={tmp_path / 'tokenizer.json'}", f"--data.data_dir={texts}",
              f"--data.cache_dir={tmp_path}/cache", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=20",
              "--trainer.enable_checkpointing=true"])
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    os.remove(tmp_path / "tokenizer.json")  # the checkpoint's copy is all the command needs
    run = [sys.executable, "-m", "longctx.generate", f"--checkpoint={ckpt}", "--max_new_tokens=12", "--temperature=0",
           "--device=cpu"]
    out = subprocess.run([*run, "--prompt=def greet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("def greet") and len(out.stdout) > len("def greet")
    assert "[2 prompt tokens, 12 new; prefill" in out.stderr and "tokens/s; cache" in out.stderr
    again = subprocess.run(run, input="def greet", capture_output=True, text=True, timeout=300)  # from stdin
    assert again.returncode == 0 and again.stdout == out.stdout
    bad = subprocess.run([*run[:3], f"--checkpoint={tmp_path}", "--prompt=x"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "is a folder, not a checkpoint file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt="], "the prompt is empty"),
    (["--prompt=x", "--max_new_tokens=0"], "need max_new_tokens >= 1"),
    (["--prompt=x", "--temperature=-1"], "temperature >= 0"),
    (["--prompt=x", "--top_p=1.5"], "top_p in (0, 1]"),
    (["--prompt=x", "--top_p=0"], "top_p in (0, 1]"),
    (["--prompt_file=/nonexistent/prompt.txt"], "cannot read the prompt from /nonexistent/prompt.txt"),
    (["--prompt=x", "--checkpoint=PLAIN"], "a plain model state_dict is not a run's checkpoint"),
    (["--prompt=x", "--checkpoint=FOREIGN"], "is not a longctx run's checkpoint (TypeError"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, args, message):
    from longctx.generate import main

    model = LongContextLM(vocab_size=256, d_model=32, n_layers=1, n_heads=2, segment_lengths=[8], dilation_rates=[1],
                          seq_len=8)
    paths = {"GOOD": tmp_path / "good.ckpt", "PLAIN": tmp_path / "plain.ckpt", "FOREIGN": tmp_path / "foreign.ckpt"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, paths["GOOD"])
    torch.save(model.model.state_dict(), paths["PLAIN"])
    torch.save({"state_dict": {}, "hyper_parameters": {"hidden": 12}}, paths["FOREIGN"])
    args = [a.replace("PLAIN", str(paths["PLAIN"])).replace("FOREIGN", str(paths["FOREIGN"])) for a in args]
    with pytest.raises(SystemExit) as stop:
        main([f"--checkpoint={paths['GOOD']}", "--device=cpu", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_prompt_the_tokenizer_can_only_encode_as_unknown_is_refused():
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from longctx.generate import prompt_ids
    from longctx.tokenizer import HFTokenizer

    words = HF(models.WordLevel({"def": 0, "greet": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = HFTokenizer(words.to_str(), "fp", "words")
    assert prompt_ids(tokenizer, "def greet") == [0, 1]
    with pytest.raises(ValueError, match=r"cannot encode: it becomes the unknown token \(id 2\) at 2 place"):
        prompt_ids(tokenizer, "def émoji greet ✓")
