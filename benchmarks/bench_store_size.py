"""Bytes per target position of the stored top-k distributions: the FuseLLM reference code's on-disk format
against fusejax's stores, for the same text and the same tables (issue 13, item 3).

Target Llama-2 (32000 tokens); S = 3 distributions per target position, as in the paper: the target's own
top-k and two sources aligned onto it, OpenLLaMA (here v1) and MPT (the GPT-NeoX-20B tokenizer). Text: blocks
of real text from ../shared/data/corpora. No models: each position's top-k is synthetic, the next token at
rank 0 with probability ``--hit-rate`` and otherwise distinct random ids of the vocabulary, with descending
logits; random ids rarely merge in the vocabulary map, so the aligned rows are about as full as they get (an
upper bound on a real model's fill). The sources' tables are aligned by ``fusejax.align.align_topk``
(default mode, MinED maps); the same tables are then written

* in the reference format: a Hugging Face ``datasets`` dataset (``save_to_disk``; Arrow, uncompressed) with,
  per block, ``input_ids`` and ``attention_mask`` (int64), ``per_step_logits`` [T][k] float16 and
  ``per_step_indices`` [T][k] int64 (the target's own top-k), ``metric_ce`` (float32) and for each aligned
  source i ``per_step_aligned_logits_i`` / ``per_step_aligned_indices_i`` ([T][filled entries], float16 /
  int64) and ``metric_ce_aligned_i``;
* as fusejax's aligned store (``fusejax.schema.aligned_fields``, format version 3: uint16 ids, bfloat16
  logits, no empty entries, float32 per-position CE, and nothing of the target's own top-k, which training
  reads from the target's top-k store), and in the previous layouts (version 2: the same with a copy of the
  target's own top-k; version 1: int32 ids, float32 logits, every table padded to k);
* as fusejax's top-k stores of the three models (one per source, on its own tokens; per target position).

Prints bytes per target position of each, its ratio to the version-1 aligned store, and the size for the
paper's 1.8B-token MiniPile. Needs ``pip install -e .[bench]`` (``datasets``) and ../shared/data.

    .venv/bin/python benchmarks/bench_store_size.py [--blocks 8] [--block-chars 8000] [--k 10]
"""

import argparse
import platform
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from fusejax.align import align_topk
from fusejax.schema import ALIGN_COUNTS, ALIGNED_KIND, TOPK_KIND, aligned_fields, format_meta, pack_tables, topk_fields
from fusejax.store import Field, StoreWriter
from fusejax.tokenizer import load_tokenizer
from fusejax.vocab import Vocab
from fusejax.vocab_maps import vocab_map

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TARGET, SOURCES = "llama2", ("openllama-v1", "gpt-neox-20b")
CORPORA = ("wikitext2-raw-test.txt", "pytorch-examples-python.txt")
MINIPILE_TOKENS = 1.8e9


