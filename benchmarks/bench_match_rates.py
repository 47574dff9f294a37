"""Alignment rates of the real tokenizers on real text, in both modes (docs/alignment.md).

For each (source -> Llama-2 target) pair and each mode: the 1-to-1, match, fallback and empty-row rates of
`fusejax.align_topk` over blocks of real text. The "top-k" fed in is the source's own next token (k = 1, the
position's label), so the match rate is the share of target positions whose source partner token maps onto
the target token there: what a real top-k table would be projected through. Soft projection through the
MinED map of the same mode. Needs ../shared/data (real tokenizers and corpora).

    .venv/bin/python benchmarks/bench_match_rates.py [--blocks 20] [--block-chars 4000]
"""

import argparse
import platform
from pathlib import Path

import numpy as np

from fusejax.align import AlignStats, align_topk
from fusejax.tokenizer import load_tokenizer
from fusejax.vocab import Vocab
from fusejax.vocab_maps import vocab_map

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOURCES = ("gpt-neox-20b", "gpt2", "openllama-v1")
CORPORA = ("wikitext2-raw-test.txt", "pytorch-examples-python.txt")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--block-chars", type=int, default=4000)
    a = p.parse_args()
    print(f"machine: {platform.machine()}, python {platform.python_version()}")
    target = Vocab(load_tokenizer(DATA / "tokenizers" / "llama2"))
    print("| source | corpus | mode | 1-to-1 | match | fallback | empty |\n|---|---|---|---|---|---|---|")
    for name in SOURCES:
        source = Vocab(load_tokenizer(DATA / "tokenizers" / name))
        for corpus in CORPORA:
            text = (DATA / "corpora" / corpus).read_text(encoding="utf-8")
            blocks = [text[i * a.block_chars:(i + 1) * a.block_chars] for i in range(a.blocks)]
            for mode in ("reference", "default"):
                vmap, _ = vocab_map(source, target, mode=mode)
                stats = AlignStats()
                for block in blocks:
                    src = np.asarray(source.tok.encode(block, add_special_tokens=False))
                    tgt = np.asarray(target.tok.encode(block, add_special_tokens=False))
                    top = np.append(src[1:], src[-1])[:, None]  # each position's next source token
                    _, _, s = align_topk(source, src, top, np.zeros_like(top, np.float32), target, tgt,
                                         vocab_map=vmap, mode=mode, return_stats=True)
                    stats = stats + s
                r = stats.rates()
                print(f"| {name} | {corpus.split('.')[0]} | {mode} | {r['one_to_one_rate']:.3f} | "
                      f"{r['match_rate']:.3f} | {r['fallback_rate']:.3f} | {r['empty_rate']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
