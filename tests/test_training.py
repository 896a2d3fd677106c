"""The Lightning template end to end on CPU: every variant fits, DDP and context parallel match
the single-process run, checkpoints restore the variant, every config parses."""
import glob
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from longctx.attention import REGISTRY
from longctx.cli import cli_main
from longctx.lit_module import LongContextLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")
VARIANTS = sorted(REGISTRY)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The default stdlib corpus, built once per session into a temporary cache."""
    return str(tmp_path_factory.mktemp("corpus"))


def tiny_args(corpus_dir, *extra):
    return ["--config", TINY, f"--data.cache_dir={corpus_dir}", f"--trainer.default_root_dir={corpus_dir}", *extra]


def loss_on(module, tokens):
    x, y = module.shard(tokens)
    return F.cross_entropy(module(x).flatten(0, 1), y.reshape(-1)).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_learns_a_repeated_batch(variant, corpus_dir):
    cli = cli_main(["fit", *tiny_args(corpus_dir, "--config", f"{ROOT}/configs/attention/{variant}.yaml",
                                      "--trainer.overfit_batches=1", "--trainer.max_steps=8")])
    assert cli.model.variant == variant
    assert all(type(b.attn).__name__ in ("CoreAttention", "MultiheadAdapter") for b in cli.model.model.blocks)
    dm = cli.datamodule
    batch = torch.stack([dm.train_set[i]["tokens"] for i in range(dm.batch_size)])
    first = cli.trainer.callback_metrics  # last logged train/loss
    assert torch.isfinite(first["train/loss"])
    fresh = cli_main([*tiny_args(corpus_dir, "--config", f"{ROOT}/configs/attention/{variant}.yaml")], run=False)
    before, after = loss_on(fresh.model.eval(), batch), loss_on(cli.model.eval(), batch)
    assert after < before - 0.1, (before, after)


def test_checkpoint_restores_variant_and_logits(corpus_dir, tmp_path):
    cli = cli_main(["fit", *tiny_args(corpus_dir, "--config", f"{ROOT}/configs/attention/ring_multihead_dilated.yaml",
                                      "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={tmp_path}")])
    path = glob.glob(f"{tmp_path}/**/*.ckpt", recursive=True)[0]
    restored = LongContextLM.load_from_checkpoint(path)
    assert restored.variant == "ring_multihead_dilated"
    assert type(restored.model.blocks[0].attn.attn).__name__ == "RingMultiheadDilatedAttention"
    x = torch.randint(0, 256, (2, 64))
    torch.testing.assert_close(restored.eval()(x), cli.model.eval()(x), rtol=0, atol=0)


def test_passkey_task_logs_accuracy_per_bucket(corpus_dir):
    cli = cli_main(["fit", *tiny_args(corpus_dir, "--config", f"{ROOT}/configs/passkey.yaml", "--data.seq_len=128",
                                      "--model.segment_lengths=[32,64,128]", "--trainer.limit_val_batches=1",
                                      "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                                      "--data.val_windows=8")])
    metrics = cli.trainer.callback_metrics
    for b in range(4):
        acc = metrics[f"val/passkey_acc_bucket{b}"]
        assert 0.0 <= acc <= 1.0
    assert "val/bpb" in metrics


class ClipProbe(L.Callback):
    """The gradient norm before clipping (on_before_optimizer_step) and as the optimizer step
    used it (a step post-hook: the step runs Lightning's closure, backward and clipping, and
    leaves the gradients as they were)."""

    def __init__(self):
        self.before, self.at_step, self.fused = [], [], None

    @staticmethod
    def norm(module) -> float:
        return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in module.parameters() if p.grad is not None])).item()

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.fused = opt.defaults["fused"]
        opt.register_step_post_hook(lambda *_: self.at_step.append(self.norm(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self.norm(pl_module))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_step_still_clips_gradients(corpus_dir, precision):
    """AdamW takes its fused step, and trainer.gradient_clip_val still clips the gradients it
    gets: under bf16-mixed Lightning's plugin refuses to clip for a fused optimizer, so the module
    clips through the base plugin (lit_module.configure_gradient_clipping)."""
    probe, clip = ClipProbe(), 0.05
    cli_main(["fit", *tiny_args(corpus_dir, f"--trainer.precision={precision}", f"--trainer.gradient_clip_val={clip}",
                                "--trainer.max_steps=3")], trainer_defaults={"callbacks": [probe]})
    assert probe.fused is True
    assert len(probe.at_step) == 3 and min(probe.before) > 2 * clip, probe.before
    for norm in probe.at_step:
        assert norm == pytest.approx(clip, rel=1e-3)


@pytest.mark.parametrize("scaler", [None, torch.amp.GradScaler("cpu")], ids=["no-scaler", "grad-scaler"])
def test_a_skipped_step_changes_no_weight(scaler):
    """skip_nonfinite: the loss is read after backward (on_after_backward), so a non-finite one
    has gradients already, and a later micro-batch of the same step adds finite ones. The
    optimizer step must leave every weight as it was: without a scaler the gradients are
    dropped before it (on_before_optimizer_step, as Lightning calls it); a grad scaler asserts
    that it saw gradients, so they are made non-finite and the scaler skips the step."""
    module = LongContextLM(d_model=32, n_layers=1, n_heads=4, segment_lengths=[16], dilation_rates=[1], seq_len=16,
                           skip_nonfinite=True)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), max_steps=10,
                                      optimizers=[None])
    opt = module.configure_optimizers()["optimizer"]
    module._trainer.optimizers = [opt]
    module.log = lambda *args, **kwargs: None
    before = [p.detach().clone() for p in module.parameters()]
    for finite in (0.0, 1.0):  # two micro-batches: the first's loss not finite on some rank
        loss = module.model(torch.randint(0, 256, (1, 16))).sum()
        (loss if scaler is None else scaler.scale(loss)).backward()
        module._loss_read = (torch.tensor([finite, 0.0, 1.0 if finite else float("nan")]), None)
        module.on_after_backward()
    assert module.nonfinite_skips == 1
    module.on_before_optimizer_step(opt)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() < 2.0**16  # it saw the non-finite gradients and backed off
    for a, b in zip(before, module.parameters()):
        assert torch.equal(a, b)


def test_fused_step_is_off_under_a_grad_scaler():
    """fp16's grad scaler unscales inside a fused step, after clipping: AdamW stays unfused."""
    module = LongContextLM(d_model=32, n_layers=1, n_heads=4, segment_lengths=[16], dilation_rates=[1], seq_len=16)
    for scaler, fused in [(None, True), (torch.amp.GradScaler("cpu"), False)]:
        module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), max_steps=10)
        assert module.configure_optimizers()["optimizer"].defaults["fused"] is (True if fused else None)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["one-graph", "per-block"])
