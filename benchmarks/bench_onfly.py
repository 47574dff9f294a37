"""Alignment on the fly (``align.on_the_fly``): does the host keep ahead of the device? (issue 13, item 4)

The paper's setting at the 7B example's shapes (``configs/example.yaml``): target Llama-2, S = 3 distributions
per position (the target's own top-k, OpenLLaMA (here v1) and MPT (the GPT-NeoX-20B tokenizer)), k = 10, blocks
of 2048 target tokens of real text from ../shared/data/corpora (WikiText-2, pytorch/examples, Shakespeare).
No models: the top-k stores hold synthetic top-k (``bench_store_size.synthetic_topk``: the next token at rank
0 with probability 0.5, else random ids; bfloat16 logits), written with the real stores' fields, and the
vocab maps are built by ``fusejax vocab-map`` (MinED, default mode).

Measures, in this run:

* one core: training rows per second that one process builds (``BlockAligner.row`` per block, then the
  fixed-shape ``[T, S, k]`` row of ``AlignedOnTheFly.rows``), CPU seconds of this process
  (``time.process_time``, so other jobs on the machine distort it less), and where the time goes;
* ``AlignedOnTheFly`` with 1..``--workers`` worker processes: wall-clock rows per second for the whole batch
  (start-up excluded; noisy on a shared machine);

and against it the rows the device consumes: the 7B example's 128 rows per step, the step's time estimated
from its FLOPs (8 x parameters x tokens with ``remat: full``, plus attention) at ``--mfu`` of the peak of a
few accelerator slices. Prints the host cores each slice needs: rows per second needed / rows per second
per core.

    .venv/bin/python benchmarks/bench_onfly.py [--blocks 24] [--workers 2] [--mfu 0.5]
"""

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_store_size import DATA, synthetic_topk

from fusejax import align, vocab_maps
from fusejax.config import load_config, replace
from fusejax.corpus import prepare_corpus
from fusejax.data import AlignedOnTheFly
from fusejax.schema import TOPK_KIND, format_meta, topk_fields
from fusejax.store import StoreWriter, open_store
from fusejax.tokenizer import encode_block, load_tokenizer, tokenizer_fingerprint

TARGET = "llama2"
SOURCES = {"llama2": "llama2", "openllama": "openllama-v1", "mpt": "gpt-neox-20b"}  # name -> tokenizer folder
CORPORA = ("wikitext2-raw-test.txt", "pytorch-examples-python.txt", "tinyshakespeare.txt")
# the 7B example: configs/example.yaml (Llama-2-7B, batch 128 x 2048 tokens, remat full)
PARAMS, LAYERS, HIDDEN, BATCH, SEQ = 6.74e9, 32, 4096, 128, 2048
SLICES = {"TPU v4-8 (4 chips x 275 TFLOP/s)": 4 * 275e12, "TPU v5p-8 (4 chips x 459 TFLOP/s)": 4 * 459e12,
          "8 x H100 SXM (8 x 989 TFLOP/s)": 8 * 989e12}


def config(root: Path, k: int):
    """The config of the run folder ``root/run``."""
    return load_config(data={
        "run": {"output_dir": str(root / "run")},
        "target": {"tokenizer": str(DATA / "tokenizers" / TARGET)},
        "sources": [{"name": n, "tokenizer": str(DATA / "tokenizers" / t)} for n, t in SOURCES.items()],
        "represent": {"k": k},
        "corpus": {"block_size": SEQ - 1},
        "train": {"seq_len": SEQ},
    })