def synthetic_topk(ids: np.ndarray, vocab: int, k: int, hit_rate: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a pretend model over ``ids`` [n]: (ids [n, k] int64 distinct per row, logits [n, k] float32)."""
    n = ids.size
    out = np.empty((n, k), np.int64)
    nxt = np.append(ids[1:], ids[-1])
    for i in range(n):
        row = np.array(list(dict.fromkeys(rng.integers(0, vocab, 2 * k + 1).tolist())))  # distinct, in draw order
        if rng.random() < hit_rate:
            row = np.concatenate([[nxt[i]], row[row != nxt[i]]])
        out[i] = row[:k]
    logits = 5 - np.sort(rng.exponential(2.0, (n, k)), axis=1)
    return out, logits.astype(np.float32)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def v1_aligned_fields(num_sources: int, k: int) -> list[Field]:
    """The aligned store's fields before format version 2 (int32 ids, float32 logits padded to k)."""
    S = num_sources
    return [Field("input_ids", "int32", (), ragged=True), Field("table_ids", "int32", (S, k), ragged=True),
            Field("table_logits", "float32", (S, k), ragged=True), *aligned_fields(S, k, 1, "float32")[4:]]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=8, help="blocks per corpus")
    p.add_argument("--block-chars", type=int, default=8000, help="characters per block (~2000 Llama-2 tokens)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hit-rate", type=float, default=0.5)
    a = p.parse_args()
    import datasets

    k, rng = a.k, np.random.default_rng(0)
    target = Vocab(load_tokenizer(DATA / "tokenizers" / TARGET))
    sources = [Vocab(load_tokenizer(DATA / "tokenizers" / name)) for name in SOURCES]
    maps = [vocab_map(s, target)[0] for s in sources]
    texts = [(DATA / "corpora" / c).read_text(encoding="utf-8") for c in CORPORA]
    blocks = [t[i * a.block_chars:(i + 1) * a.block_chars] for t in texts for i in range(a.blocks)]

    S = 1 + len(sources)
    rows, ref_rows, topk_rows = [], [], [[] for _ in range(S)]
    fill = np.zeros(S)
    for block in blocks:
        tgt = np.asarray(target.tok.encode(block, add_special_tokens=False), np.int64)
        T = tgt.size
        ids = np.full((T, S, k), -1, np.int64)
        logits = np.zeros((T, S, k), np.float32)
        ids[:, 0], logits[:, 0] = synthetic_topk(tgt, target.size, k, a.hit_rate, rng)
        ce = rng.uniform(1, 4, (T, S)).astype(np.float32)
        topk_rows[0].append((tgt, ids[:, 0], logits[:, 0], ce[:, 0]))
        for n, (s, vmap) in enumerate(zip(sources, maps), start=1):
            src = np.asarray(s.tok.encode(block, add_special_tokens=False), np.int64)
            top_ids, top_logits = synthetic_topk(src, s.size, k, a.hit_rate, rng)
            topk_rows[n].append((src, top_ids, top_logits, rng.uniform(1, 4, src.size).astype(np.float32)))
            ids[:, n], logits[:, n] = align_topk(s, src, top_ids, top_logits.astype(ml_dtypes.bfloat16), target, tgt,
                                                 vocab_map=vmap)
        logits = logits.astype(ml_dtypes.bfloat16).astype(np.float32)  # the top-k stores hold bfloat16
        fill += (ids >= 0).sum(axis=(0, 2))
        rows.append((tgt, ids, logits, ce))
        ref = {"input_ids": tgt.tolist(), "attention_mask": [1] * T, "per_step_logits": logits[:, 0].tolist(),
               "per_step_indices": ids[:, 0].tolist(), "metric_ce": float(ce[:, 0].mean())}
        for n in range(1, S):
            filled = ids[:, n] >= 0
            ref[f"per_step_aligned_indices_{n}"] = [r[f].tolist() for r, f in zip(ids[:, n], filled)]
            ref[f"per_step_aligned_logits_{n}"] = [r[f].tolist() for r, f in zip(logits[:, n], filled)]
            ref[f"metric_ce_aligned_{n}"] = float(ce[:, n].mean())
        ref_rows.append(ref)
    positions = sum(r[0].size for r in rows)

    one, two = (lambda dtype: datasets.Sequence(datasets.Value(dtype))), (
        lambda dtype: datasets.Sequence(datasets.Sequence(datasets.Value(dtype))))
    features = {"input_ids": one("int64"), "attention_mask": one("int64"), "per_step_logits": two("float16"),
                "per_step_indices": two("int64"), "metric_ce": datasets.Value("float32")}
    for n in range(1, S):
        features |= {f"per_step_aligned_logits_{n}": two("float16"), f"per_step_aligned_indices_{n}": two("int64"),
                     f"metric_ce_aligned_{n}": datasets.Value("float32")}
    columns = {name: [r[name] for r in ref_rows] for name in features}

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(tmp / "reference")
        sizes["reference (HF datasets, Arrow)"] = folder_bytes(tmp / "reference")

        def write(name, fields, kind, meta, add):
            with StoreWriter(tmp / name, kind=kind, meta=meta, fields=fields, rows_per_shard=1024) as w:
                for i, row in enumerate(rows):
                    add(w, i, row)
            return folder_bytes(tmp / name)

        common = dict(seq_ce=np.ones(S), byte_ce=np.ones(S), n_bytes=1, split=0, skip=False,
                      align_counts=np.zeros((S, len(ALIGN_COUNTS)), np.int32))
        sizes["fusejax aligned store, version 1"] = write(
            "v1", v1_aligned_fields(S, k), ALIGNED_KIND, {}, lambda w, i, r: w.add(
                i, input_ids=r[0], table_ids=r[1], table_logits=r[2], token_ce=r[3], **common))
        sizes["fusejax aligned store, version 2"] = write(
            "v2", aligned_fields(S, k, target.size, "bfloat16"), ALIGNED_KIND, {"format_version": 2},
            lambda w, i, r: w.add(i, input_ids=r[0], **pack_tables(r[1], r[2]), token_ce=r[3], **common))
        sizes["fusejax aligned store, version 3"] = write(  # the target's own row is read from its top-k store
            "v3", aligned_fields(S, k, target.size, "bfloat16", copied=1), ALIGNED_KIND, format_meta(ALIGNED_KIND),
            lambda w, i, r: w.add(i, input_ids=r[0], **pack_tables(r[1][:, 1:], r[2][:, 1:]), token_ce=r[3][:, 1:],
                                  **common))
        topk = []
        for n, vocab in enumerate([target, *sources]):
            def add(w, i, r, n=n):
                src, top_ids, top_logits, ce = topk_rows[n][i]
                w.add(i, input_ids=src, topk_ids=top_ids, topk_logits=top_logits, token_ce=ce, seq_ce=ce.mean(),
                      nonfinite=0)
            topk.append(write(f"topk{n}", topk_fields(k, "bfloat16", vocab.size), TOPK_KIND, format_meta(TOPK_KIND),
                              add))
        sizes["fusejax aligned store, version 3 + the target's top-k store (what training reads)"] = (
            sizes["fusejax aligned store, version 3"] + topk[0])
        sizes["fusejax top-k stores (3 models, version 2)"] = sum(topk)

    print(f"machine: {platform.machine()}, python {platform.python_version()}, datasets {datasets.__version__}")
    print(f"{len(blocks)} blocks, {positions} target positions, S={S}, k={k}, hit rate {a.hit_rate}; filled entries "
          f"per position and distribution: {', '.join(f'{x / positions:.2f}' for x in fill)} "
          f"(total {fill.sum() / positions:.1f} of {S * k})\n")
    base = sizes["fusejax aligned store, version 1"] / positions
    print("| format | bytes / target position | x version-1 aligned store | 1.8B tokens |\n|---|---:|---:|---:|")
    for name, size in sizes.items():
        per = size / positions
        print(f"| {name} | {per:.1f} | {per / base:.3f} | {per * MINIPILE_TOKENS / 1e9:.0f} GB |")


if __name__ == "__main__":
    main()
