"""Source representation throughput and host memory (`fusejax.represent`).

1. Throughput: the jitted extraction step of the represent stage (``fusejax.represent.extract_step``: forward,
   top-k, per-token cross-entropy on the device; only ``[B,T,k]`` and ``[B,T]`` arrays are fetched) against a
   plain jitted forward pass of the same model and batch whose ``[B,T,V]`` logits stay on the device
   (``forward``), and against the stricter ``forward+sum`` (fetches only the logits' sum, which XLA may fuse
   into the vocabulary matmul). All are timed interleaved in one process, ``--repeats`` times each; the
   medians give tokens/s and the ratios extract/forward (target >= 0.9). Random Llama-style models. Also the
   compiled temporaries of forward and extract (XLA memory analysis): extract holds logits for ``--chunk``
   positions of each row at a time, never ``[B,T,V]``.
2. Host memory: ``represent_source`` (streaming, one source) over corpus stores of N and 4N blocks of 256
   tokens of the standard library's source, each in a fresh subprocess; prints its peak RSS after loading the
   model and at the end. ``--diagnose`` also times forward + XLA's full ``top_k`` and, on precomputed logits,
   the epilogue, ``represent.top_k`` and ``lax.top_k`` alone.

Usage: .venv/bin/python benchmarks/bench_extract.py [--vocab 32000 --sizes 256x4,512x8 --batch 8 --seq 256
       --k 10 --repeats 7 --blocks 150 --chunk 256 --diagnose --skip-memory]
"""

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_train_step import machine

from fusejax.models import ModelConfig, Transformer
from fusejax.represent import CHUNK, extract_step, position_stats, top_k

HERE = Path(__file__).resolve()


@nnx.jit
def _forward(model, input_ids, attention_mask):
    """The baseline: the same forward pass, its ``[B,T,V]`` logits left on the device."""
    return model(input_ids, attention_mask)


@nnx.jit
def _forward_sum(model, input_ids, attention_mask):
    """A stricter baseline: the forward pass reduced to one scalar. XLA:CPU fuses the sum into the vocabulary
    matmul, so the ``[B,T,V]`` logits are never written: cheaper than a forward pass that produces them."""
    return model(input_ids, attention_mask).astype(jnp.float32).sum()


@functools.partial(nnx.jit, static_argnames="k")
def _forward_topk(model, input_ids, attention_mask, k):
    """Diagnostic: forward + XLA's own ``top_k`` over V (what ``represent.top_k`` replaces)."""
    return jax.lax.top_k(model(input_ids, attention_mask).astype(jnp.float32), k)