def build_run(root: Path, n_blocks: int, k: int):
    """A run folder with a corpus store of ``n_blocks`` blocks of 2048 target tokens, synthetic top-k stores of
    the sources and their vocab maps; returns its config."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    per = n_blocks * 9000 // len(CORPORA) + 1
    for name in CORPORA:
        text = (DATA / "corpora" / name).read_text(encoding="utf-8")
        (docs / name).write_text(text[20000:20000 + per], encoding="utf-8")
    cfg = config(root, k)
    prepare_corpus(docs, cfg.target.tokenizer_path, root / "run" / "corpus", block_size=SEQ - 1)
    corpus = open_store(root / "run" / "corpus")
    rng = np.random.default_rng(0)
    for source in cfg.sources:
        tok = load_tokenizer(source.tokenizer_path)
        meta = format_meta(TOPK_KIND, source=source.name, tokenizer_fingerprint=tokenizer_fingerprint(tok),
                           vocab_size=len(tok), k=k, logits_dtype="bfloat16", corpus=corpus.meta, eos_appended=True)
        with StoreWriter(root / "run" / "represent" / source.name, kind=TOPK_KIND, meta=meta,
                         fields=topk_fields(k, "bfloat16", len(tok)), rows_per_shard=1024) as w:
            for row in corpus:
                ids = np.asarray(encode_block(tok, row["text"].decode("utf-8")), np.int64)
                top_ids, top_logits = synthetic_topk(ids, len(tok), k, 0.5, rng)
                ce = rng.uniform(1, 4, ids.size).astype(np.float32)
                w.add(row["id"], input_ids=ids, topk_ids=top_ids, topk_logits=top_logits, token_ce=ce,
                      seq_ce=ce.mean(), nonfinite=0)
    vocab_maps.run(cfg)
    return cfg


def timed(module, name: str, totals: dict) -> None:
    """Wrap ``module.name`` so that its CPU seconds add up in ``totals[name]``."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.process_time() - t0

    setattr(module, name, wrapper)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=24, help="corpus blocks of 2048 target tokens")
    p.add_argument("--workers", type=int, default=2, help="most worker processes tried")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOP utilization assumed for the device")
    p.add_argument("--dir", type=Path, help="build the run folder here (reused when it holds one) instead of a "
                   "temporary folder")
    a = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.dir or Path(tmp)
        cfg = build_run(root, a.blocks, a.k) if not (root / "run" / "vocab_maps").is_dir() else config(root, a.k)
        fly = AlignedOnTheFly(replace(cfg, "align.workers", 0))
        n, positions = fly.num_rows, int(sum(r["n_tokens"] + 1 for r in fly.aligner.corpus))
        print(f"{n} training blocks, {positions / len(fly.aligner.corpus):.0f} target tokens per block, "
              f"S={len(fly.sources)}, k={a.k}")
        fly.rows(np.arange(1))  # numba kernels loaded, tokenizers warm
        totals = {}
        for name in ("align_tokens", "_project"):
            timed(align, name, totals)
        t0 = time.process_time()
        fly.rows(np.arange(n))
        cpu = time.process_time() - t0
        per_core = n / cpu
        print(f"\none core: {per_core:.1f} rows/s ({1e3 * cpu / n:.0f} ms CPU per row); per row: DTW (align_tokens) "
              f"{1e3 * totals['align_tokens'] / n:.0f} ms, projection (_project) {1e3 * totals['_project'] / n:.0f} ms,"
              f" the rest (tokenizing, reading, packing, unpacking) "
              f"{1e3 * (cpu - totals['align_tokens'] - totals['_project']) / n:.0f} ms")
        fly.close()
        for workers in range(1, a.workers + 1):
            fly = AlignedOnTheFly(replace(cfg, "align.workers", workers))
            fly.rows(np.arange(workers))  # start the workers
            t0 = time.perf_counter()
            fly.rows(np.arange(n))
            wall = time.perf_counter() - t0
            fly.close()
            print(f"{workers} worker process(es): {n / wall:.1f} rows/s wall-clock")

    tokens = BATCH * SEQ
    flops = 8 * PARAMS * tokens + 12 * LAYERS * HIDDEN * SEQ * tokens  # remat full: forward twice; attention
    print(f"\ndevice: the 7B example consumes {BATCH} rows per step ({flops:.3g} FLOPs at MFU {a.mfu})")
    print("| slice | step (estimate) | rows/s consumed | host cores needed at the rate above |\n|---|---:|---:|---:|")
    for name, peak in SLICES.items():
        step = flops / (peak * a.mfu)
        need = BATCH / step
        print(f"| {name} | {step:.1f} s | {need:.1f} | {math.ceil(need / per_core)} |")


if __name__ == "__main__":
    main()
