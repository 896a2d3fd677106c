"""One registry: each variant's kind is declared once, by its class, and read from there by the
model, the trainer, the rotary path and the benchmark; a user's own variant, given by class_path,
trains through the CLI when it subclasses the documented base class."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from longctx.attention import REGISTRY, DilatedAttentionBase, MultiheadDilatedAttention, resolve, variant
from longctx.cli import cli_main, run_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")


class DenseCausalAttention(DilatedAttentionBase):
    """A seventh variant, as a user would write one: full softmax attention over the whole
    sequence (segments and dilations ignored), FLOPs counted for every pair."""

    def forward(self, query, key, value, is_causal=False):
        scale = self._check(query, key, value)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale).transpose(1, 2)

    def flops(self, batch, seq_len, num_heads, head_dim, is_causal=False):
        return 4 * batch * num_heads * head_dim * seq_len * seq_len // (2 if is_causal else 1)


class DenseMultihead(MultiheadDilatedAttention):
    attention_cls = DenseCausalAttention


def test_the_shipped_variants_declare_their_kind():
    declared = {name: (v.multihead, v.context_parallel, v.fused_rope)
                for name, v in ((name, variant(cls)) for name, cls in REGISTRY.items())}
    assert declared == {
        "dilated": (False, False, False),
        "improved_dilated": (False, False, True),
        "ring_dilated": (False, True, True),
        "multihead_dilated": (True, False, False),
        "improved_multihead_dilated": (True, False, False),
        "ring_multihead_dilated": (True, True, False),
    }
    assert resolve("longctx.attention.RingMultiheadDilatedAttention") == resolve("ring_multihead_dilated")


@pytest.mark.parametrize("cls,block_attention", [(DenseCausalAttention, "CoreAttention"),
                                                 (DenseMultihead, "MultiheadAdapter")])
def test_a_users_variant_trains_by_class_path(cls, block_attention, tmp_path):
    path = f"test_registry.{cls.__name__}"
    args = ["--config", TINY, f"--data.cache_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
            f'--model.attention={{"class_path": "{path}"}}', "--trainer.overfit_batches=1", "--trainer.max_steps=8"]
    cli = cli_main(["fit", *args])
    module = cli.model
    assert module.variant == cls.__name__ and not module.is_ring
    assert run_name({"class_path": path}, 4096) == f"{cls.__name__}-4k"
    block = module.model.blocks[0].attn
    assert type(block).__name__ == block_attention
    core = block.op if block_attention == "CoreAttention" else block.attn.attention
    assert type(core) is DenseCausalAttention
    # The FLOPs the trainer reports are the variant's own: the dense count for every layer.
    T, E, H = 64, 32, 4
    assert module.model.blocks[0].attn.flops(1, T) >= 4 * T * T * E // 2
    dm = cli.datamodule
    batch = torch.stack([dm.train_set[i]["tokens"] for i in range(dm.batch_size)])
    fresh = cli_main(args, run=False).model.eval()
    x, y = batch[:, :-1], batch[:, 1:]
    before, after = (F.cross_entropy(m(x).flatten(0, 1), y.reshape(-1)).item() for m in (fresh, module.eval()))
    assert math.isfinite(after) and after < before - 0.1, (before, after)


def test_a_class_that_is_no_variant_is_refused():
    with pytest.raises(ValueError, match=r"'torch.nn.Linear' is not an attention variant: .* or the class path of a "
                                         r"subclass of longctx.attention.DilatedAttentionBase"):
        resolve("torch.nn.Linear")
