"""LightningModule: next-token loss, metrics, AdamW with warm-up + cosine, FLOPs, and the
context-parallel wiring of the ring variants (docs/design.md#training).

Shapes: B batch, T sequence length, l = T/C tokens per rank of a C-rank context-parallel group.
"""
from __future__ import annotations

import contextlib
import math
import random
import warnings

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from .attention import DilatedAttentionBase, resolve
from .distributed import Layout, check_layout, context_parallel_group
from .hparams import BF16_PRECISIONS, GRAPH_MODES, RESIDUAL_DTYPES, check_hparams
from .loss import head_argmax
from .metrics import BucketAccuracy, LanguageModelLoss
from .model import LongNetLM
from .resume import check_architecture


# The validation metrics are torchmetrics states, summed over ranks when computed: Lightning's
# advice to all-reduce them again (sync_dist=True) would average equal numbers.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/", category=UserWarning)


class LongContextLM(L.LightningModule):
    """A long-context decoder LM whose attention is a dilated-attention variant: next-token loss,
    validation metrics, AdamW with warm-up and cosine decay, FLOPs for MFU, and the ring variants'
    context-parallel wiring.

    Args:
        attention: the variant, as {"class_path": a registry name or class path, "init_args": its own constructor arguments (softmax_scale, gamma_init, ...)}; default improved_dilated.
        segment_lengths: one segment length w_i per branch (docs/design.md#the-math).
        dilation_rates: one dilation rate r_i per branch; r_i divides w_i.
        head_split: each branch on its own group of heads (k times fewer FLOPs) instead of every head on every branch.
        seq_len: the training length T, linked from data.seq_len.
        context_parallel_size: ranks sharing one sequence (ring variants only); null: all ranks for a ring variant, else 1.
        vocab_size: the vocabulary; 256 for bytes.
        d_model: the model width.
        n_layers: the number of blocks.
        n_heads: attention heads; d_model / n_heads must be even (RoPE).
        mlp_hidden: the SwiGLU's hidden width; null: 8/3 of d_model rounded up to 64.
        rope_base: RoPE's base (its longest wavelength grows with it).
        activation_checkpointing: recompute each block in backward (for long sequences).
        mlp_chunk_tokens: run each SwiGLU over chunks of this many tokens, recomputed in backward (null: whole sequence); what fits the 1M step on an 80 GB GPU.
        offload_checkpoints: with activation checkpointing, keep each block's saved input in pinned host memory; eager only.
        residual_dtype: float32 or bfloat16 (needs bf16 precision), the residual stream between blocks; bfloat16 halves its traffic and changes the numerics.
        compile: torch.compile the model (one graph, or one a block with activation checkpointing).
        compile_mode: torch.compile's mode; reduce-overhead replays forward and backward as CUDA graphs.
        lr: AdamW's peak learning rate.
        min_lr_ratio: the cosine decay ends at lr times this.
        warmup_steps: linear warm-up steps.
        decay_steps: cosine decay steps after warm-up; null: trainer.max_steps.
        weight_decay: AdamW's weight decay (matrices only).
        betas: AdamW's betas.
        passkey_buckets: distance buckets scored by the passkey task, linked from data.passkey_buckets.
        skip_nonfinite: on a NaN or inf loss skip the step and count it (train/nonfinite_skips) instead of stopping.
    """

    def __init__(self, attention: dict | None = None, segment_lengths: list[int] = [512, 1024, 2048],
                 dilation_rates: list[int] = [1, 2, 4], head_split: bool = False, seq_len: int = 1024,
                 context_parallel_size: int | None = None, vocab_size: int = 256, d_model: int = 256,
                 n_layers: int = 4, n_heads: int = 4, mlp_hidden: int | None = None, rope_base: float = 10000.0,
                 activation_checkpointing: bool = False, mlp_chunk_tokens: int | None = None,
                 offload_checkpoints: bool = False, residual_dtype: str = "float32", compile: bool = False,
                 compile_mode: str = "default", lr: float = 1e-3,
                 min_lr_ratio: float = 0.1, warmup_steps: int = 100, decay_steps: int | None = None,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), passkey_buckets: int = 4,
                 skip_nonfinite: bool = False):
        super().__init__()
        self.save_hyperparameters()
        check_hparams(self.hparams)
        self.uses_graphs = compile and compile_mode in GRAPH_MODES
        if self.uses_graphs and not hasattr(torch.compiler, "set_stance"):
            raise NotImplementedError(
                f"model.compile_mode={compile_mode!r} needs torch >= 2.6 (torch.compiler.set_stance, with which "
                f"validation runs the model eagerly); this is torch {torch.__version__}: use compile_mode 'default'"
            )
        if offload_checkpoints and compile:
            raise NotImplementedError("model.offload_checkpoints=true runs the blocks eagerly (its copies and side "
                                      "stream are not traced): use it with model.compile=false")
        attention = dict(attention or {"class_path": "improved_dilated"})
        self.spec = resolve(attention.get("class_path", ""))
        self.attention_cls, self.variant, self.is_ring = self.spec.cls, self.spec.name, self.spec.context_parallel
        kwargs = dict(attention.get("init_args") or {}, segment_lengths=segment_lengths,
                      dilation_rates=dilation_rates, head_split=head_split)
        self.model = LongNetLM(vocab_size, d_model, n_layers, n_heads, self.attention_cls, kwargs, mlp_hidden,
                               rope_base, activation_checkpointing=activation_checkpointing,
                               mlp_chunk_tokens=mlp_chunk_tokens, offload_checkpoints=offload_checkpoints,
                               residual_dtype=RESIDUAL_DTYPES.get(residual_dtype))
        self.layout = Layout(1, 0, 1)
        self.val_loss = LanguageModelLoss()
        # UTF-8 bytes each token decodes to (the data module's token_bytes, set in setup): bits per byte
        self.register_buffer("bytes_per_token", torch.ones(vocab_size), persistent=False)
        self.passkey_acc = BucketAccuracy(passkey_buckets)
        self.flops_per_batch = 0
        self.nonfinite_skips = 0
        self._loss_read = None  # (host triple, event) from training_step, read in on_after_backward
        self.signal_received = 0  # a stop signal's number, set by preemption.StopOnSignal's handler
        self.stop_signal = 0  # the same agreed by every rank, after this step's loss read
        self._optimizer_settings: list[dict] = []  # this run's, before a checkpoint's are loaded
        self._drop_step = False  # a non-finite loss in this step, skipped (skip_nonfinite)

    # -- context parallel ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        cp = self.hparams.context_parallel_size or (world if self.is_ring else 1)
        check_layout(world, cp, self.is_ring, self.variant)
        if self.hparams.residual_dtype == "bfloat16" and self.trainer.precision not in BF16_PRECISIONS:
            raise ValueError(f"model.residual_dtype='bfloat16' needs trainer.precision in {list(BF16_PRECISIONS)}, got "
                             f"{self.trainer.precision!r}: the blocks' matmuls must take bfloat16 inputs "
                             "(--model.residual_dtype=float32 keeps a float32 stream under any precision)")
        if self.hparams.seq_len % cp:
            raise ValueError(
                f"data.seq_len={self.hparams.seq_len} is not divisible by model.context_parallel_size={cp}"
            )
        if self.is_ring:  # the op's sharding rules, checked on every rank before any communication
            h = self.hparams
            try:
                self.spec.core.check_shard(h.seq_len // cp, cp, h.n_heads, h.segment_lengths, h.dilation_rates,
                                           h.head_split)
            except ValueError as e:
                raise ValueError(f"data.seq_len={self.hparams.seq_len} over context_parallel_size={cp}: {e}") from None
        max_token = getattr(self.trainer.datamodule, "max_token", lambda: None)()
        if max_token is not None and max_token >= self.hparams.vocab_size:
            raise ValueError(f"model.vocab_size={self.hparams.vocab_size} is smaller than the data's largest token "
                             f"{max_token}: use vocab_size >= {max_token + 1}")
        token_bytes = getattr(self.trainer.datamodule, "token_bytes", None)
        if token_bytes is not None:  # 0 for a padded vocabulary's unused ids
            counts = torch.as_tensor(token_bytes(), dtype=torch.float32)[: self.hparams.vocab_size]
            self.bytes_per_token.zero_()[: len(counts)] = counts
        if self.layout == Layout(world, rank, cp) and self.flops_per_batch:
            return  # set up by an earlier stage: groups are created once, blocks compiled once
        self.layout = Layout(world, rank, cp)
        if self.is_ring:
            group = context_parallel_group(self.layout)
            for m in self.model.modules():
                if isinstance(m, DilatedAttentionBase) and m.context_parallel:
                    m.process_group = group
        dm = self.trainer.datamodule
        batch = getattr(dm, "batch_size", 1)
        # Per device: forward + backward (2x) of this rank's share of the sequence.
        self.flops_per_batch = 3 * self.model.flops(batch, self.hparams.seq_len) // cp
        if self.hparams.compile:
            self.compile_model(mode=None if self.hparams.compile_mode == "default" else self.hparams.compile_mode)

    def compile_model(self, **options) -> None:
        """torch.compile the model (options: torch.compile's) as one graph after RoPE's angles
        (LongNetLM.trunk), or block by block with activation checkpointing or a multi-rank ring.
        One graph fuses across the blocks' boundaries and replays as one CUDA graph each way.
        The checkpointed presets keep the per-block graphs their 128K–1M memory and speed were
        measured with; the ring's exchange runs eagerly between graphs (ring.py)."""
        if self.hparams.activation_checkpointing or (self.is_ring and self.layout.cp_size > 1):
            for block in self.model.blocks:
                block.compile(**options)
        else:
            self.model.trunk = torch.compile(self.model.trunk, **options)

    def shard(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T + 1) window -> this rank's inputs and targets (B, l), cut after the shift."""
        x, y = tokens[:, :-1], tokens[:, 1:]
        l = x.shape[1] // self.layout.cp_size
        s = slice(self.layout.cp_rank * l, (self.layout.cp_rank + 1) * l)
        return x[:, s], y[:, s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, l, V) of this rank's tokens x (B, l), for a small vocabulary: the steps
        keep to features and the chunked loss."""
        return self.model.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, l, E) of this rank's tokens x (B, l), at global positions."""
        with self.eval_stance():
            return self.model.features(x, pos_offset=self.layout.cp_rank * x.shape[1])

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.uses_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new step may reuse the last one's outputs
        x, y = self.shard(batch["tokens"])
        loss = self.model.loss(self.features(x), y)  # mean over this rank's tokens
        self._loss_read = self._queue_loss_read(loss)
        return loss

    def _queue_loss_read(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Whether the loss is finite on every rank, the largest stop signal any rank received
        (negated, so that one MIN reduces both) and this rank's loss, copied to pinned host memory
        behind the forward, with an event to wait for: on_after_backward reads them once the
        backward is queued too, so the GPU never waits for the host between forward and backward
        (reading here cost 2.7 ms of a 67 ms step at 32K with one CUDA graph a direction, on an
        H100). The decision to stop or skip must be collective, or the
        ranks that carry on hang in DDP's all-reduce; so must a stop on a signal, which may reach
        only one rank (Kubernetes signals the main process)."""
        detached = loss.detach().float()
        triple = torch.stack([torch.isfinite(detached).float(), detached.new_full((), -float(self.signal_received)),
                              detached])
        if self.layout.world_size > 1 and dist.is_initialized():
            dist.all_reduce(triple[:2], op=dist.ReduceOp.MIN)
        if not triple.is_cuda:
            return triple, None
        host = triple.to("cpu", non_blocking=True)  # into pinned memory, no wait
        event = torch.cuda.Event()
        event.record()
        return host, event

    def on_after_backward(self) -> None:
        """The step's only synchronisation: the loss read queued by training_step. A non-finite
        loss stops training or, with skip_nonfinite, empties the optimizer step. The values are
        logged as host tensors: a Python number given to self.log becomes a device tensor, a
        synchronising copy; a device tensor is read back (.item()) when logged or shown."""
        host, event = self._loss_read
        if event is not None:
            event.synchronize()
        finite, negated_signal, value = host.tolist()
        self.stop_signal = int(-negated_signal)
        if self.hparams.skip_nonfinite:  # a cumulative count, every step
            self.nonfinite_skips += finite != 1.0
            self.log("train/nonfinite_skips", torch.tensor(float(self.nonfinite_skips)))
        if finite != 1.0:
            return self._nonfinite(value)
        self.log("train/loss", torch.tensor(value), prog_bar=True)
        # Lightning's LearningRateMonitor turns each rate into a device tensor (a synchronising
        # copy per parameter group and step); this logs the rate of this step from the host.
        self.log("train/lr", torch.tensor(float(self.trainer.optimizers[0].param_groups[0]["lr"])))

    def _nonfinite(self, value: float) -> None:
        if not self.hparams.skip_nonfinite:
            raise FloatingPointError(
                f"non-finite training loss ({value} on rank {self.global_rank}, or on another rank) at step "
                f"{self.global_step} ({self.variant}, seq_len {self.hparams.seq_len}): stopped before the optimizer "
                "step, so the weights and the last checkpoint stay finite. Lower model.lr, keep "
                "trainer.gradient_clip_val, or set model.skip_nonfinite=true to skip such steps"
            )
        # Skip the step, whatever later micro-batches of it add. Under fp16's grad scaler the
        # gradients are made non-finite (they stay so through accumulation, and the scaler skips
        # the step and lowers its scale: it asserts that it saw gradients, so none may be dropped).
        # Otherwise on_before_optimizer_step drops them, and AdamW changes no weight.
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            self._drop_step = True
            return
        for p in self.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))

    def on_before_optimizer_step(self, optimizer) -> None:
        """After the step's last backward, before clipping: a skipped step's gradients go."""
        if self._drop_step:
            for p in self.parameters():
                p.grad = None
            self._drop_step = False

    # -- checkpoints --------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Runs after configure_optimizers and before a checkpoint's optimizer state is loaded."""
        self._optimizer_settings = [{k: v for k, v in g.items() if k != "params"}
                                    for opt in self.trainer.optimizers for g in opt.param_groups]

    def on_train_start(self) -> None:
        """A resumed run keeps the checkpoint's moments and step counts, but its optimiser
        settings are this command's: loading an optimizer's state also loads the saved learning
        rate, betas and weight decay, and LambdaLR's state the saved base rate (its schedule
        function, a closure, is not saved and is this run's already)."""
        if not self.trainer.ckpt_path:
            return
        opt, sched = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler
        for i, (group, settings) in enumerate(zip(opt.param_groups, self._optimizer_settings)):
            group.update(settings, lr=settings["initial_lr"] * sched.lr_lambdas[i](sched.last_epoch))
        sched.base_lrs = [settings["initial_lr"] for settings in self._optimizer_settings]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [n for n, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(f"refusing to save a checkpoint at step {self.global_step}: non-finite "
                                     f"weights in {bad[:5]}")
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    # tensors and plain numbers: loadable with torch.load(weights_only=True)
                                    "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # train.py has put the checkpoint's architecture into these settings already: this
        # catches a checkpoint given to Trainer.fit from Python, before its weights fail to load.
        check_architecture(self.hparams, checkpoint.get("hyper_parameters", {}), "the checkpoint")
        states = checkpoint.get("rng_states")
        if states:  # dropout and anything else random continue as if never interrupted
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])
            if states["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        self.nonfinite_skips = checkpoint.get("nonfinite_skips", 0)

    def eval_stance(self):
        """A forward without gradients (validation, inference) runs the model eagerly when
        training replays it as CUDA graphs. With no backward pending, torch 2.11's CUDA-graph
        trees took each compiled block's call as a new step that overwrote the previous block's
        output, its input ("accessing tensor output of CUDAGraphs that has been overwritten",
        pytorch#152887: the first validation failed); and a no-grad
        graph would compile again and hold a memory pool of its own."""
        if self.uses_graphs and not torch.is_grad_enabled():
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = self.shard(batch["tokens"])
        h = self.features(x)
        self.val_loss.update(self.model.loss(h, y, reduction="sum"), y.numel(), self.bytes_per_token[y].sum())
        if "answer" in batch:
            _, scored = self.shard(batch["answer"])
            has_answer = scored.any(-1)  # under CP only the last rank holds the answer
            if has_answer.any():  # the head on the scored positions only
                missed = head_argmax(h[scored], self.model.embed.weight) != y[scored]
                misses = torch.zeros(len(y), device=y.device).index_add_(0, scored.nonzero()[:, 0], missed.float())
                self.passkey_acc.update((misses == 0)[has_answer], batch["bucket"][has_answer])

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        if getattr(self.trainer.datamodule, "task", None) == "passkey":  # every rank syncs, or none
            for b, acc in enumerate(self.passkey_acc.compute()):
                self.log(f"val/passkey_acc_bucket{b}", acc)
            self.passkey_acc.reset()

    # -- optimisation -------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """trainer.gradient_clip_val, also for the fused AdamW step. Lightning's mixed-precision
        plugin refuses to clip for any fused optimizer: its guard is for fp16's grad scaler, which
        a fused step unscales itself. Without a scaler (the only case configure_optimizers fuses)
        the gradients are final here: this clips them with the base plugin's clipping, which the
        mixed-precision plugin's only wraps in that guard."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and optimizer.defaults.get("fused") and isinstance(plugin, MixedPrecision):
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        h = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        # The fused step reads and writes each parameter, gradient and moment once, where the
        # default (foreach) step makes many passes: with clipping, 1.7 against 3.4 ms of a 32K
        # step on an H100. Not under fp16's grad scaler: a fused
        # step unscales the gradients itself, so clipping before it would see them scaled.
        fused = getattr(self.trainer.precision_plugin, "scaler", None) is None
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=h.lr, betas=tuple(h.betas),
                                fused=fused or None)
        total = h.decay_steps or max(1, self.trainer.max_steps if self.trainer.max_steps > 0
                                     else int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
