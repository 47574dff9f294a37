"""Greedy decoding tokens/s: the KV cache (``fusejax.generation.generate_ids``: one prefill, then one token per
step against the cache) against the naive path that recomputes the full forward over the whole sequence for
every new token (one compiled forward at the final padded length), same model and prompts, measured in one
run; compile time excluded (each path runs once before it is timed) and the two outputs checked equal.

Usage: .venv/bin/python benchmarks/bench_generate.py [--hidden 256 --heads 8 --kv-heads 2 --layers 4
       --vocab 4096 --batch 8 --prompt 64 --new 64 --repeats 3]
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusejax.generation import generate_ids
from fusejax.models import ModelConfig, Transformer


def naive_greedy(model: Transformer, prompts: np.ndarray, new: int) -> np.ndarray:
    """Greedy new ids [B, new] recomputing the whole forward pass for every token (right padding to P + new)."""
    B, P = prompts.shape
    ids = np.zeros((B, P + new), np.int32)
    ids[:, :P] = prompts
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, n):
        mask = jnp.broadcast_to(jnp.arange(ids.shape[1])[None, :] < n, ids.shape)
        logits = nnx.merge(graphdef, state)(ids, mask)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, n - 1, axis=1, keepdims=False), axis=-1)

    for t in range(new):
        ids[:, P + t] = np.asarray(step(state, ids, jnp.int32(P + t)))
    return ids[:, P:]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one untimed warm-up (compiles), and its result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = ModelConfig(arch="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, max_position_embeddings=4 * (args.prompt + args.new))
    model = Transformer(config, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, {jax.devices()[0].platform}; llama hidden {args.hidden}, "
          f"{args.heads} heads ({args.kv_heads} kv), {args.layers} layers, vocab {args.vocab}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy, float32")
    cached_s, cached = timed(lambda: generate_ids(model, prompts.tolist(), max_new_tokens=args.new, eos_ids=(),
                                                  batch_size=args.batch), args.repeats)
    naive_s, naive = timed(lambda: naive_greedy(model, prompts, args.new), args.repeats)
    same = np.mean(np.asarray(cached) == naive)
    tokens = args.batch * args.new
    print(f"KV cache: {tokens / cached_s:.0f} tokens/s ({cached_s:.2f} s); full forward per token: "
          f"{tokens / naive_s:.0f} tokens/s ({naive_s:.2f} s); cache x naive: {naive_s / cached_s:.1f}x; "
          f"same ids: {same:.0%} (median of {args.repeats})")


if __name__ == "__main__":
    main()
