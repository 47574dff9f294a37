"""align_tokens vs the naive full DTW (pure-Python double loop calling rapidfuzz's Levenshtein).

Source GPT-NeoX-20B, target Llama-2, blocks of 1000 and 2048 target tokens of real text from ../shared/data;
prints times, the ratio (measured in this run) and whether the outputs are identical. Times are CPU seconds of
this process (time.process_time; both sides run on one thread), so that other jobs sharing the cores
distort them less than wall-clock times.
Usage: .venv/bin/python benchmarks/bench_align.py [--mode reference|default] [--repeats 3]
"""

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein

from fusejax import dtw
from fusejax.vocab import MODES, Vocab

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def naive_partner(a, b):
    """Full (n+1)x(m+1) DTW matrix and the reference backtrack, in Python lists."""
    n, m, inf = len(a), len(b), float("inf")
    M = [[inf] * (m + 1) for _ in range(n + 1)]
    M[0][0] = 0.0
    for i in range(n):
        prev, row, ai = M[i], M[i + 1], a[i]
        for j in range(m):
            row[j + 1] = Levenshtein.distance(ai, b[j]) + min(prev[j + 1], row[j], prev[j])
    i, j = n, m  # indices into M (inner matrix shifted by one)
    counts, partner = [0] * m, [-1] * m
    while i > 1 or j > 1:
        counts[j - 1] += 1
        partner[j - 1] = i - 1
        diag = M[i - 1][j - 1] if i > 1 and j > 1 else inf
        up = M[i - 1][j] if i > 1 else inf
        left = M[i][j - 1] if j > 1 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    counts[0] += 1
    partner[0] = 0
    return np.array([p if c == 1 else -1 for p, c in zip(partner, counts)], np.int32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="reference", choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from fusejax.tokenizer import load_tokenizer

    src_tok = load_tokenizer(DATA / "tokenizers" / "gpt-neox-20b")
    tgt_tok = load_tokenizer(DATA / "tokenizers" / "llama2")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    s, t = Vocab(src_tok), Vocab(tgt_tok)
    dtw.align_tokens(s, [1, 2], t, [3, 4], mode=args.mode)  # compile / load the numba cache
    for corpus in ("wikitext2-raw-test.txt", "tinyshakespeare.txt", "pytorch-examples-python.txt"):
        text = (DATA / "corpora" / corpus).read_text(encoding="utf-8")[20000:60000]
        for length in (1000, 2048):
            tgt = np.array(tgt_tok(text)["input_ids"][:length])
            block = tgt_tok.decode(tgt, skip_special_tokens=True)
            src = np.array(src_tok(block)["input_ids"])
            if args.mode == "reference":
                a = [s.tokens[i].replace(s.marker, "") for i in src]
                b = [t.tokens[i].replace(t.marker, "") for i in tgt]
            else:
                a = [s.texts[i].decode("latin-1") for i in src]
                b = [t.texts[i].decode("latin-1") for i in tgt]
            t0 = time.process_time()
            want = naive_partner(a, b)
            naive_s = time.process_time() - t0
            ours = []
            for _ in range(args.repeats):
                t0 = time.process_time()
                got = dtw.align_tokens(s, src, t, tgt, mode=args.mode)
                ours.append(time.process_time() - t0)
            print(
                f"{corpus:28s} {len(src):5d}x{len(tgt):5d} naive {naive_s:7.2f} s ({naive_s / (len(src) * len(tgt)) * 1e6:.2f}"
                f" s/Mcell)  ours {min(ours) * 1e3:7.1f} ms  ratio {naive_s / min(ours):6.0f}x  identical {np.array_equal(got, want)}"
            )


if __name__ == "__main__":
    main()
