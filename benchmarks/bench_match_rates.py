"""Alignment rates of the real tokenizers on real text (docs/alignment.md).

Default table: for each (source -> Llama-2 target) pair and each mode, the 1-to-1, match, fallback and
empty-row rates of `fusejax.align_topk` over blocks of real text; soft projection through the MinED map of
the same mode. ``--pairs``: every ordered pair of the five spellings (Llama-2, Llama 3, DeepSeek-V4,
GPT-NeoX-20B, GPT-2) in one mode: the vocabulary's exact-match rate and mean MinED distance, and the match
rate with the exact map (hard projection) and with the MinED map. The "top-k" fed in is the source's own
next token (k = 1, the position's label), so the match rate is the share of target positions whose source
partner token maps onto the target token there: what a real top-k table would be projected through.
Needs ../shared/data (real tokenizers and corpora); ``--cache DIR`` keeps the maps between runs.

    .venv/bin/python benchmarks/bench_match_rates.py [--blocks 20] [--block-chars 4000]
    .venv/bin/python benchmarks/bench_match_rates.py --pairs [--mode default] [--cache /tmp/maps]
"""

import argparse
import platform
from pathlib import Path

import numpy as np

from fusejax.align import AlignStats, align_topk
from fusejax.tokenizer import load_tokenizer
from fusejax.vocab import Vocab
from fusejax.vocab_maps import vocab_map, vocab_map_summary

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOURCES = ("gpt-neox-20b", "gpt2", "openllama-v1")
SPELLINGS = ("llama2", "llama3", "deepseek-v4", "gpt-neox-20b", "gpt2")
CORPORA = ("wikitext2-raw-test.txt", "pytorch-examples-python.txt")


def rates(source: Vocab, target: Vocab, blocks: list[str], mode: str, vmap) -> dict:
    """AlignStats rates of ``blocks`` aligned source -> target, each position's top-1 its next source token."""
    stats = AlignStats()
    for block in blocks:
        src = np.asarray(source.tok.encode(block, add_special_tokens=False))
        tgt = np.asarray(target.tok.encode(block, add_special_tokens=False))
        top = np.append(src[1:], src[-1])[:, None]  # each position's next source token
        _, _, s = align_topk(source, src, top, np.zeros_like(top, np.float32), target, tgt,
                             vocab_map=vmap, mode=mode, return_stats=True)
        stats = stats + s
    return stats.rates()


def blocks_of(corpus: str, a) -> list[str]:
    text = (DATA / "corpora" / corpus).read_text(encoding="utf-8")
    return [text[i * a.block_chars:(i + 1) * a.block_chars] for i in range(a.blocks)]


def target_table(a):
    target = Vocab(load_tokenizer(DATA / "tokenizers" / "llama2"))
    print("| source | corpus | mode | 1-to-1 | match | fallback | empty |\n|---|---|---|---|---|---|---|")
    for name in SOURCES:
        source = Vocab(load_tokenizer(DATA / "tokenizers" / name))
        for corpus in CORPORA:
            for mode in ("reference", "default"):
                vmap, _ = vocab_map(source, target, mode=mode, cache_dir=a.cache)
                r = rates(source, target, blocks_of(corpus, a), mode, vmap)
                print(f"| {name} | {corpus.split('.')[0]} | {mode} | {r['one_to_one_rate']:.3f} | "
                      f"{r['match_rate']:.3f} | {r['fallback_rate']:.3f} | {r['empty_rate']:.3f} |", flush=True)


def pair_table(a):
    vocabs = {name: Vocab(load_tokenizer(DATA / "tokenizers" / name)) for name in SPELLINGS}
    short = [c.split("-")[0].split(".")[0] for c in CORPORA]
    print(f"mode {a.mode}; match rate with the exact map / with the MinED map, per corpus\n")
    print("| source | target | exact tokens | mean MinED distance | " + " | ".join(
        f"{c} exact | {c} MinED" for c in short) + " |\n|---|---|---|---|" + "---|---|" * len(CORPORA))
    for s_name, source in vocabs.items():
        for t_name, target in vocabs.items():
            if s_name == t_name:
                continue
            ids, dist = vocab_map(source, target, mode=a.mode, cache_dir=a.cache)
            summary = vocab_map_summary(ids, dist)
            cells = []
            for corpus in CORPORA:
                blocks = blocks_of(corpus, a)
                cells += [f"{rates(source, target, blocks, a.mode, vmap)['match_rate']:.3f}" for vmap in (None, ids)]
            print(f"| {s_name} | {t_name} | {summary['exact_rate']:.3f} | {summary['mean_distance']:.2f} | "
                  + " | ".join(cells) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--block-chars", type=int, default=4000)
    p.add_argument("--pairs", action="store_true", help="every ordered pair of the five spellings")
    p.add_argument("--mode", default="default", help="the mode of --pairs")
    p.add_argument("--cache", default=None, help="a folder keeping the vocab maps between runs")
    a = p.parse_args()
    print(f"machine: {platform.machine()}, python {platform.python_version()}")
    if a.pairs:
        pair_table(a)
    else:
        target_table(a)


if __name__ == "__main__":
    main()
