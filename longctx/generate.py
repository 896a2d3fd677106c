"""Generate text from a trained checkpoint with the bounded dilated KV cache (decode.py):

    python -m longctx.generate --checkpoint runs/improved_dilated-32k/version_0/checkpoints/last.ckpt --prompt "def "

The checkpoint carries the tokenizer it was trained with, so nothing else is needed. Tokens are
printed as they come; a last line gives the prompt and new tokens, the prefill time, the decode
rate and the cache's memory. `generate()` is the same loop for Python.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from .decode import Decoder


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): the argmax at temperature 0, else a draw from the
    softmax at `temperature`, kept to the top_k most likely and the smallest set whose
    probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        before = probs.cumsum(-1) - probs  # the probability of the more likely tokens
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, graph: bool | None = None, on_token=None,
             stats: dict | None = None) -> torch.Tensor:
    """idx (B, P) long -> (B, P + max_new_tokens): the prompt and what the model (a LongNetLM)
    writes after it, equal-length prompts in a batch. graph: capture the decode step in a CUDA
    graph (default: on CUDA). on_token(tokens (B,)) is called with each new token. stats, if
    given, gets prefill_s, decode_tokens_per_s and cache_bytes."""
    model.eval()
    device = idx.device
    decoder = Decoder(model, idx.shape[0], next(model.parameters()).dtype, device)
    if graph if graph is not None else device.type == "cuda":
        decoder.capture()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    logits = decoder.prefill(idx)
    sync()
    prefill_s = time.perf_counter() - start
    out = [idx]
    start = time.perf_counter()
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits = decoder.step(token)
    sync()
    if stats is not None:
        stats.update(prefill_s=prefill_s, cache_bytes=decoder.nbytes(),
                     decode_tokens_per_s=max_new_tokens / max(time.perf_counter() - start, 1e-9))
    return torch.cat(out, 1)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; ValueError for an empty prompt or text the tokenizer can only
    encode as its unknown token (the model would see none of it)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give --prompt, --prompt_file or text on standard input")
    if tokenizer.unk_id is not None and tokenizer.unk_id in ids:
        raise ValueError(f"the prompt has text the tokenizer ({tokenizer.name}) cannot encode: it becomes the "
                         f"unknown token (id {tokenizer.unk_id}) at {ids.count(tokenizer.unk_id)} place(s)")
    return ids


def fail(message: str) -> None:
    """One line on standard error and exit status 2: a setting or input that cannot work."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(checkpoint: str, device: torch.device):
    """(model, tokenizer, training length) from a train.py checkpoint."""
    from .checkpoint import read_checkpoint
    from .lit_module import LongContextLM
    from .tokenizer import Tokenizer, from_serialized

    saved = read_checkpoint(checkpoint, key="--checkpoint")
    try:
        module = LongContextLM(**{k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")})
        module.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:  # no hparams, others' hparams, others' weights
        raise ValueError(f"--checkpoint={checkpoint!r} is not a longctx run's checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    state = saved.get("TextDataModule", {}).get("tokenizer")
    tokenizer = from_serialized(state) if state else Tokenizer()
    model = module.model.to(device)
    if device.type == "cuda":  # bf16 weights and cache: half the bytes each decode step reads
        model = model.to(torch.bfloat16)
    return model.eval(), tokenizer, module.hparams.seq_len


class Printer:
    """Prints the text of the tokens of sequence 0 as they come, holding back an incomplete
    UTF-8 character until its last byte arrives."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m longctx.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (.ckpt)")
    p.add_argument("--prompt", help="the prompt; default: --prompt_file, else standard input")
    p.add_argument("--prompt_file", help="a file holding the prompt")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top_k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float, help="sample among the most likely tokens of this total probability")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--no_graph", action="store_true", help="run the decode step eagerly on CUDA")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        fail(f"--max_new_tokens={args.max_new_tokens}, --temperature={args.temperature}, --top_p={args.top_p}: "
             "need max_new_tokens >= 1, temperature >= 0 (0: greedy) and top_p in (0, 1]")
    try:
        prompt = args.prompt if args.prompt is not None else (Path(args.prompt_file).read_text(encoding="utf-8")
                                                              if args.prompt_file else sys.stdin.read())
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt from {args.prompt_file or 'standard input'}: {e}")
    device = torch.device(args.device)
    try:
        model, tokenizer, trained = load(args.checkpoint, device)
        ids = prompt_ids(tokenizer, prompt)
    except ValueError as e:
        fail(str(e))
    if len(ids) + args.max_new_tokens > trained:
        warnings.warn(f"{len(ids) + args.max_new_tokens} positions: beyond {trained}, the training length, positions "
                      "were never trained", stacklevel=1)
    print(prompt, end="", flush=True)
    stats = {}
    generate(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
             args.seed, graph=False if args.no_graph else None, on_token=Printer(tokenizer), stats=stats)
    print(f"\n[{len(ids)} prompt tokens, {args.max_new_tokens} new; prefill {stats['prefill_s']:.3f} s; "
          f"{stats['decode_tokens_per_s']:.1f} tokens/s; cache {stats['cache_bytes'] / 2**20:.1f} MiB]", file=sys.stderr)


if __name__ == "__main__":
    main()
