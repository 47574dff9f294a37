"""The attention paths (``train.attention_impl``: explicit, xla = ``jax.nn.dot_product_attention``, chunked; with
``--gpu`` also cudnn, its cuDNN flash attention) in the compiled train step (``fusejax.step.compile_step`` through
``fusejax.plan.plan_training``, the step the trainer runs): per-device temporaries from XLA's memory analysis at
several sequence lengths, against the size of one ``[B, H, T, T]`` float32 score tensor, and the time of a
forward + backward pass at the shortest length, with ratios against the explicit path measured in this run.
``--gpu`` computes in bfloat16 (cuDNN's precision) and needs an NVIDIA GPU: elsewhere it prints "needs a GPU" and
exits 0.

Usage: .venv/bin/python benchmarks/bench_attention.py [--seqs 1024 2048 4096 --hidden 256 --heads 8 --kv-heads 2
       --layers 2 --vocab 4096 --batch 1 --chunk 512 --steps 5 --gpu]
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

from fusejax.config import TrainConfig
from fusejax.models import ModelConfig, Transformer, transformer
from fusejax.plan import plan_training
from fusejax.sharding import make_mesh

IMPLS = ("explicit", "xla", "chunked")
MIB = 2**20


def step_temporaries(model_config: ModelConfig, args, seq: int, impl: str) -> int:
    """Temporaries (bytes per device) of the compiled CLM train step at ``seq`` tokens with attention ``impl``."""
    tc = TrainConfig(batch_size=args.batch, seq_len=seq, attention_impl=impl, attention_chunk=args.chunk,
                     compute_dtype=model_config.dtype)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return plan_training(model_config, tc, mesh)["memory"]["temp_bytes"]


def forward_backward_ms(model_config: ModelConfig, args, seq: int, impls) -> dict[str, float]:
    """Median ms of a jitted forward + backward pass per attention path, timed round-robin."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, seq)), jnp.int32)
    fns, params = {}, None
    for impl in impls:
        model = Transformer(model_config.replace(attention_impl=impl, attention_chunk=args.chunk), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        fns[impl] = jax.jit(jax.grad(lambda p, g=graphdef: nnx.merge(g, p)(ids)[..., :args.vocab].mean()))
        jax.block_until_ready(fns[impl](params))
    times = {impl: [] for impl in impls}
    for _ in range(args.steps):
        for impl in impls:
            start = time.perf_counter()
            jax.block_until_ready(fns[impl](params))
            times[impl].append(1000 * (time.perf_counter() - start))
    return {impl: statistics.median(t) for impl, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="bfloat16, with the cudnn path (needs a GPU)")
    args = parser.parse_args()
    if args.gpu and transformer.platform() != "cuda":
        print(f"--gpu needs a GPU (cuDNN flash attention: NVIDIA); this platform is {transformer.platform()!r}")
        return
    impls, dtype = (IMPLS + ("cudnn",), "bfloat16") if args.gpu else (IMPLS, "float32")
    model_config = ModelConfig(arch="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=4 * args.hidden, num_layers=args.layers, num_heads=args.heads,
                               num_kv_heads=args.kv_heads, max_position_embeddings=max(args.seqs), dtype=dtype)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, {jax.devices()[0].device_kind}; llama hidden "
          f"{args.hidden}, {args.heads} heads ({args.kv_heads} kv), {args.layers} layers, vocab {args.vocab}, batch "
          f"{args.batch}, chunk {args.chunk}, {dtype}, remat none")
    print("| T | one [B,H,T,T] f32 MiB | " + " | ".join(f"{i} temp MiB" for i in impls)
          + " | " + " | ".join(f"{i} x explicit" for i in impls[2:]) + " |")
    print("|---:|---:|" + "---:|" * (2 * len(impls) - 2))
    for seq in args.seqs:
        temp = {impl: step_temporaries(model_config, args, seq, impl) for impl in impls}
        scores = args.batch * args.heads * seq * seq * 4
        print(f"| {seq} | {scores / MIB:.0f} | " + " | ".join(f"{temp[i] / MIB:.1f}" for i in impls)
              + " | " + " | ".join(f"{temp[i] / temp['explicit']:.3f}" for i in impls[2:]) + " |")
    ms = forward_backward_ms(model_config, args, args.seqs[0], impls)
    print(f"\nforward + backward at T={args.seqs[0]} (median of {args.steps}): "
          + ", ".join(f"{i} {ms[i]:.0f} ms ({ms[i] / ms['explicit']:.2f}x)" for i in impls))


if __name__ == "__main__":
    main()
