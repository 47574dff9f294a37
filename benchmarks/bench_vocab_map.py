"""Full MinED vocab map GPT-NeoX-20B (50k) -> Llama-2 (32k): wall time, peak memory, summary, both modes.

The naive brute force (one Levenshtein call per pair in Python) is timed on a sample of source tokens and
extrapolated to the whole vocabulary. Usage: .venv/bin/python benchmarks/bench_vocab_map.py
"""

import os
import platform
import resource
import time
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from fusejax.tokenizer import load_tokenizer
from fusejax.vocab import MODES, Vocab
from fusejax.vocab_maps import vocab_map, vocab_map_summary

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main():
    s = Vocab(load_tokenizer(DATA / "tokenizers" / "gpt-neox-20b"))
    t = Vocab(load_tokenizer(DATA / "tokenizers" / "llama2"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    for mode in MODES:
        t0 = time.perf_counter()
        ids, dist = vocab_map(s, t, method="mined", mode=mode)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{mode:9s} MinED map {len(ids)} -> {t.size}: {wall:6.1f} s wall, peak RSS {peak:.2f} GiB, "
              f"summary {vocab_map_summary(ids, dist)}")
    # naive brute force on a sample of the tokens that need a search
    keys = [x.replace(s.marker, t.marker) for x in s.tokens]
    todo = [k for k in keys if k not in t.vocab]
    sample = todo[:: max(1, len(todo) // 20)][:20]
    t0 = time.perf_counter()
    for key in sample:
        min(range(t.size), key=lambda j: Levenshtein.distance(key, t.tokens[j]))
    per_row = (time.perf_counter() - t0) / len(sample)
    print(f"naive brute force: {per_row * 1e3:.0f} ms per searched token, about {per_row * len(todo):.0f} s for "
          f"the {len(todo)} tokens without an exact match (extrapolated)")


if __name__ == "__main__":
    main()