def _model(vocab: int, hidden: int, layers: int, seq: int) -> Transformer:
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_layers=layers, num_heads=max(1, hidden // 64), max_position_embeddings=max(seq, 256))
    return Transformer(cfg, rngs=nnx.Rngs(0))


def throughput(a) -> list[dict]:
    rows = []
    for size in a.sizes.split(","):
        hidden, layers = map(int, size.split("x"))
        model = _model(a.vocab, hidden, layers, a.seq)
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
        mask = jnp.ones_like(ids)
        variants = {
            "forward": lambda: jax.block_until_ready(_forward(model, ids, mask)),
            "forward+sum": lambda: jax.device_get(_forward_sum(model, ids, mask)),
            "extract": lambda: jax.device_get(extract_step(model, ids, mask, a.k, chunk=a.chunk)),
        }
        temp = {"forward": _forward.lower(model, ids, mask), "extract": extract_step.lower(model, ids, mask, a.k,
                                                                                           chunk=a.chunk)}
        temp = {name: lowered.compile().memory_analysis().temp_size_in_bytes / 2**20 for name, lowered in temp.items()}
        if a.diagnose:
            variants["forward+lax.top_k"] = lambda: jax.device_get(_forward_topk(model, ids, mask, a.k))
        times = {name: [] for name in variants}
        for fn in variants.values():  # compile and warm up
            fn()
            fn()
        for _ in range(a.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tokens = a.batch * a.seq
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"size": f"hidden {hidden}, {layers} layers", "vocab": a.vocab, "chunk": a.chunk,
               "forward [B,T,V] f32 MiB": a.batch * a.seq * a.vocab * 4 / 2**20,
               **{f"{name} temp MiB": m for name, m in temp.items()},
               **{f"{name} tok/s": tokens / t for name, t in med.items()},
               "ratio": med["forward"] / med["extract"], "ratio vs forward+sum": med["forward+sum"] / med["extract"],
               "spread": {name: [round(min(t) * 1e3), round(max(t) * 1e3)] for name, t in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.diagnose:  # the top-k/CE epilogue alone, on precomputed logits
            logits = _forward(model, ids, mask)
            for name, fn in (("epilogue (top-k + CE)", jax.jit(lambda lg: position_stats(lg, ids, a.k))),
                             ("represent.top_k", jax.jit(lambda lg: top_k(lg, a.k))),
                             ("lax.top_k", jax.jit(lambda lg: jax.lax.top_k(lg, a.k)))):
                jax.block_until_ready(fn(logits))
                ts = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(logits))
                    ts.append(time.perf_counter() - t0)
                print(f"  {name} on [B,T,V] logits: {statistics.median(ts) * 1e3:.1f} ms "
                      f"(forward: {med['forward'] * 1e3:.1f} ms)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ memory

# peak RSS: VmHWM of this exec'd process; getrusage's ru_maxrss is printed too, but Linux carries it over
# from the forking parent, so it is only meaningful when the parent was smaller
MEMORY_CHILD = """
import json, resource, sys, time
from fusejax.models import load_pretrained
from fusejax.models.hf_io import model_fingerprint
from fusejax.represent import represent_source

def peaks():
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"VmHWM_MiB": hwm // 1024, "ru_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}

model_dir, tok_dir, corpus, out = sys.argv[1:5]
model = load_pretrained(model_dir)
before = peaks()
t0 = time.perf_counter()
stats = represent_source(model, tok_dir, corpus, out, name="src", k=10, batch_size=8, progress=False,
                         model_fingerprint=model_fingerprint(model_dir))
print(json.dumps({"after_model_load": before, "at_end": peaks(), "blocks": stats["blocks"],
                  "tokens": stats["tokens"], "seconds": round(time.perf_counter() - t0, 1)}))
"""


def memory(a) -> list[dict]:
    import sysconfig

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fusejax.corpus import prepare_corpus
    from fusejax.models import save_pretrained

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    # real text: the standard library's own source files
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(errors="replace") for f in files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts[:40], trainers.BpeTrainer(vocab_size=2000, special_tokens=["</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.save_pretrained(work / "tok")
    cfg = ModelConfig(arch="llama", vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=2, max_position_embeddings=512, eos_token_id=fast.eos_token_id)
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), work / "model")
    docs = work / "docs"
    docs.mkdir()
    for i, text in enumerate(texts):
        (docs / f"{i:04d}.txt").write_text(text)
    rows = []
    for n in (a.blocks, 4 * a.blocks):
        # the first n blocks of the stdlib corpus, as a corpus store of its own
        full = work / "corpus_full"
        if not full.exists():
            prepare_corpus(docs, work / "tok", full, block_size=256)
        from fusejax.store import StoreWriter, open_store

        src = open_store(full)
        if len(src) < n:
            raise SystemExit(f"the stdlib corpus has only {len(src)} blocks of 256 tokens; lower --blocks")
        corpus = work / f"corpus_{n}"
        with StoreWriter(corpus, kind="corpus", meta=src.meta, fields=src.fields, rows_per_shard=4096) as w:
            for i in range(n):
                row = src.row(i)
                w.add(int(row["id"]), **{f.name: row[f.name] for f in src.fields})
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(work / "model"), str(work / "tok"),
                               str(corpus), str(work / f"topk_{n}")], capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if proc.returncode:
            raise SystemExit(proc.stderr)
        row = {"blocks": n, **json.loads(proc.stdout.splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sizes", default="256x4,512x8", help="comma-separated HIDDENxLAYERS")
    for name, default in (("batch", 8), ("seq", 256), ("k", 10), ("repeats", 7), ("blocks", 150)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--chunk", type=int, default=CHUNK, help="positions per chunk of extract_step")
    p.add_argument("--diagnose", action="store_true", help="also time forward+lax.top_k and the epilogue parts alone")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    a = p.parse_args()
    print("machine:", machine(), flush=True)
    print(f"batch {a.batch} x {a.seq} tokens, k={a.k}, {a.repeats} interleaved repeats (median)", flush=True)
    if not a.skip_memory:  # first, while this process is still small (see MEMORY_CHILD)
        memory(a)
    if not a.skip_throughput:
        throughput(a)
    print("load average at the end:", " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print("this process's peak RSS:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MiB")


if __name__ == "__main__":
    main()
