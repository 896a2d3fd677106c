"""Reliability (issue 8): bad input fails fast and clearly, resume is exact, checkpoints are
atomic, non-finite losses stop cleanly, faults on one rank end every rank."""
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A built default corpus (cache folder), shared by the cases of this module."""
    from longctx.data import TextDataModule

    cache = tmp_path_factory.mktemp("cache")
    TextDataModule(cache_dir=str(cache)).prepare_data()
    return cache


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


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """run(args, cwd, env, timeout) -> (exit code, output) of `python train.py fit --config TINY
    *args` in cwd, through tests/forkserver.py: train.py's imports are paid once for the module's
    runs (~8 s each on 2 cores). The code is Popen's: negative for a signal. On timeout the run's
    session is killed (no orphans) and TimeoutExpired raised."""
    logs = tmp_path_factory.mktemp("forked")
    count = 0
    server_env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")], env=server_env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    pending = b""

    def answer(deadline):
        nonlocal pending
        while b"\n" not in pending:
            if not select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(server.stdout.fileno(), 4096)
            assert chunk, "the fork server died"
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        return json.loads(line)

    def run(args, cwd, env=None, timeout=180):
        nonlocal count
        deadline, count = time.monotonic() + timeout, count + 1
        out = str(logs / f"run{count}.out")
        request = {"args": ["fit", "--config", TINY, *args], "cwd": str(cwd), "env": env or {}, "out": out}
        server.stdin.write((json.dumps(request) + "\n").encode())
        pid = answer(deadline)["pid"]
        done = answer(deadline)
        if done is None:
            os.killpg(pid, 9)
            answer(time.monotonic() + 60)
            raise subprocess.TimeoutExpired(request["args"], timeout)
        return done["rc"], open(out).read()

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def leftover(marker: str) -> list[str]:
    """Processes whose command line contains `marker` (other than ourselves)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and "pytest" not in cmd:
                found.append(cmd)
    return found


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
    assert time.monotonic() - start < 150
    assert not leftover(str(tmp_path))


def ckpt_args(tmp, name, corpus):
    return [f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp / name}", "--trainer.max_steps=12",
            "--data.train_windows=32", "--trainer.enable_checkpointing=true", "--trainer.callbacks+=helpers.LogLosses",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=-1"]


def losses(path):
    return {int(s): l for s, l in (line.split() for line in open(path))}


@pytest.fixture(scope="module")
def uninterrupted(corpus, forked, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    rc, out = forked(ckpt_args(tmp, "run", corpus), cwd=tmp, env={"LOSS_LOG": str(tmp / "losses")})
    assert rc == 0, out[-2000:]
    return losses(tmp / "losses")


@pytest.mark.parametrize("kill", ["mid-epoch", "while-saving"])
def test_resume_after_sigkill_is_exact(kill, corpus, forked, uninterrupted, tmp_path):
    """8 batches an epoch, checkpoints every 4 steps: killed at step 6 (mid-epoch, after the
    step-4 checkpoint), or while writing last.ckpt at step 8; resumed with --ckpt_path last,
    every later step's loss equals the uninterrupted run's."""
    env = {"LOSS_LOG": str(tmp_path / "losses")}
    args = ckpt_args(tmp_path, "run", corpus)
    if kill == "mid-epoch":
        crash = ["--trainer.callbacks+=helpers.KillAtStep", "--trainer.callbacks.step=6"]
    else:  # saves: step-4 file, last (4), step-8 file, last (8) <- killed half-way through
        crash = ['--trainer.plugins=[{"class_path": "helpers.KillWhileSaving", "init_args": {"nth": 4}}]']
    rc, out = forked([*args, *crash], cwd=tmp_path, env=env)
    assert rc == -9, out[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the previous checkpoint survived intact
    if kill == "while-saving":
        assert (tmp_path / "run" / "checkpoints" / "last.ckpt.tmp").exists()
    rc, out = forked([*args, "--ckpt_path=last"], cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    assert "not resumable" not in out
    resumed = {}
    for line in open(tmp_path / "losses").read().splitlines()[-8:]:
        step, loss = line.split()
        resumed[int(step)] = loss
    assert sorted(resumed) == list(range(5, 13))
    assert resumed == {s: uninterrupted[s] for s in range(5, 13)}


def test_nonfinite_loss_stops_and_names_the_step(corpus, forked, tmp_path):
    rc, out = forked([*ckpt_args(tmp_path, "run", corpus)[:-4], "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                     "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
                     "--trainer.callbacks+=helpers.PoisonEmbedding", "--trainer.callbacks.step=3"],
                    cwd=tmp_path, env={"LOSS_LOG": str(tmp_path / "losses")})
    assert rc == 1, out[-2000:]
    assert "error: FloatingPointError: non-finite training loss (nan" in out and "at step 3" in out
    assert "Traceback" not in out
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        assert state["global_step"] <= 3
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()), ckpt


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
                     "--trainer.callbacks.step=1", "--trainer.callbacks.oom=true"], cwd=tmp_path)
    assert rc == 1
    assert ("error: OutOfMemoryError: out of GPU memory training improved_dilated at seq_len 64 (64 tokens per rank), "
            "batch_size 4") in out
    assert "activation_checkpointing=true" in out and "ring variant" in out and "Tried to allocate 20.00 GiB" in out
