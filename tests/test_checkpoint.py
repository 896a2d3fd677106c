"""Checkpoint files: two runs saving into one folder, a full disk, partial files of killed
writers. A full disk is shown twice: injected (everywhere) and on a real small tmpfs (where the
test may mount one)."""
import multiprocessing
import os
import socket
import subprocess

import pytest
import torch

from longctx.checkpoint import AtomicCheckpointIO


def save_many(path: str, tag: str, n: int) -> None:
    io = AtomicCheckpointIO()
    for i in range(n):
        io.save_checkpoint({"tag": tag, "i": i, "w": torch.full((50_000,), float(i))}, path)


def test_two_writers_of_one_file_never_take_each_others_temporary_file(tmp_path):
    path = str(tmp_path / "last.ckpt")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=save_many, args=(path, tag, 40)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    final = torch.load(path, weights_only=True)
    assert final["tag"] in "ab" and torch.equal(final["w"], torch.full((50_000,), float(final["i"])))
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_save_removes_partial_files_of_dead_writers_only(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = {"dead": f".last.ckpt.{host}.{dead.pid}.0a1b2c3d.tmp", "alive": f".last.ckpt.{host}.{alive.pid}.0a1b2c3d.tmp",
                 "other-host": f".last.ckpt.elsewhere.{dead.pid}.0a1b2c3d.tmp",
                 "other-file": f".epoch=1.ckpt.{host}.{dead.pid}.0a1b2c3d.tmp"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, str(tmp_path / "last.ckpt"))
        left = set(os.listdir(tmp_path))
    finally:
        alive.kill()
    assert names["dead"] not in left
    assert {names["alive"], names["other-host"], names["other-file"], "last.ckpt"} == left


def ckpt_run(tmp, corpus):
    return [f"--data.cache_dir={corpus}", f"--trainer.default_root_dir={tmp}", "--trainer.max_steps=12",
            "--data.train_windows=32", "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=-1"]


def assert_disk_full_reported(rc, out, folder, last_good):
    assert rc == 1, out[-2000:]
    assert f"no space left on the device writing the checkpoint {folder}/" in out, out[-2000:]
    assert f"the partial file was removed and the last good checkpoint is {folder}/{last_good} (step 4)" in out
    assert "resume with --ckpt_path last" in out and "Traceback" not in out
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")], "a partial file was left on the full disk"
    assert torch.load(folder / last_good, weights_only=True)["global_step"] == 4


def test_a_full_disk_while_saving_is_reported_and_cleaned_up(corpus, forked, tmp_path):
    """Saves: the step-4 file, then last.ckpt, which fails as torch.save fails on ENOSPC."""
    rc, out = forked([*ckpt_run(tmp_path, corpus),
                      '--trainer.plugins=[{"class_path": "helpers.DiskFullOnSave", "init_args": {"nth": 2}}]'],
                     cwd=tmp_path)
    assert_disk_full_reported(rc, out, tmp_path / "checkpoints", "epoch=0-step=4.ckpt")
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_real_full_disk(corpus, forked, tmp_path):
    """On a 1.3 MB tmpfs a checkpoint of tiny.yaml's model (~0.53 MB) fits twice: the step-4
    file and last.ckpt; the step-8 file finds the disk full."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_a_full_disk_while_saving_is_reported covers the path")
    try:
        rc, out = forked(ckpt_run(disk, corpus), cwd=tmp_path)
        assert_disk_full_reported(rc, out, disk / "checkpoints", "last.ckpt")
        assert sorted(os.listdir(disk / "checkpoints")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
