"""Reliability: bad input (settings, data, checkpoints) fails fast with one paragraph, non-finite
losses stop cleanly, faults on one rank end every rank, running out of memory gives hints."""
import shutil
import time

import pytest
import torch

from conftest import ROOT, leftover


def test_default_corpus_is_the_standard_library_without_installed_packages(tmp_path, monkeypatch):
    """The default corpus reads the standard library's .py files, not what pip installed into its
    site-packages (or a distribution's dist-packages): the same corpus on every install of one
    Python release. Split by file, every file once."""
    import sysconfig

    from longctx.data import TextDataModule

    lib = tmp_path / "lib"
    files = {"os.py": "import sys\n", "json/decoder.py": "x = 1\n" * 3, "json/notes.txt": "not python\n",
             "site-packages/torch/nn.py": "pip's\n", "dist-packages/apt.py": "debian's\n",
             "site-packages.py": "a module named like the folder\n"}
    for rel, text in files.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    dm = TextDataModule(cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    folder = dm.corpus_folder()[1]
    corpus = b"".join((folder / f"{split}.bin").read_bytes() for split in ("train", "val"))
    kept = ("os.py", "json/decoder.py", "site-packages.py")
    assert len(corpus) == sum(len(files[r]) + 1 for r in kept)  # each file once, then a newline
    for rel in kept:
        assert files[rel].encode() in corpus
    for rel in ("json/notes.txt", "site-packages/torch/nn.py", "dist-packages/apt.py"):
        assert files[rel].encode() not in corpus


def test_a_folder_of_one_file_is_split_by_bytes(tmp_path):
    """Split by file, a folder's single file would land wholly in train or in validation and
    leave the other split empty. Such a folder is split by bytes: the last 5% validates."""
    from longctx.data import VAL_PERCENT, TextDataModule

    texts = tmp_path / "texts"
    texts.mkdir()
    body = bytes(range(256)) * 40
    (texts / "book.txt").write_bytes(body)
    dm = TextDataModule(seq_len=64, batch_size=2, data_dir=str(texts), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    folder = dm.corpus_folder()[1]
    train, val = ((folder / f"{split}.bin").read_bytes() for split in ("train", "val"))
    assert train + val == body + b"\n"
    assert len(val) == (len(body) + 1) * VAL_PERCENT // 100
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0


def corrupt(kind):
    def make(cache, tmp):
        dst = tmp / "cache"
        shutil.copytree(cache, dst)
        (folder,) = [p for p in dst.iterdir() if p.is_dir()]
        data = bytearray((folder / "train.bin").read_bytes())
        if kind == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0xFF
        (folder / "train.bin").write_bytes(bytes(data))
        return [f"--data.cache_dir={dst}"]
    return make


def text_folder(content):
    def make(cache, tmp):
        folder = tmp / "texts"
        folder.mkdir()
        if content is not None:
            (folder / "a.txt").write_text(content)
        return [f"--data.data_dir={folder}", f"--data.cache_dir={tmp}/c"]
    return make


def bad_checkpoint(kind):
    """--ckpt_path to a file (or folder) that cannot resume a run."""
    def make(cache, tmp):
        path = tmp / "bad.ckpt"
        good = {"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}, "global_step": 3}
        if kind == "missing":
            path = tmp / "nowhere" / "last.ckpt"
        elif kind == "folder":
            path = tmp / "checkpoints"
            path.mkdir()
            (path / "last.ckpt").write_bytes(b"")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            torch.save(good, path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif kind == "random-bytes":
            path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8).numpy().tobytes())
        elif kind == "state-dict":
            torch.save({"w": torch.zeros(3)}, path)
        elif kind == "pickled-object":
            torch.save({"model": torch.nn.Linear(2, 2)}, path)
        return [f"--data.cache_dir={cache}", f"--ckpt_path={path}"]
    return make


def tokenizer_case(kind):
    """A tokenizer (or data) that cannot train: missing, corrupt, too large for the model, records
    without the text field, tokens of the wrong size."""
    def make(cache, tmp):
        from longctx.tokenizer import train_bpe

        args = [f"--data.cache_dir={cache}"]
        if kind == "missing":
            return [*args, "--data.tokenizer=/nonexistent/tok.json"]
        if kind == "corrupt":
            (tmp / "tok.json").write_text('{"model": {"type": "BPE", "vocab": ')
            return [*args, f"--data.tokenizer={tmp}/tok.json"]
        if kind == "too-large":
            train_bpe(["some text to learn from"] * 4, 320).save(str(tmp / "tok.json"))  # 273 tokens: all it finds
            return [*args, f"--data.tokenizer={tmp}/tok.json", "--model.vocab_size=260"]
        folder = tmp / "texts"
        folder.mkdir()
        if kind == "no-field":
            (folder / "a.jsonl").write_text('{"body": "text under another name"}\n')
            return [f"--data.cache_dir={tmp}/c", f"--data.data_dir={folder}"]
        (folder / "train.bin").write_bytes(b"\0" * 4001)
        (folder / "val.bin").write_bytes(b"\0" * 400)
        return [f"--data.data_dir={folder}", "--data.tokens_dtype=uint16"]
    return make


DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--config", f"{ROOT}/configs/attention/ring_dilated.yaml"]

# (id, args or a function (corpus, tmp) -> args, expected exit code, message regex). Under DDP
# both ranks raise the same error; whichever exits first, Lightning's child-process observer
# SIGKILLs the rest, so the code is only known to be non-zero (None below).
BAD = [
    ("unknown-class-path", ['--model.attention={"class_path": "nope"}'], 2, "model.attention.class_path='nope' is not an attention variant: use one of"),
    ("non-variant-class", ['--model.attention={"class_path": "torch.nn.Linear"}'], 2, "'torch.nn.Linear' is not an attention variant"),
    ("unknown-key", ["--model.nope=1"], 2, "unrecognized arguments: --model.nope=1"),
    ("lists-differ", ["--model.dilation_rates=[1,2]"], 2, "segment_lengths has 3 entries .* but dilation_rates has 2"),
    ("lists-empty", ["--model.segment_lengths=[]", "--model.dilation_rates=[]"], 2, "must be non-empty lists"),
    ("segment-zero", ["--model.segment_lengths=[0,32,64]"], 2, "segment length 0 must be an integer >= 1"),
    ("dilation-negative", ["--model.dilation_rates=[1,-2,4]"], 2, "dilation rate -2 must be an integer >= 1"),
    ("not-dividing", ["--model.segment_lengths=[16,32,66]"], 2, "segment length 66 is not divisible by dilation rate 4"),
    ("cp-without-ring", ["--model.context_parallel_size=2"], 2, "model.context_parallel_size=2 needs a ring variant"),
    ("cp-not-dividing-world", ["--config", f"{ROOT}/configs/attention/ring_dilated.yaml", "--model.context_parallel_size=2"], 2,
     "world size 1 is not divisible by model.context_parallel_size=2"),
    ("seq-len-vs-cp (2 ranks)", [*DDP, "--data.seq_len=65"], None, "data.seq_len=65 is not divisible by model.context_parallel_size=2"),
    ("seq-len-vs-segments (2 ranks)", [*DDP, "--data.seq_len=96"], None, "segment length 32 does not divide the per-rank shard of 48 tokens"),
    ("heads-not-dividing", ["--model.d_model=30"], 2, "model.d_model=30 is not divisible by model.n_heads=4"),
    ("head-split-few-heads", ["--model.head_split=true", "--model.n_heads=2"], 2, "needs model.n_heads >= 3 branches, got 2"),
    ("zero-layers", ["--model.n_layers=0"], 2, "model.n_layers=0 must be a positive integer"),
    ("gpu-without-gpu", ["--trainer.accelerator=gpu"], 2, "No supported gpu backend found"),
    ("bad-precision", ["--trainer.precision=bogus"], 2, "trainer.precision"),
    ("unsupported-dropout", ['--model.attention={"class_path": "improved_dilated", "init_args": {"dropout": 0.1}}'], 2,
     "does not support attention dropout"),
    ("data-dir-missing", ["--data.data_dir=/nonexistent/texts"], 2, "data.data_dir='/nonexistent/texts' does not exist"),
    ("data-dir-empty", text_folder(None), 2, "contains no files to train on"),
    ("data-too-short", text_folder("tiny text\n"), 2, "fewer than one window of data.seq_len \\+ 1 = 65"),
    ("memmap-truncated", corrupt("truncate"), 2, "is truncated or corrupt; delete .* to rebuild it"),
    ("memmap-corrupt", corrupt("flip"), 2, "does not match its checksum"),
    ("vocab-too-small", ["--model.vocab_size=100"], 2, "model.vocab_size=100 is smaller than the data's largest token"),
    ("batch-size-zero", ["--data.batch_size=0"], 2, "data.batch_size=0 must be a positive integer"),
    ("fewer-windows-than-a-batch", ["--data.train_windows=2"], 2,
     r"data.train_windows=2 is less than one batch per rank \(data.batch_size=4 x 1 data-parallel ranks\)"),
    ("lr-negative", ["--model.lr=-0.001"], 2, "model.lr=-0.001 must be a positive number"),
    ("max-steps-zero", ["--trainer.max_steps=0"], 2, "trainer.max_steps=0 must be positive"),
    ("warmup-negative", ["--model.warmup_steps=-5"], 2, "model.warmup_steps=-5 must be >= 0"),
    ("mlp-chunk-zero", ["--model.mlp_chunk_tokens=0"], 2, "model.mlp_chunk_tokens=0 must be a positive integer or null"),
    ("compile-mode-unknown", ["--model.compile_mode=fastest"], 2, "model.compile_mode='fastest' must be one of \\['default'"),
    ("unknown-task", ["--data.task=summarise"], 2, "data.task='summarise' must be 'text' or 'passkey'"),
    ("passkey-too-short", ["--data.task=passkey", "--data.seq_len=64"], 2, "data.seq_len=64 is too short for the passkey task"),
    ("rope-base-zero", ["--model.rope_base=0"], 2, r"model.rope_base=0.0 must be a number > 1"),
    ("odd-head-dim", ["--model.d_model=36"], 2, r"model.d_model / model.n_heads = 36 / 4 = 9 must be even"),
    ("mlp-hidden-negative", ["--model.mlp_hidden=-4"], 2, "model.mlp_hidden=-4 must be a positive integer or null"),
    ("mlp-hidden-zero", ["--model.mlp_hidden=0"], 2, "model.mlp_hidden=0 must be a positive integer or null"),
    ("betas-out-of-range", ["--model.betas=[0.9,1.5]"], 2, r"model.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ("attention-unknown-arg", ['--model.attention={"class_path": "dilated", "init_args": {"softmax_scael": 0.1}}'], 2,
     r"model.attention.init_args.softmax_scael: DilatedAttention has no argument 'softmax_scael'; it takes \['dropout', 'softmax_scale'\]"),
    ("attention-arg-set-by-model", ['--model.attention={"class_path": "dilated", "init_args": {"segment_lengths": [8]}}'], 2,
     "model.attention.init_args.segment_lengths is set by model.segment_lengths, not here"),
    ("clip-negative", ["--trainer.gradient_clip_val=-1"], 2, r"trainer.gradient_clip_val=-1(.0)? must be a number >= 0"),
    ("ckpt-missing", bad_checkpoint("missing"), 2, r"ckpt_path='.*nowhere/last.ckpt' does not exist"),
    ("ckpt-folder", bad_checkpoint("folder"), 2, r"ckpt_path='.*checkpoints' is a folder, not a checkpoint file: give one "
     r"of the .ckpt files in it: it holds \['last.ckpt'\]"),
    ("ckpt-empty", bad_checkpoint("empty"), 2, r"ckpt_path='.*bad.ckpt' is empty \(0 bytes\)"),
    ("ckpt-truncated", bad_checkpoint("truncated"), 2, r"ckpt_path='.*bad.ckpt' is truncated: its end is missing"),
    ("ckpt-random-bytes", bad_checkpoint("random-bytes"), 2, r"ckpt_path='.*bad.ckpt' is not a PyTorch checkpoint"),
    ("ckpt-plain-state-dict", bad_checkpoint("state-dict"), 2,
     r"ckpt_path='.*bad.ckpt' is not a train.py checkpoint: it has no 'state_dict' and 'hyper_parameters' \(it holds \['w'\]"),
    ("tokenizer-missing", tokenizer_case("missing"), 2, r"data.tokenizer='/nonexistent/tok.json' does not exist"),
    ("tokenizer-corrupt", tokenizer_case("corrupt"), 2, r"data.tokenizer='.*tok.json' is not a tokenizer.json or SentencePiece"),
    ("tokenizer-exceeds-vocab", tokenizer_case("too-large"), 2,
     r"model.vocab_size=260 is smaller than data.tokenizer='.*tok.json''s 273 tokens: use at least 273, or leave it "
     r"unset for 320"),
    ("records-without-text-field", tokenizer_case("no-field"), 2,
     r"data.text_field='text' is not a field of the records in .*a.jsonl \(they have \['body'\]\)"),
    ("tokens-of-the-wrong-size", tokenizer_case("tokens"), 2,
     r"data.tokens_dtype='uint16': .*train.bin has 4001 bytes, not a whole number of 2-byte tokens"),
    ("ckpt-pickled-object", bad_checkpoint("pickled-object"), 2,
     r"ckpt_path='.*bad.ckpt' is not a checkpoint written by train.py: it holds objects other than tensors"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_configuration_fails_fast_and_clearly(case, corpus, forked, tmp_path):
    import re

    name, args, code, pattern = case
    args = args(corpus, tmp_path) if callable(args) else [f"--data.cache_dir={corpus}", *args]
    start = time.monotonic()
    rc, out = forked([*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=helpers.LogLosses"],
                    cwd=tmp_path, env={"LOSS_LOG": str(tmp_path / "losses")}, timeout=150)
    assert rc != 0 if code is None else rc == code, out[-2000:]
    assert re.search(pattern, out), out[-2000:]
    assert not (tmp_path / "losses").exists(), "a training step ran before the error"
    if "unrecognized" not in pattern and "precision" not in pattern:
        assert "Traceback" not in out, out[-2000:]  # one paragraph, not a stack trace
    assert "weights_only=False" not in out  # never the advice to unpickle anything
    assert time.monotonic() - start < 150
    assert not leftover(str(tmp_path))


def test_nonfinite_loss_can_be_skipped_and_counted(corpus, forked, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, out = forked([f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=true",
                     "--trainer.log_every_n_steps=1", "--model.skip_nonfinite=true",
                     "--trainer.callbacks+=helpers.PoisonEmbedding", "--trainer.callbacks.step=2",
                     "--trainer.callbacks.once=true"], cwd=tmp_path)
    assert rc == 0, out[-2000:]
    (events,) = (tmp_path / "runs").rglob("events*")
    ea = EventAccumulator(str(events))
    ea.Reload()
    skips = [e.value for e in ea.Scalars("train/nonfinite_skips")]
    assert skips[0] == 0.0 and skips[-1] == 1.0 and skips == sorted(skips)
    assert all(torch.isfinite(torch.tensor(e.value)) for e in ea.Scalars("train/loss"))


def test_checkpoint_with_nonfinite_weights_is_refused():
    from longctx.lit_module import LongContextLM

    module = LongContextLM(d_model=32, n_heads=4, n_layers=1, segment_lengths=[16], dilation_rates=[1])
    module.on_save_checkpoint({})  # finite: fine
    with torch.no_grad():
        module.model.blocks[0].mlp.down.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"refusing to save a checkpoint .* non-finite weights in \['model.blocks.0.mlp.down.weight'\]"):
        module.on_save_checkpoint({})


@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_ends_every_rank(rank, corpus, forked, tmp_path):
    start = time.monotonic()
    rc, out = forked([f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy=ddp",
                     "--trainer.devices=2", "--trainer.callbacks+=helpers.RaiseOnRank", f"--trainer.callbacks.rank={rank}",
                     "--trainer.callbacks.step=2"], cwd=tmp_path, timeout=120)
    assert rc != 0
    assert f"RuntimeError: injected failure on rank {rank}" in out
    assert time.monotonic() - start < 120
    time.sleep(1)
    assert not leftover(str(tmp_path)), "orphaned rank"


def test_out_of_memory_hints_only_what_the_run_does_not_use():
    from types import SimpleNamespace

    from longctx.cli import oom_message

    def message(**hparams):
        h = dict(seq_len=1 << 20, n_layers=12, d_model=768, activation_checkpointing=True, mlp_chunk_tokens=131072,
                 compile=True)
        h.update(hparams)
        model = SimpleNamespace(hparams=SimpleNamespace(**h), layout=SimpleNamespace(cp_size=1),
                                variant="improved_dilated")
        return oom_message(model, SimpleNamespace(batch_size=1), RuntimeError("CUDA out of memory."))

    graphed = message()
    assert "model.compile=false" in graphed and "ring variant" in graphed
    assert "activation_checkpointing=true" not in graphed and "mlp_chunk_tokens=" not in graphed
    assert "batch_size 1" in graphed and "smaller data.batch_size" not in graphed
    plain = message(activation_checkpointing=False, mlp_chunk_tokens=None, compile=False)
    assert "model.activation_checkpointing=true" in plain and "model.mlp_chunk_tokens=131072" in plain
    assert "compile=false" not in plain
    assert "offload_checkpoints=true" not in graphed + plain  # compiled / not checkpointed
    eager = message(compile=False)
    assert "model.offload_checkpoints=true" in eager and "compile=false" not in eager
    assert "offload_checkpoints=true" not in message(compile=False, offload_checkpoints=True)


def test_out_of_memory_names_the_run_and_hints(corpus, forked, tmp_path):
    rc, out = forked([f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.callbacks+=helpers.RaiseOnRank", "--trainer.callbacks.rank=0",
                     "--trainer.callbacks.step=1", "--trainer.callbacks.oom=gpu"], cwd=tmp_path)
    assert rc == 1
    assert ("error: OutOfMemoryError: out of GPU memory training improved_dilated at seq_len 64 (64 tokens per rank), "
            "batch_size 4") in out
    assert "activation_checkpointing=true" in out and "ring variant" in out and "Tried to allocate 20.00 GiB" in out
    assert "Traceback" not in out


def test_out_of_host_memory_gets_the_same_hints(corpus, forked, tmp_path):
    """A real allocation the CPU allocator refuses (1 PiB): the same paragraph as on a GPU."""
    rc, out = forked([f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.callbacks+=helpers.RaiseOnRank", "--trainer.callbacks.rank=0",
                     "--trainer.callbacks.step=1", "--trainer.callbacks.oom=cpu"], cwd=tmp_path)
    assert rc == 1, out[-2000:]
    assert ("error: OutOfMemoryError: out of CPU memory training improved_dilated at seq_len 64 (64 tokens per rank), "
            "batch_size 4") in out
    assert "model.activation_checkpointing=true" in out and "a ring variant over more processes" in out
    assert "offload_checkpoints" not in out  # pinned host memory is no help without a GPU
    assert "PyTorch said: DefaultCPUAllocator: can't allocate memory: you tried to allocate 1125899906842624 bytes" in out
    assert "Traceback" not in out
