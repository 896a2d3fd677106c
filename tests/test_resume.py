"""Training you can leave running, through train.py as a user runs it: `--ckpt_path last`
resumes exactly with this command's settings and the checkpoint's architecture; SIGTERM and
SIGINT stop every rank after one step with a checkpoint; a SIGKILL, even while saving, loses only
the steps since the last checkpoint; two-rank runs with the shipped callbacks exit 0."""
import json
import os
import signal
import time

import pytest
import torch

from conftest import ROOT, leftover

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
RUN = os.path.join("runs", "improved_dilated-64", "version_0", "checkpoints")  # the default logger's folder


def ckpt_args(tmp, corpus, steps=12, every=4):
    """A `steps`-step run into tmp/run with checkpoints every `every` steps (and last.ckpt),
    each step's loss and learning rate logged to $LOSS_LOG."""
    return [f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp / 'run'}", f"--trainer.max_steps={steps}",
            "--data.train_windows=32", "--trainer.enable_checkpointing=true", "--trainer.callbacks+=helpers.LogLosses",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.every_n_train_steps={every}", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=-1"]


def logged(path, last=None) -> dict[int, tuple[str, float]]:
    """{step: (loss as written, lr)} of LogLosses' file, or of its `last` lines."""
    lines = open(path).read().splitlines()
    return {int(s): (loss, float(lr)) for s, loss, lr in (line.split() for line in lines[-last if last else 0:])}


def losses(run: dict) -> dict[int, str]:
    return {step: loss for step, (loss, _) in run.items()}


@pytest.fixture(scope="module")
def uninterrupted(corpus, forked, tmp_path_factory):
    """(folder, log) of a 12-step single-process run, checkpoints at steps 4, 8 and 12."""
    tmp = tmp_path_factory.mktemp("full")
    rc, out = forked(ckpt_args(tmp, corpus), cwd=tmp, env={"LOSS_LOG": str(tmp / "losses")})
    assert rc == 0, out[-2000:]
    return tmp, logged(tmp / "losses")


