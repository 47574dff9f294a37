"""DTW alignment of two token sequences (host side: numpy + numba, never JAX): which source position each
target position is paired with, exactly as the full O(n*m) dynamic programme pairs them.

The cost of pairing two tokens is a Levenshtein distance between strings of :class:`fusejax.vocab.Vocab`:
``mode="reference"`` (the FuseLLM reference code) compares the token strings with their word-start markers
removed; ``mode="default"`` compares the bytes the tokens spell. The compiled passes are in
:mod:`fusejax.align_kernels`.
"""

from __future__ import annotations

import numpy as np

from fusejax import align_kernels as K
from fusejax.vocab import Vocab, check_mode

# bytes of margin around a source token's span that the first (banded) DTW pass looks at
_BAND_BYTES = 16


def _byte_offsets(v: Vocab, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of each token of ``ids`` in the text they spell together."""
    offsets = v.codes("texts")[1]
    lengths = offsets[ids + 1] - offsets[ids]
    end = np.cumsum(lengths)
    return end - lengths, end


def align_tokens(source_tokenizer, source_ids, target_tokenizer, target_ids, mode: str = "default") -> np.ndarray:
    """DTW alignment of two token sequences (see the module docstring for the cost of each mode); the
    tokenizers may be anything :meth:`fusejax.vocab.Vocab.of` takes (pass Vocabs when calling in a loop).

    Returns int32 [len(target_ids)]: the source position paired with each target position when the path pairs
    it with exactly one source position, else -1. Identical to the full O(n*m) DP, in three compiled passes:

    1. a DP restricted to a band around the byte-offset diagonal: the cost F of one path, >= the optimum;
    2. backward over the matrix, a lower bound h(cell) on the cost still to pay after each cell, from per-cell
       costs that never exceed the Levenshtein distance (0 for equal tokens, else the largest of 1, the length
       difference and the number of hashed characters one token has and the other lacks; the longer length
       when they share no character), computed only where it stays <= F;
    3. the exact DP, where a cell whose value plus h exceeds F counts as infinite (and its Levenshtein
       distance is never computed).

    Why the backtrack cannot change: every cell of an optimal path has value + h <= optimum <= F, so it is
    kept with its exact value (its optimal predecessor is kept too); at each step the backtrack compares
    the neighbours of a cell on an optimal path, and a neighbour that ties with the minimum lies on an
    optimal path itself, so it is kept, while a neighbour above the minimum stays above it when made
    infinite. Hence the same moves and the same tie-breaking as the full DP.
    """
    check_mode(mode)
    s, t = Vocab.of(source_tokenizer), Vocab.of(target_tokenizer)
    src, tgt = s.check_ids(source_ids, "source_ids"), t.check_ids(target_ids, "target_ids")
    if src.size == 0 or tgt.size == 0:
        raise ValueError(f"align_tokens: empty sequence (source {src.size} tokens, target {tgt.size} tokens)")
    kind = "stripped" if mode == "reference" else "texts"
    codes_s, offs_s = s.codes(kind)
    codes_t, offs_t = t.codes(kind)
    n, m = src.size, tgt.size

    s_start, s_end = _byte_offsets(s, src)
    t_start, t_end = _byte_offsets(t, tgt)
    lo = np.searchsorted(t_end, s_start - _BAND_BYTES, side="right")
    hi = np.searchsorted(t_start, s_end + _BAND_BYTES, side="left") - 1
    lo[0], hi[-1] = 0, m - 1
    lo = np.minimum(lo, np.concatenate([[0], hi[:-1] + 1]))  # consecutive rows overlap or touch
    hi = np.maximum(hi, lo)
    none = np.zeros((0, 0), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    cheap = (s.keys(kind)[src], (offs_s[src + 1] - offs_s[src]).astype(np.int32), K.char_masks(codes_s, offs_s, src),
             t.keys(kind)[tgt], (offs_t[tgt + 1] - offs_t[tgt]).astype(np.int32), K.char_masks(codes_t, offs_t, tgt))
    memo = K.pair_memo(src, tgt, cheap)
    band = K.dtw_rows(codes_s, offs_s, src, codes_t, offs_t, tgt, memo, lo, hi, K.INF, *none)
    upper = K.cell(*band, n - 1, m - 1)  # the cost of a path: an upper bound on the optimal cost

    cap = min(upper + 1, 2**31 - 1)
    to_go = np.empty((n, m), np.int16 if cap <= np.iinfo(np.int16).max else np.int32)
    to_go_lo, to_go_hi = K.cost_to_go_bound(*cheap, cap, to_go)
    full_lo, full_hi = np.zeros(n, np.int64), np.full(n, m - 1, np.int64)
    rows = K.dtw_rows(codes_s, offs_s, src, codes_t, offs_t, tgt, memo, full_lo, full_hi, upper,
                      to_go, to_go_lo, to_go_hi)
    partner, ok = K.backtrack(*rows, n, m)
    assert ok, "the pruned DTW lost the end cell"
    return partner