def test_validation_runs_graphed_blocks_eagerly(checkpointing):
    """compile_model compiles the model after RoPE's angles as one graph, or each block with
    activation checkpointing. Under a CUDA-graph compile mode a forward without gradients
    (validation) calls nothing compiled (torch 2.11's graph trees failed on chained blocks
    without a pending backward, pytorch#152887); training calls the compiled graphs.
    A counting backend stands in for Inductor."""
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    module = LongContextLM(d_model=32, n_layers=2, n_heads=4, segment_lengths=[8, 16], dilation_rates=[1, 2],
                           seq_len=16, compile=True, compile_mode="reduce-overhead",
                           activation_checkpointing=checkpointing)
    assert module.uses_graphs
    module.compile_model(backend=backend)
    module.eval()
    with torch.no_grad():
        module.validation_step({"tokens": torch.randint(0, 256, (1, 17))}, 0)
    assert compiled == [] and module.val_loss.compute()["val/loss"].isfinite()
    module.train()
    module(torch.randint(0, 256, (1, 16)))
    assert compiled, "the training forward should run the compiled graphs"
    whole = [any(n.target is F.embedding for n in gm.graph.nodes) for gm in compiled]
    assert whole == [not checkpointing] * len(compiled), "the embedding is in the model's graph, not a block's"


def test_graph_modes_need_set_stance(monkeypatch):
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(NotImplementedError, match="compile_mode='reduce-overhead' needs torch >= 2.6"):
        LongContextLM(compile=True, compile_mode="reduce-overhead")
    assert not LongContextLM(compile=True, compile_mode="default").uses_graphs


