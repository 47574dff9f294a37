"""End to end, host side: the embedded default's vocab maps and token alignment, ours vs the naive path.

For every source of the embedded default (`configs/embedded.yaml`; build its assets first with
`python -m fusejax.embedded`) against the target: the MinED vocab map (ours: `fusejax.vocab_maps.vocab_map`;
naive: a Python minimum over `Levenshtein.distance` to every target token, as the reference's brute force)
and the token alignment of N blocks of its corpus (ours: `align_tokens`; naive: the full O(n*m) DP in Python,
`bench_align.naive_partner`), both in reference mode, outputs checked equal, timed in one run. The device side
(sparse vs dense-teacher train step) is `bench_train_step.py`.

    .venv/bin/python benchmarks/bench_e2e.py [--blocks 40] [--chars 2000]
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from bench_align import naive_partner
from rapidfuzz.distance import Levenshtein

from fusejax import dtw
from fusejax.tokenizer import load_tokenizer
from fusejax.vocab import Vocab
from fusejax.vocab_maps import vocab_map

ASSETS = Path(__file__).resolve().parents[1] / "runs" / "embedded" / "assets"


def naive_vocab_map(s: Vocab, t: Vocab) -> np.ndarray:
    """The reference's brute-force MinED map: exact marker-replaced match, else the nearest target string."""
    out = np.empty(s.size, np.int32)
    for i, token in enumerate(s.tokens):
        key = token.replace(s.marker, t.marker) if s.marker and t.marker else token
        out[i] = t.vocab[key] if key in t.vocab else min(range(t.size), key=lambda j: Levenshtein.distance(key, t.tokens[j]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--chars", type=int, default=2000)
    a = p.parse_args()
    if not (ASSETS / "target").is_dir():
        raise SystemExit(f"{ASSETS} is missing: run `python -m fusejax.embedded` first")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, python {platform.python_version()}")
    docs = [json.loads(line)["text"] for name in ("prose", "code")
            for line in (ASSETS / "corpus" / f"{name}.jsonl").read_text().splitlines()]
    text = "".join(docs)
    blocks = [text[i * a.chars:(i + 1) * a.chars] for i in range(a.blocks)]
    tgt = load_tokenizer(ASSETS / "target")
    t = Vocab(tgt)
    totals = {"ours": 0.0, "naive": 0.0}
    for name in ("llama", "neox", "mpt"):
        src = load_tokenizer(ASSETS / name)
        s = Vocab(src)
        t0 = time.perf_counter()
        ours_map, _ = vocab_map(s, t, mode="reference")
        t_map = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive_map = naive_vocab_map(s, t)
        n_map = time.perf_counter() - t0
        assert np.array_equal(ours_map, naive_map), f"{name}: vocab maps differ"
        t_align = n_align = 0.0
        # warm-up outside the timer: numba compiles (or loads from its cache) the kernels on first use
        dtw.align_tokens(s, src.encode(blocks[0]), t, tgt.encode(blocks[0]), mode="reference")
        for block in blocks:
            sid = src.encode(block, add_special_tokens=False)
            tid = tgt.encode(block, add_special_tokens=False)
            t0 = time.perf_counter()
            ours = dtw.align_tokens(s, sid, t, tid, mode="reference")
            t_align += time.perf_counter() - t0
            a_str = [s.tokens[i].replace(s.marker, "") if s.marker else s.tokens[i] for i in sid]
            b_str = [t.tokens[i].replace(t.marker, "") if t.marker else t.tokens[i] for i in tid]
            t0 = time.perf_counter()
            naive = naive_partner(a_str, b_str)
            n_align += time.perf_counter() - t0
            assert np.array_equal(ours, naive), f"{name}: alignment differs"
        totals["ours"] += t_map + t_align
        totals["naive"] += n_map + n_align
        print(f"{name:6s} vocab map {len(ours_map)}->{len(tgt)}: ours {t_map:6.2f} s, naive {n_map:6.2f} s "
              f"({n_map / t_map:5.0f}x); align {a.blocks} blocks: ours {t_align * 1e3:7.1f} ms, naive "
              f"{n_align:6.2f} s ({n_align / t_align:5.0f}x); outputs identical")
    print(f"total host side: ours {totals['ours']:.2f} s, naive {totals['naive']:.2f} s, "
          f"ratio {totals['naive'] / totals['ours']:.0f}x")


if __name__ == "__main__":
    main()
