"""Profiling callbacks: per-step time, tokens/s, TFLOP/s, MFU and peak memory to TensorBoard,
a summary JSON at the end of fit, and a torch.profiler schedule settable from YAML.

Lightning's ThroughputMonitor needs a Python batch_size_fn (not expressible in YAML), reports
rates only after `window_size` steps and no memory; this callback logs every step instead.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.profilers import PyTorchProfiler

PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                   "16-true": torch.float16}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s for MFU, from Lightning's table of known devices (None when unknown)."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = PRECISION_DTYPE.get(str(precision), torch.float32)
    try:
        return get_available_flops(device, dtype)
    except Exception:  # an unknown device: MFU needs peak_tflops from the config
        return None


class StepStatsMonitor(L.Callback):
    """Per optimizer step: `perf/step_ms`, `perf/tokens_per_s` (this device) and
    `perf/tokens_per_s_global` (all data-parallel ranks; context-parallel ranks share tokens),
    `perf/tflops` from the module's `flops_per_batch`, `perf/mfu`, and on GPU
    `perf/peak_alloc_gib` / `perf/peak_reserved_gib` (peaks reset every step).

    Args:
        peak_tflops: the device's peak TFLOP/s for MFU; default: Lightning's table of GPUs.
        skip_steps: first steps of each fit left out of the summary (compilation, allocator
            warm-up), also of a resumed one.
    """

    def __init__(self, peak_tflops: float | None = None, skip_steps: int = 3):
        self.peak_tflops, self.skip_steps = peak_tflops, skip_steps
        self.step_ms: list[float] = []
        self.tokens_per_s: list[float] = []
        self.peak_alloc = 0.0
        self.device: torch.device | None = None
        self._last: float | None = None
        self._first_step = 0  # global_step when this fit started (non-zero when resumed)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = None
        self.step_ms, self.tokens_per_s = [], []
        self._first_step = trainer.global_step
        self.device = pl_module.device  # Lightning may move the module off the GPU before on_fit_end
        if self.peak_tflops is None:
            flops = peak_flops(pl_module.device, trainer.precision)
            self.peak_tflops = flops / 1e12 if flops else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # No synchronisation: the time between step ends is the step time once steps run in a
        # steady stream (the loss's finiteness check waits for each forward anyway), and the next
        # step's host work may overlap this step's backward.
        cuda = pl_module.device.type == "cuda"
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        layout = pl_module.layout
        tokens = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1) // layout.cp_size
        stats = {"perf/step_ms": dt * 1e3, "perf/tokens_per_s": tokens / dt,
                 "perf/tokens_per_s_global": tokens * layout.world_size / dt}
        if getattr(pl_module, "flops_per_batch", 0):
            stats["perf/tflops"] = pl_module.flops_per_batch / dt / 1e12
            if self.peak_tflops:
                stats["perf/mfu"] = stats["perf/tflops"] / self.peak_tflops
        if cuda:
            stats["perf/peak_alloc_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            stats["perf/peak_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
            self.peak_alloc = max(self.peak_alloc, stats["perf/peak_alloc_gib"])
        # Host tensors: Lightning makes a device tensor of a Python number, a copy that waits for
        # the GPU to finish the step, leaving it idle while the host starts the next one (on an
        # H100, 102 -> 95 ms a step at 32K, 365 -> 339 ms at 128K).
        pl_module.log_dict({k: torch.tensor(v) for k, v in stats.items()}, on_step=True, on_epoch=False,
                           batch_size=batch["tokens"].shape[0])
        if trainer.global_step - self._first_step > self.skip_steps:
            self.step_ms.append(stats["perf/step_ms"])
            self.tokens_per_s.append(stats["perf/tokens_per_s"])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not a training step

    def on_fit_end(self, trainer, pl_module) -> None:
        # Every rank asks: trainer.log_dir broadcasts rank 0's folder under DDP.
        folder = trainer.log_dir or trainer.default_root_dir
        if not self.step_ms or trainer.global_rank != 0:
            return
        summary = {"variant": getattr(pl_module, "variant", None), "seq_len": pl_module.hparams.get("seq_len"),
                   "steps_measured": len(self.step_ms), "median_step_ms": statistics.median(self.step_ms),
                   "median_tokens_per_s": statistics.median(self.tokens_per_s),
                   "median_tokens_per_s_global": statistics.median(self.tokens_per_s) * pl_module.layout.world_size,
                   "peak_alloc_gib": self.peak_alloc if self.device.type == "cuda" else None,
                   "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}
        if getattr(pl_module, "flops_per_batch", 0):
            summary["median_tflops"] = pl_module.flops_per_batch / (summary["median_step_ms"] * 1e-3) / 1e12
            if self.peak_tflops:
                summary["median_mfu"] = summary["median_tflops"] / self.peak_tflops
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("fit summary:", json.dumps(summary))


class ScheduledProfiler(PyTorchProfiler):
    """PyTorchProfiler whose torch.profiler schedule is set from YAML (Lightning #20074: the
    schedule object itself cannot be). Traces (*.pt.trace.json, open in Perfetto) land in the
    run's log folder; memory is profiled.

    Args:
        wait, warmup, active, repeat: the torch.profiler.schedule steps.
        record_module_names: annotate each module's calls (forward hooks on every module).
            Default: on, except for a compiled model (model.compile), where the hooks split the
            graph at every module: a 32K step took 120.9 ms profiled against 68.3 unprofiled,
            run as many small graphs.
    """

    def __init__(self, wait: int = 5, warmup: int = 2, active: int = 3, repeat: int = 1, dirpath: str | None = None,
                 filename: str = "profile", profile_memory: bool = True, record_shapes: bool = True,
                 with_stack: bool = False, record_module_names: bool | None = None):
        super().__init__(dirpath=dirpath, filename=filename, export_to_chrome=True,
                         schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
                         profile_memory=profile_memory, record_shapes=record_shapes, with_stack=with_stack,
                         record_module_names=bool(record_module_names))
        self._module_names_choice = record_module_names

    def module_names(self, module) -> bool:
        """Whether to annotate `module`'s submodules: as given, or unless it is compiled."""
        if self._module_names_choice is not None:
            return self._module_names_choice
        return not getattr(module, "hparams", {}).get("compile", False)

    def start(self, action_name: str) -> None:
        if self._lightning_module is not None:
            self._record_module_names = self.module_names(self._lightning_module)
        super().start(action_name)