def run_ddp(tmp_path, corpus_dir, *extra):
    env = dict(os.environ, RECORD_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "fit", *tiny_args(corpus_dir, *extra),
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_steps=1",
           "--trainer.callbacks+=helpers.RecordFirstStep"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # no orphaned rank
        raise
    assert proc.returncode == 0, out[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference_grads(record, windows):
    """Single process, full sequence, the given windows as one batch."""
    module = LongContextLM(**{k: v for k, v in record["hparams"].items() if not k.startswith("_")})
    module.model.load_state_dict(record["state_dict"])
    x, y = windows[:, :-1], windows[:, 1:]
    loss = F.cross_entropy(module.model(x).flatten(0, 1), y.reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in module.model.named_parameters()}


def assert_grads_match(recorded, reference):
    scale = max(g.abs().max().item() for g in reference.values())
    for name, g in reference.items():
        torch.testing.assert_close(recorded[name], g, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_ddp_data_parallel_matches_single_process(tmp_path, corpus_dir):
    r0, r1 = run_ddp(tmp_path, corpus_dir, f"--config={ROOT}/configs/attention/improved_dilated.yaml")
    assert r0["layout"] == {"world_size": 2, "rank": 0, "cp_size": 1} and r1["layout"]["rank"] == 1
    assert not torch.equal(r0["window"], r1["window"]), "data-parallel ranks must read different windows"
    assert torch.equal(r0["x"], r0["window"][:, :-1]) and r0["pos_offset"] == 0
    loss, grads = reference_grads(r0, torch.cat([r0["window"], r1["window"]]))
    assert abs((r0["loss"] + r1["loss"]) / 2 - loss) < 1e-5
    assert_grads_match(r0["grads"], grads)
    assert_grads_match(r1["grads"], grads)


def test_ddp_context_parallel_ring_matches_single_process(tmp_path, corpus_dir):
    r0, r1 = run_ddp(tmp_path, corpus_dir, f"--config={ROOT}/configs/attention/ring_dilated.yaml")
    assert r0["layout"] == {"world_size": 2, "rank": 0, "cp_size": 2}
    assert torch.equal(r0["window"], r1["window"]), "a context-parallel group must read the same window"
    T = r0["window"].shape[1] - 1
    assert torch.equal(r0["x"], r0["window"][:, : T // 2]) and torch.equal(r1["x"], r1["window"][:, T // 2 : T])
    assert torch.equal(r1["y"], r1["window"][:, T // 2 + 1 :]) and r1["pos_offset"] == T // 2
    loss, grads = reference_grads(r0, r0["window"])
    assert abs((r0["loss"] + r1["loss"]) / 2 - loss) < 1e-5
    assert_grads_match(r0["grads"], grads)
    assert_grads_match(r1["grads"], grads)


CONFIGS = sorted(glob.glob(f"{ROOT}/configs/**/*.yaml", recursive=True))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", f"{ROOT}/configs/quickstart.yaml", "--config", config, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed and "seq_len" in printed


def test_gpu_preset_streams_bfloat16_and_names_the_way_back(corpus_dir):
    """configs/longnet.yaml (shrunk by tests/configs/tiny.yaml, on the CPU) trains with bfloat16
    between the blocks under its bf16-mixed precision; under a precision without bfloat16 matmuls
    the refusal names the option that restores the float32 stream, and that option runs."""
    preset = ["--config", f"{ROOT}/configs/longnet.yaml", *tiny_args(corpus_dir, "--trainer.enable_checkpointing=true",
                                                                      "--trainer.max_steps=2")]
    cli = cli_main(preset, run=False)
    dtypes = []
    cli.model.model.blocks[0].register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2 and set(dtypes) == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"got '32-true'.*--model.residual_dtype=float32"):
        cli_main(["fit", *preset, "--trainer.precision=32-true"])
    cli = cli_main(["fit", *preset, "--trainer.precision=32-true", "--model.residual_dtype=float32"])
    assert cli.trainer.global_step == 2


def test_setup_runs_once_per_layout(corpus_dir, monkeypatch):
    """fit then validate: the context-parallel groups are made (and blocks compiled) once."""
    import longctx.lit_module as lm

    calls = []
    monkeypatch.setattr(lm, "context_parallel_group", lambda layout: calls.append(layout))
    cli = cli_main(["fit", *tiny_args(corpus_dir, "--config", f"{ROOT}/configs/attention/ring_dilated.yaml",
                                      "--trainer.max_steps=2")])
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert len(calls) == 1


def test_bfloat16_residual_stream_trains_under_bf16_only(corpus_dir):
    """model.residual_dtype=bfloat16: a bf16-mixed fit runs with bfloat16 between the blocks and
    learns; under 32-true (float32 matmuls) it is refused by name; an unknown dtype too."""
    cli = cli_main([*tiny_args(corpus_dir, "--trainer.precision=bf16-mixed", "--model.residual_dtype=bfloat16",
                                      "--trainer.overfit_batches=1", "--trainer.max_steps=8")], run=False)
    dtypes = []
    cli.model.model.blocks[0].register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    dm = cli.datamodule
    cli.trainer.fit(cli.model, dm)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    batch = torch.stack([dm.train_set[i]["tokens"] for i in range(dm.batch_size)])
    fresh = cli_main([*tiny_args(corpus_dir, "--model.residual_dtype=bfloat16")], run=False)
    with torch.autocast("cpu", torch.bfloat16):
        before, after = loss_on(fresh.model.eval(), batch), loss_on(cli.model.eval(), batch)
    assert after < before - 0.1, (before, after)
    with pytest.raises(ValueError, match=r"model.residual_dtype='bfloat16' needs trainer.precision.*'32-true'"):
        cli_main(["fit", *tiny_args(corpus_dir, "--model.residual_dtype=bfloat16", "--trainer.max_steps=1")])
    with pytest.raises(ValueError, match=r"model.residual_dtype='float16' must be one of \['float32', 'bfloat16'\]"):
        LongContextLM(residual_dtype="float16")
