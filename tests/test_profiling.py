"""Profiling: the StepStatsMonitor's TensorBoard scalars and summary, and the benchmark's table."""
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from longctx import benchmark
from longctx.cli import cli_main, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_stats_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli_main(["fit", "--config", f"{ROOT}/tests/configs/tiny.yaml", f"--data.cache_dir={tmp_path}/data",
              "--trainer.logger=true", f"--trainer.default_root_dir={tmp_path}", "--trainer.log_every_n_steps=1",
              "--trainer.callbacks+=longctx.callbacks.StepStatsMonitor",
              "--trainer.callbacks.skip_steps=1", "--trainer.max_steps=6"], )
    # the CLI names the run after variant and length
    events = glob.glob(f"{tmp_path}/runs/improved_dilated-64/version_*/events*")
    assert len(events) == 1, "no TensorBoard event file written"
    ea = EventAccumulator(max(events, key=os.path.getmtime))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("perf/step_ms", "perf/tokens_per_s", "perf/tokens_per_s_global", "perf/tflops", "train/loss"):
        assert tag in tags, tag
    step_ms = [e.value for e in ea.Scalars("perf/step_ms")]
    tokens = [e.value for e in ea.Scalars("perf/tokens_per_s")]
    assert len(step_ms) == 6
    assert all(0 < ms < 60_000 for ms in step_ms)
    # 4 windows of 64 tokens per step: tokens/s and step time must agree
    for ms, tps in zip(step_ms, tokens):
        assert tps == pytest.approx(4 * 64 / (ms / 1e3), rel=1e-3)
    summary = json.loads(open(os.path.join(os.path.dirname(max(events, key=os.path.getmtime)), "summary.json")).read())
    assert summary["variant"] == "improved_dilated" and summary["steps_measured"] == 5
    assert summary["median_step_ms"] > 0 and summary["median_tflops"] > 0


def test_training_logs_host_tensors_only(tmp_path, monkeypatch):
    """Every value logged in training is a detached host tensor: Lightning makes a device tensor
    of a Python number (a copy that waits for the GPU), and reads a device tensor back when it
    logs it; either stalls the GPU once a step (the GPU test counts the synchronisations)."""
    from longctx.lit_module import LongContextLM

    logged = []
    original = LongContextLM.log

    def spy(self, name, value, *args, **kwargs):
        if self.training:
            logged.append((name, value))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(LongContextLM, "log", spy)
    cli_main(["fit", "--config", f"{ROOT}/tests/configs/tiny.yaml", f"--data.cache_dir={tmp_path}/data",
              "--trainer.logger=true", f"--trainer.default_root_dir={tmp_path}", "--trainer.log_every_n_steps=1",
              "--trainer.callbacks+=longctx.callbacks.StepStatsMonitor", "--model.skip_nonfinite=true",
              "--trainer.max_steps=3"])
    names = {name for name, _ in logged}
    assert {"train/loss", "train/lr", "train/nonfinite_skips", "perf/step_ms", "perf/tokens_per_s"} <= names
    for name, value in logged:
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu", (name, value)
        assert not value.requires_grad and value.numel() == 1, name
    losses = [v.item() for n, v in logged if n == "train/loss"]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    # tiny.yaml: lr 1e-2, one warm-up step, then cosine to 10% over the 3 steps: 1, 1, 0.1 + 0.9 * 0.5
    lrs = [v.item() for n, v in logged if n == "train/lr"]
    assert lrs == pytest.approx([1e-2, 1e-2, 5.5e-3], rel=1e-6)


def test_run_names():
    assert run_name({"class_path": "longctx.attention.ImprovedDilatedAttention"}, 32768) == "improved_dilated-32k"
    assert run_name({"class_path": "ring_dilated"}, 2**20) == "ring_dilated-1m"
    assert run_name(None, 1000) == "improved_dilated-1000"