@pytest.mark.parametrize("kill", ["mid-epoch", "while-saving"])
def test_resume_after_sigkill_is_exact(kill, corpus, forked, uninterrupted, tmp_path):
    """8 batches an epoch, checkpoints every 4 steps: killed at step 6 (mid-epoch, after the
    step-4 checkpoint), or while writing last.ckpt at step 8; resumed with --ckpt_path last,
    every later step's loss equals the uninterrupted run's. The partial file of the kill while
    saving is removed by the next save."""
    env = {"LOSS_LOG": str(tmp_path / "losses")}
    args = ckpt_args(tmp_path, corpus)
    if kill == "mid-epoch":
        crash = ["--trainer.callbacks+=helpers.KillAtStep", "--trainer.callbacks.step=6"]
    else:  # saves: step-4 file, last (4), step-8 file, last (8) <- killed half-way through
        crash = ['--trainer.plugins=[{"class_path": "helpers.KillWhileSaving", "init_args": {"nth": 4}}]']
    rc, out = forked([*args, *crash], cwd=tmp_path, env=env)
    assert rc == -9, out[-2000:]
    folder = tmp_path / "run" / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # the previous one is intact
    partial = list(folder.glob(".last.ckpt.*.tmp"))
    assert len(partial) == (kill == "while-saving")
    rc, out = forked([*args, "--ckpt_path=last"], cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    assert f"--ckpt_path last: resuming from {folder / 'last.ckpt'}" in out
    resumed = losses(logged(tmp_path / "losses", last=8))
    assert resumed == {s: losses(uninterrupted[1])[s] for s in range(5, 13)}
    assert not list(folder.glob(".*.tmp")), "the dead writer's partial file was left behind"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_with_a_checkpoint_and_resume_is_exact(signum, corpus, forked, uninterrupted, tmp_path):
    """Signalled after step 5, the run finishes step 6, writes last.ckpt into its versioned run
    folder (the default TensorBoard logger), says so and exits 128 + the signal's number; run
    again with --ckpt_path last it continues in the same folder, step for step as if never
    stopped."""
    env = {"LOSS_LOG": str(tmp_path / "losses")}
    args = [*ckpt_args(tmp_path, corpus), "--trainer.logger=true", "--trainer.callbacks+=longctx.callbacks.StepStatsMonitor"]
    rc, out = forked([*args, "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step=5",
                      f"--trainer.callbacks.signum={int(signum)}"], cwd=tmp_path, env=env)
    assert rc == 128 + signum, out[-2000:]
    folder = tmp_path / "run" / RUN
    assert f"stopped by {signum.name} at step 6: saved ./{RUN}/last.ckpt; resume with --ckpt_path last" in out \
        or f"stopped by {signum.name} at step 6: saved {folder}/last.ckpt; resume with --ckpt_path last" in out, out[-2000:]
    assert "Traceback" not in out
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    rc, out = forked([*args, "--ckpt_path=last"], cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    resumed = logged(tmp_path / "losses", last=6)
    assert losses(resumed) == {s: losses(uninterrupted[1])[s] for s in range(7, 13)}
    assert sorted(p.name for p in (tmp_path / "run" / "runs" / "improved_dilated-64").iterdir()) == ["version_0"]
    assert not list(folder.glob("last-v*.ckpt"))  # the resumed run overwrites its last.ckpt
    summary = json.loads((folder.parent / "summary.json").read_text())
    assert summary["steps_measured"] == 6 - 3  # the resumed fit's own warm-up steps left out


TWO_RANKS = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=8", "--data.train_windows=32"]


@pytest.mark.parametrize("variant,signum,rank", [("ring_dilated", signal.SIGTERM, 0), ("improved_dilated", signal.SIGINT, 1)],
                         ids=["ring-SIGTERM-rank0", "ddp-SIGINT-rank1"])
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(variant, signum, rank, corpus, forked, tmp_path):
    """Two ranks (context parallel, or data parallel); one rank is signalled after step 3. Every
    rank takes step 4 and stops; rank 0 saves and the launcher exits 128 + signal; no rank is
    left running; resumed, steps 5-8 equal an uninterrupted two-rank run's."""
    def args(tmp):
        return [*ckpt_args(tmp, corpus, steps=8), *TWO_RANKS, "--config", f"{ROOT}/configs/attention/{variant}.yaml"]

    full = tmp_path / "full"
    full.mkdir()
    rc, out = forked(args(full), cwd=full, env={"LOSS_LOG": str(full / "losses")})
    assert rc == 0, out[-2000:]
    expected = losses(logged(full / "losses"))
    base = args(tmp_path)
    env = {"LOSS_LOG": str(tmp_path / "losses")}
    start = time.monotonic()
    rc, out = forked([*base, "--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step=3",
                      f"--trainer.callbacks.signum={int(signum)}", f"--trainer.callbacks.rank={rank}"],
                     cwd=tmp_path, env=env, timeout=120)
    assert rc == 128 + signum, out[-3000:]
    assert f"stopped by {signum.name} at step 4" in out and out.count("stopped by") == 1
    assert time.monotonic() - start < 120
    time.sleep(1)
    assert not leftover(str(tmp_path)), "a rank is still running"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    rc, out = forked([*base, "--ckpt_path=last"], cwd=tmp_path, env=env)
    assert rc == 0, out[-3000:]
    assert losses(logged(tmp_path / "losses", last=4)) == {s: expected[s] for s in range(5, 9)}


def test_last_with_nothing_to_resume_says_so_and_starts_fresh(corpus, forked, tmp_path):
    rc, out = forked([*ckpt_args(tmp_path, corpus, steps=2), "--trainer.logger=true", "--ckpt_path=last"],
                     cwd=tmp_path, env={"LOSS_LOG": str(tmp_path / "losses")})
    assert rc == 0, out[-2000:]
    assert "--ckpt_path last: no last.ckpt in" in out and "training starts at step 0" in out
    assert "save_last" not in out  # Lightning's hint, wrong here: save_last is set
    assert sorted(logged(tmp_path / "losses")) == [1, 2]


def test_resume_takes_this_commands_settings(corpus, forked, uninterrupted, tmp_path):
    """From the step-4 checkpoint with half the learning rate: every later step uses half the
    uninterrupted run's rate (the schedule continues at step 4, with this command's base)."""
    folder, full = uninterrupted
    env = {"LOSS_LOG": str(tmp_path / "losses")}
    rc, out = forked([*ckpt_args(tmp_path, corpus), "--model.lr=0.005",
                      f"--ckpt_path={folder / 'run' / 'checkpoints' / 'epoch=0-step=4.ckpt'}"], cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    resumed = logged(tmp_path / "losses")
    assert sorted(resumed) == list(range(5, 13))
    for step, (_, lr) in resumed.items():
        assert lr == pytest.approx(full[step][1] / 2, rel=1e-12), step  # tiny.yaml's lr is 0.01
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["lr"] == 0.005


def test_resume_refuses_another_shape_and_takes_the_checkpoints(corpus, forked, uninterrupted, tmp_path):
    """A width given on the command line that differs from the checkpoint's is refused, naming
    both; an architecture setting left at its default comes from the checkpoint."""
    path = uninterrupted[0] / "run" / "checkpoints" / "epoch=0-step=4.ckpt"
    rc, out = forked([*ckpt_args(tmp_path, corpus), "--model.d_model=64", "--model.n_heads=8", f"--ckpt_path={path}"],
                     cwd=tmp_path, env={"LOSS_LOG": str(tmp_path / "losses")})
    assert rc == 2, out[-2000:]
    assert "model.d_model=64 but the checkpoint has 32; model.n_heads=8 but the checkpoint has 4" in out
    assert "Traceback" not in out and not (tmp_path / "losses").exists()

    env = {"LOSS_LOG": str(tmp_path / "losses")}
    rc, out = forked([*ckpt_args(tmp_path, corpus, steps=2, every=2), "--model.rope_base=500", "--model.mlp_hidden=96"],
                     cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    rc, out = forked([*ckpt_args(tmp_path, corpus, steps=3, every=2), "--ckpt_path=last"], cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    assert "from the checkpoint: model.mlp_hidden=96, model.rope_base=500.0" in out
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and saved["hyper_parameters"]["rope_base"] == 500.0
    assert saved["state_dict"]["model.blocks.0.mlp.down.weight"].shape == (32, 96)


def test_a_nonfinite_stop_resumes_with_skip_nonfinite(corpus, forked, tmp_path):
    """The run stops at the NaN of step 3 with every checkpoint finite; the same command with
    --model.skip_nonfinite=true and --ckpt_path last (the remedy the message gives) skips that
    step and finishes: the flag is this command's, not the checkpoint's."""
    env = {"LOSS_LOG": str(tmp_path / "losses")}
    args = [*ckpt_args(tmp_path, corpus, steps=6, every=1), "--trainer.callbacks+=helpers.PoisonEmbedding",
            "--trainer.callbacks.step=3", "--trainer.callbacks.once=true"]
    rc, out = forked(args, cwd=tmp_path, env=env)
    assert rc == 1, out[-2000:]
    assert "error: FloatingPointError: non-finite training loss (nan" in out and "at step 3" in out
    assert "model.skip_nonfinite=true" in out and "Traceback" not in out
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        assert state["global_step"] <= 3
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()), ckpt
    rc, out = forked([*args, "--model.skip_nonfinite=true", "--ckpt_path=last"], cwd=tmp_path, env=env)
    assert rc == 0, out[-2000:]
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 6 and final["nonfinite_skips"] == 1


@pytest.mark.parametrize("variant", ["improved_dilated", "ring_dilated"], ids=["ddp", "ring"])
def test_two_ranks_with_the_shipped_callbacks_exit_0(variant, corpus, forked, tmp_path):
    """configs/quickstart.yaml's callbacks (ModelCheckpoint on val/bpb, StepStatsMonitor), with
    validation, for more steps than StepStatsMonitor leaves out: exit 0, one summary."""
    rc, out = forked([f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp_path}", "--config",
                      f"{ROOT}/configs/attention/{variant}.yaml", "--trainer.accelerator=cpu", "--trainer.devices=2",
                      "--trainer.strategy=ddp", "--trainer.max_steps=8", "--trainer.val_check_interval=4",
                      "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", "--data.seq_len=64",
                      "--model.segment_lengths=[16,32,64]", "--model.d_model=32", "--data.batch_size=2",
                      "--data.val_windows=8"], cwd=tmp_path, config=QUICKSTART, timeout=150)
    assert rc == 0, out[-3000:]
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    assert json.loads(summary.read_text())["steps_measured"] == 8 - 3
    assert out.count("fit summary:") == 1
    checkpoints = sorted(p.name for p in summary.parent.glob("checkpoints/*.ckpt"))
    assert "last.ckpt" in checkpoints and len(checkpoints) >= 2  # and the best by val/bpb
    time.sleep(1)
    assert not leftover(str(tmp_path))


def test_a_second_signal_stops_at_once(corpus, forked, tmp_path):
    """Two SIGTERMs in one step: the second ends the process as SIGTERM does by default, with
    no checkpoint written after the first's request."""
    signal_twice = ["--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step=3"] * 2
    rc, out = forked([*ckpt_args(tmp_path, corpus), *signal_twice], cwd=tmp_path,
                     env={"LOSS_LOG": str(tmp_path / "losses")})
    assert rc == -signal.SIGTERM, out[-2000:]
    assert "SIGTERM received: stopping after this step" in out and "stopped by" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()
