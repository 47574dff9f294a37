"""Full MinED vocab map (default: DeepSeek-V4 129k -> Llama 3 128k): wall and CPU time, peak memory, summary,
both modes, against the previous implementation in the same run.

Ours: fusejax.vocab_maps.vocab_map (lengths outward with bag-of-characters bounds, align_kernels.nearest_tokens).
Previous: rapidfuzz `cdist` of 512 source tokens at a time against the whole target vocabulary, argmin (the
lowest id on ties), timed on a sample of the tokens without an exact match and extrapolated to all of them;
both must choose the same tokens on that sample. Peak RSS is read after ours, before the previous one runs;
compiling and the tokenizers' spelling tables (built once per tokenizer) are not timed.

    .venv/bin/python benchmarks/bench_vocab_map.py [--source deepseek-v4] [--target llama3] [--sample 2048]
"""

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from fusejax.tokenizer import load_tokenizer
from fusejax.vocab import MODES, Vocab
from fusejax.vocab_maps import _map_strings, _mined, vocab_map, vocab_map_summary

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def previous(keys_s, rows, keys_t):
    """(target ids, distances) of ``rows`` by the previous implementation."""
    ids, dist = [], []
    for start in range(0, len(rows), 512):
        d = cdist([keys_s[r] for r in rows[start:start + 512]], keys_t, scorer=Levenshtein.distance,
                  dtype=np.int32, workers=-1)
        ids.append(d.argmin(axis=1))
        dist.append(d.min(axis=1))
    return np.concatenate(ids), np.concatenate(dist)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="deepseek-v4")
    p.add_argument("--target", default="llama3")
    p.add_argument("--sample", type=int, default=2048)
    a = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at start")
    s = Vocab(load_tokenizer(DATA / "tokenizers" / a.source))
    t = Vocab(load_tokenizer(DATA / "tokenizers" / a.target))
    for mode in MODES:  # compile (numba caches it) and fill both tokenizers' spelling tables: not timed
        keys_s, keys_t, _ = _map_strings(s, t, mode)
        _mined(keys_s, np.arange(8), keys_t, None, workers=1)
    maps = {}
    for mode in MODES:
        wall, cpu = time.perf_counter(), time.process_time()
        maps[mode] = vocab_map(s, t, method="mined", mode=mode)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{mode:9s} ours: MinED map {s.size} -> {t.size}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, "
              f"peak RSS {peak:.2f} GiB, {vocab_map_summary(*maps[mode])}", flush=True)
        maps[mode] = maps[mode] + (wall, cpu)
    for mode in MODES:
        ids, dist, wall, cpu = maps[mode]
        keys_s, keys_t, lookup = _map_strings(s, t, mode)
        todo = np.flatnonzero([k not in lookup for k in keys_s])
        rows = np.sort(np.random.default_rng(0).choice(todo, min(a.sample, todo.size), replace=False))
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        want_ids, want_dist = previous(keys_s, rows, keys_t)
        t_wall, t_cpu = (time.perf_counter() - t_wall) / rows.size * todo.size, (
            time.process_time() - t_cpu) / rows.size * todo.size
        same = np.array_equal(ids[rows], want_ids) and np.array_equal(dist[rows], want_dist)
        print(f"{mode:9s} previous (cdist, {rows.size} of the {todo.size} searched tokens, extrapolated): "
              f"{t_wall:6.1f} s wall, {t_cpu:6.1f} s CPU; ours is {t_wall / wall:.1f}x (wall), {t_cpu / cpu:.1f}x "
              f"(CPU); same choices on the sample: {same}", flush=True)


if __name__ == "__main__":
    main()