def test_benchmark_tiny_preset_fills_every_cell(tmp_path, capsys):
    cells = benchmark.main(["--preset", "tiny", "--out", str(tmp_path), "--repeats", "2", "--warmup", "1"])
    data = json.loads((tmp_path / "results.json").read_text())
    cfg = benchmark.PRESETS["tiny"]
    expected = len(benchmark.VARIANTS) * len(cfg["lengths"]) * len(cfg["batch"]) * len(cfg["head_split"]) * 2
    assert len(data["cells"]) == len(cells) == expected
    keys = {(c["variant"], c["seq_len"], c["head_split"], c["mode"]) for c in data["cells"]}
    assert len(keys) == expected
    for c in data["cells"]:
        assert c["status"] == "ok", c
        assert c["min_ms"] <= c["median_ms"] <= c["max_ms"] and c["tflops"] > 0
    assert data["meta"]["device"] == "cpu" and "--preset tiny" in data["meta"]["command"]
    assert (tmp_path / "results.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| Implementation" in out and "improved_dilated" in out
    assert f"wrote {tmp_path / 'results.json'} and {tmp_path / 'results.png'}" in out
    from PIL import Image

    assert Image.open(tmp_path / "results.png").size == (780, 540)  # one panel: no memory is measured on a CPU


def test_benchmark_records_errors_in_cells(tmp_path):
    # dilation 3 does not divide segment 32: every dilated cell errors, the run goes on and sdpa succeeds
    cells = benchmark.main(["--preset", "tiny", "--dilations", "1", "3", "--lengths", "64", "--head-split", "off",
                            "--modes", "fwd", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    by_name = {c["variant"]: c for c in cells}
    assert by_name["sdpa"]["status"] == "ok"
    assert by_name["improved_dilated"]["status"].startswith("error: ValueError: segment length 32 is not divisible by dilation rate 3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_benchmark_cuda_graph_needs_cuda(tmp_path):
    with pytest.raises(NotImplementedError, match="--cuda-graph needs one process on a CUDA device"):
        benchmark.main(["--preset", "tiny", "--cuda-graph", "--out", str(tmp_path)])


def test_profile_overlay_writes_a_trace_next_to_the_logs(tmp_path):
    cli_main(["fit", "--config", f"{ROOT}/tests/configs/tiny.yaml", "--config", f"{ROOT}/configs/profile.yaml",
              f"--data.cache_dir={tmp_path}/data", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=true",
              "--trainer.max_steps=8", "--trainer.profiler.init_args.wait=1", "--trainer.profiler.init_args.warmup=1",
              "--trainer.profiler.init_args.active=2"])
    (trace,) = glob.glob(f"{tmp_path}/runs/improved_dilated-64/version_0/*.pt.trace.json")
    events = json.load(open(trace))["traceEvents"]
    assert any("longctx::dilated_attention" in e.get("name", "") for e in events)
    assert any(e.get("name") == "[memory]" for e in events), "memory profiling is on"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_profiler_annotates_modules_unless_the_model_is_compiled(compiled):
    """Module annotations are forward hooks on every module, which split a compiled model's graph
    at each one: off by default for model.compile, on otherwise, as set if given."""
    from longctx.callbacks import ScheduledProfiler

    module = SimpleNamespace(hparams={"compile": compiled})
    for choice, expected in [(None, not compiled), (True, True), (False, False)]:
        assert ScheduledProfiler(record_module_names=choice).module_names(module) is expected


def test_trace_gaps_finds_the_idle_gpu_and_the_launch_that_ended_it(tmp_path):
    """scripts/trace_gaps.py on a hand-made trace: one profiled step, a forward kernel, then the
    GPU idle 160 µs until a graph launched inside the backward's annotation runs two kernels."""
    from conftest import load_script

    trace_gaps = load_script("scripts/trace_gaps")
    events = [{"cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 1000},
              {"cat": "user_annotation", "name": "backward", "ts": 300, "dur": 500},
              {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 5, "dur": 5, "args": {"correlation": 1}},
              {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 450, "dur": 5, "args": {"correlation": 2}},
              {"cat": "kernel", "name": "fwd", "ts": 10, "dur": 290, "args": {"correlation": 1}},
              {"cat": "kernel", "name": "bwd", "ts": 460, "dur": 100, "args": {"correlation": 2}},
              {"cat": "kernel", "name": "bwd2", "ts": 500, "dur": 100, "args": {"correlation": 2}}]
    (tmp_path / "run.pt.trace.json").write_text(json.dumps({"traceEvents": events}))
    busy, span, gaps = trace_gaps.gaps(trace_gaps.load(str(tmp_path)), min_gap_us=20)
    assert (busy, span) == (290 + 100 + 40, 590)  # bwd2 overlaps bwd by 60 µs
    assert len(gaps) == 1
    (gap,) = gaps
    assert (gap["start"], gap["length"], gap["launch"], gap["launch_delay"]) == (300, 160, "cudaGraphLaunch", 150)
    assert gap["where"] == ["backward"] and gap["next"] == "bwd"


def test_benchmark_under_torchrun_runs_the_ring_on_two_ranks(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "longctx.benchmark",
           "--preset", "tiny", "--segments", "16", "64", "--out", str(tmp_path), "--repeats", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["world_size"] == 2
    assert {c["variant"] for c in data["cells"]} == {"ring_dilated", "ring_multihead_dilated"}
    assert len(data["cells"]) == 16 and all(c["status"] == "ok" for c in data["cells"])
    assert proc.stdout.count("| Implementation") == 8  # one rank writes
