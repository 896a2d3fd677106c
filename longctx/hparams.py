"""The model's settings checked up front: every problem in one ValueError naming each key, its
value and the rule, before anything is built or trained."""
from __future__ import annotations

import inspect
import math

import torch

from .attention.layout import validate_branches
from .checks import is_positive_int
from .attention import resolve

# torch.compile's modes; "reduce-overhead" (and "max-autotune") also replay each compiled block
# as CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")
# model.residual_dtype: float32 keeps the embedding's dtype (float32 under mixed precision).
RESIDUAL_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
BF16_PRECISIONS = ("bf16-mixed", "bf16-true")


def check_hparams(h) -> None:
    """Every problem of the model/optimiser settings in one ValueError naming the keys."""
    problems = []
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"):
        v = h[key]
        if not is_positive_int(v):
            problems.append(f"model.{key}={v!r} must be a positive integer")
    if not problems and h["d_model"] % h["n_heads"]:
        problems.append(f"model.d_model={h['d_model']} is not divisible by model.n_heads={h['n_heads']}")
    try:
        ws, _ = validate_branches(h["segment_lengths"], h["dilation_rates"])
        if h["head_split"] and isinstance(h["n_heads"], int) and h["n_heads"] < len(ws):
            problems.append(f"model.head_split=true needs model.n_heads >= {len(ws)} branches, got {h['n_heads']}")
    except ValueError as e:
        problems.append(f"model.segment_lengths/model.dilation_rates: {e}")
    if not problems and (h["d_model"] // h["n_heads"]) % 2:
        problems.append(f"model.d_model / model.n_heads = {h['d_model']} / {h['n_heads']} = "
                        f"{h['d_model'] // h['n_heads']} must be even: RoPE rotates pairs of a head's dimensions")
    for key in ("mlp_hidden", "mlp_chunk_tokens"):
        if h[key] is not None and not is_positive_int(h[key]):
            problems.append(f"model.{key}={h[key]!r} must be a positive integer or null")
    if not (isinstance(h["rope_base"], (int, float)) and h["rope_base"] > 1 and math.isfinite(h["rope_base"])):
        problems.append(f"model.rope_base={h['rope_base']!r} must be a number > 1 (RoPE's wavelengths grow as "
                        "its powers)")
    problems += attention_problems(h["attention"])
    if not (isinstance(h["lr"], (int, float)) and h["lr"] > 0 and math.isfinite(h["lr"])):
        problems.append(f"model.lr={h['lr']!r} must be a positive number")
    if h["warmup_steps"] < 0:
        problems.append(f"model.warmup_steps={h['warmup_steps']} must be >= 0")
    if h["decay_steps"] is not None and h["decay_steps"] < 1:
        problems.append(f"model.decay_steps={h['decay_steps']} must be >= 1 (or null for trainer.max_steps)")
    if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in h["betas"]) or len(h["betas"]) != 2:
        problems.append(f"model.betas={list(h['betas'])} must be two numbers in [0, 1)")
    if h["weight_decay"] < 0 or not 0 <= h["min_lr_ratio"] <= 1:
        problems.append(f"model.weight_decay={h['weight_decay']} must be >= 0 and model.min_lr_ratio="
                        f"{h['min_lr_ratio']} in [0, 1]")
    if h["compile_mode"] not in COMPILE_MODES:
        problems.append(f"model.compile_mode={h['compile_mode']!r} must be one of {list(COMPILE_MODES)}")
    if h["residual_dtype"] not in RESIDUAL_DTYPES:
        problems.append(f"model.residual_dtype={h['residual_dtype']!r} must be one of {list(RESIDUAL_DTYPES)}")
    if h["context_parallel_size"] is not None and h["context_parallel_size"] < 1:
        problems.append(f"model.context_parallel_size={h['context_parallel_size']} must be >= 1 (or null)")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


# Constructor arguments the model sets itself, not through model.attention.init_args.
SET_BY_THE_MODEL = {"segment_lengths": "model.segment_lengths", "dilation_rates": "model.dilation_rates",
                    "head_split": "model.head_split", "embed_dim": "model.d_model", "num_heads": "model.n_heads",
                    "process_group": "model.context_parallel_size", "device": "the trainer", "dtype": "the trainer"}


def attention_problems(attention: dict | None) -> list[str]:
    """What is wrong with model.attention: an unknown variant, or init_args its class does not take."""
    attention = dict(attention or {"class_path": "improved_dilated"})
    try:
        cls = resolve(attention.get("class_path", "")).cls
    except ValueError as e:
        return [str(e)]
    params = inspect.signature(cls.__init__).parameters
    takes = sorted(set(params) - {"self"} - set(SET_BY_THE_MODEL))
    problems = []
    for key in attention.get("init_args") or {}:
        if key in SET_BY_THE_MODEL:
            problems.append(f"model.attention.init_args.{key} is set by {SET_BY_THE_MODEL[key]}, not here")
        elif key not in params:
            problems.append(f"model.attention.init_args.{key}: {cls.__name__} has no argument {key!r}; it takes {takes}")
    return problems
