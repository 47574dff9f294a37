"""Compiled (numba) kernels for token alignment: Levenshtein distance on code arrays and the pruned DTW.

Token strings arrive as one flat int32 array of codes (characters or bytes) plus offsets: token ``t`` is
``codes[offsets[t]:offsets[t + 1]]``. The DTW matrix is stored row by row in a ragged array: row ``i`` holds
the columns ``row_lo[i] .. row_lo[i] + row_len[i] - 1``; every other cell counts as ``INF``.
"""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

INF = np.int64(1) << 62


@njit(cache=True)
def _levenshtein_bits(codes_a, a0, a1, codes_b, b0, b1):
    """Edit distance between codes_a[a0:a1] (any length) and codes_b[b0:b1] (1 to 64 codes): Myers'
    bit-parallel algorithm in Hyyro's form for the global distance. Bit q of each word is row q of the DP
    column (vertical deltas vp / vn, horizontal hp / hn); one column per code of a; ``score`` is the last row."""
    lb = b1 - b0
    last = np.uint64(1) << np.uint64(lb - 1)
    one = np.uint64(1)
    vp = ~np.uint64(0)  # vertical deltas +1 / -1 (first column: 0, 1, ..., lb: all +1)
    vn = np.uint64(0)
    score = lb
    for p in range(a0, a1):
        ca = codes_a[p]
        eq = np.uint64(0)
        for q in range(lb):
            if codes_b[b0 + q] == ca:
                eq |= one << np.uint64(q)
        xv = eq | vn
        xh = (((eq & vp) + vp) ^ vp) | eq
        hp = vn | ~(xh | vp)
        hn = vp & xh
        if hp & last:
            score += 1
        elif hn & last:
            score -= 1
        hp = (hp << one) | one  # the top row of the DP is 0, 1, 2, ...: its horizontal delta is +1
        hn = hn << one
        vp = hn | ~(xv | hp)
        vn = hp & xv
    return score


@njit(cache=True)
def levenshtein(codes_a, a0, a1, codes_b, b0, b1, buf):
    """Edit distance between codes_a[a0:a1] and codes_b[b0:b1]; ``buf`` is int64 scratch of size >= b1-b0+1."""
    la = a1 - a0
    lb = b1 - b0
    if la == 0:
        return lb
    if lb == 0:
        return la
    if lb <= 64:
        return _levenshtein_bits(codes_a, a0, a1, codes_b, b0, b1)
    if la <= 64:
        return _levenshtein_bits(codes_b, b0, b1, codes_a, a0, a1)
    for j in range(lb + 1):
        buf[j] = j
    for i in range(1, la + 1):
        diag = buf[0]
        buf[0] = i
        ca = codes_a[a0 + i - 1]
        for j in range(1, lb + 1):
            up = buf[j]
            best = diag + (0 if ca == codes_b[b0 + j - 1] else 1)
            if up + 1 < best:
                best = up + 1
            if buf[j - 1] + 1 < best:
                best = buf[j - 1] + 1
            diag = up
            buf[j] = best
    return buf[lb]


@intrinsic
def _popcount(typingctx, x):
    """Number of set bits of a uint64 (the CPU's popcount instruction)."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(cache=True)
def char_masks(codes, offs, seq):
    """uint64 [len(seq)]: per token, a 64-bit set of (hashed) characters it contains."""
    out = np.zeros(seq.shape[0], np.uint64)
    for p in range(seq.shape[0]):
        mask = np.uint64(0)
        for q in range(offs[seq[p]], offs[seq[p] + 1]):
            mask |= np.uint64(1) << np.uint64((np.uint32(codes[q]) * np.uint32(2654435761)) >> np.uint32(26) & np.uint32(63))
        out[p] = mask
    return out


@njit(cache=True, inline="always")
def _cheap_cost(key_a, len_a, mask_a, key_b, len_b, mask_b):
    """A lower bound on the Levenshtein distance of two tokens (see cost_to_go_bound), as int32."""
    c = max(np.int32(abs(len_a - len_b)), np.int32(_popcount(mask_a & ~mask_b)), np.int32(_popcount(mask_b & ~mask_a)),
            np.int32(1))
    if mask_a & mask_b == 0:  # no character in common: every aligned position is a substitution
        c = max(np.int32(len_a), np.int32(len_b), np.int32(1))
    return np.int32(0) if key_a == key_b else c


@njit(cache=True)
def _row_costs(key_a, len_a, mask_a, key_b, len_b, mask_b, out):
    """out[j] = _cheap_cost of token a against each token j of b (a loop from 0 that LLVM vectorises)."""
    for j in range(out.shape[0]):
        out[j] = _cheap_cost(key_a, len_a, mask_a, key_b[j], len_b[j], mask_b[j])


@njit(cache=True)
def cost_to_go_bound(key_s, len_s, mask_s, key_t, len_t, mask_t, cap, out):
    """Lower bounds on the DTW cost still to pay after cell (i, j) to reach (n-1, m-1), capped at ``cap``.

    The exact backward DP over a per-cell cost that never exceeds the Levenshtein distance of the two tokens:
    0 for equal tokens (same ``key``), else the largest of 1, the length difference and the number of
    character hashes (``mask``) that either token has and the other lacks (each needs its own edit); when the
    masks share no bit the tokens share no character, so the distance is exactly the longer length.
    Only cells below ``cap`` are computed: row i holds them in ``out[i, lo[i]:hi[i] + 1]`` (``out``: int16
    or int32 [n, m], the rest left untouched); every other cell's bound is ``cap``. Returns (lo, hi) int64 [n].
    """
    n = key_s.shape[0]
    m = key_t.shape[0]
    lo = np.full(n, m, np.int64)
    hi = np.full(n, -1, np.int64)
    top = np.int32(cap)
    below = np.full(m + 1, top, np.int32)  # cell cost + bound of row i + 1 (top outside blo..bhi)
    here = np.full(m + 1, top, np.int32)
    cost = np.empty(m, np.int32)
    below[m] = 0  # a virtual successor of (n-1, m-1) that ends the path
    blo, bhi = m - 1, m
    for i in range(n - 1, -1, -1):
        ks = key_s[i]
        ls = np.int32(len_s[i])
        ms = mask_s[i]
        start = min(bhi, m - 1)
        stop = max(blo - 1, 0)
        _row_costs(ks, ls, ms, key_t[stop : start + 1], len_t[stop : start + 1], mask_t[stop : start + 1],
                   cost[stop : start + 1])
        right = top
        row = out[i]
        for k in range(start - stop + 1):  # cells with a successor in the row below, right to left
            u = np.uint64(start - k)  # (an unsigned index: no negative-index wraparound in the loop)
            best = min(right, min(below[u], below[u + np.uint64(1)]))
            row[u] = best
            right = min(best + cost[u], top)
            here[u] = right
        j = stop - 1
        while j >= 0 and right < top:  # cells further left, reached along the row
            out[i, j] = right
            right = min(right + _cheap_cost(ks, ls, ms, key_t[j], len_t[j], mask_t[j]), top)
            here[j] = right
            j -= 1
        # a cell whose cost + bound reaches top cannot lie on a path of cost < top: its bound may say top
        first, last = j + 1, min(bhi, m - 1)
        while last >= first and here[last] >= top:
            last -= 1
        while first <= last and here[first] >= top:
            first += 1
        lo[i], hi[i] = first, last
        for k in range(blo, bhi + 1):  # ``below`` becomes the next row's scratch: back to top
            below[k] = top
        below, here = here, below
        blo, bhi = first, last
        if first > last:
            break  # every earlier row is at top too
    return lo, hi


@njit(cache=True)
def pair_memo(seq_s, seq_t, cheap):
    """The cell-cost cache shared by DTW passes: (rs [n], rt [m], memo int32 [distinct s, distinct t] of -1,
    cheap) where ``cheap`` = (key_s, len_s, mask_s, key_t, len_t, mask_t) describes each position's token."""
    us = np.unique(seq_s)
    ut = np.unique(seq_t)
    memo = np.full((us.shape[0], ut.shape[0]), -1, np.int32)
    return np.searchsorted(us, seq_s), np.searchsorted(ut, seq_t), memo, cheap


@njit(cache=True)
def dtw_rows(codes_s, offs_s, seq_s, codes_t, offs_t, seq_t, memo, lo, hi, threshold, bound, bound_lo, bound_hi):
    """Cumulative DTW costs, restricted to columns lo[i]..hi[i] of row i and to cells that can lie on a path
    of cost <= threshold.

    seq_s [n] / seq_t [m]: indices into the token tables (offs_*). ``bound``: (values [n, m], lo [n], hi [n]):
    lower bounds on the cost to go after each cell, as cost_to_go_bound leaves them (``threshold + 1`` outside
    lo..hi), or n = 0 for none. A cell is INF when it
    lies outside the allowed columns or when its value plus its bound exceeds ``threshold``; every other
    cell holds its value given the INF cells. Returns (values int64, row_start [n+1],
    row_lo [n], row_len [n]). Cell cost: Levenshtein distance, memoised in ``memo`` (see pair_memo).
    """
    n = seq_s.shape[0]
    m = seq_t.shape[0]
    use_bound = bound.shape[0] > 0
    rs, rt, memo, (key_s, len_s, mask_s, key_t, len_t, mask_t) = memo
    maxlen = 1
    for t in seq_t:  # Levenshtein scratch: the longest target token + 1
        maxlen = max(maxlen, offs_t[t + 1] - offs_t[t] + 1)
    buf = np.empty(maxlen, np.int64)

    cap = max(1024, 4 * (n + m))
    values = np.empty(cap, np.int64)
    row_start = np.zeros(n + 1, np.int64)
    row_lo = np.zeros(n, np.int64)
    row_len = np.zeros(n, np.int64)
    pos = 0
    prev_lo = 0  # columns of the previous row's stored values
    prev_len = 0
    plo = 0  # first / last finite column of the previous row (phi < plo: none)
    phi = -1
    for i in range(n):
        start = lo[i]
        if i > 0 and plo > start:
            start = plo
        if i == 0 and start > 0:
            start = m  # row 0 starts at column 0 or is empty
        if pos + (m - start) + 1 > cap:
            grown = np.empty(max(2 * cap, pos + m + 1), np.int64)
            grown[:pos] = values[:pos]
            values = grown
            cap = grown.shape[0]
        row_start[i] = pos
        row_lo[i] = start
        flo = m
        fhi = -1
        left = INF
        j = start
        while j <= hi[i] and j < m:
            if i == 0:
                best = np.int64(0) if j == 0 else left
            else:
                best = left
                k = j - prev_lo
                if 0 <= k < prev_len and values[row_start[i - 1] + k] < best:
                    best = values[row_start[i - 1] + k]
                if 0 <= k - 1 < prev_len and values[row_start[i - 1] + k - 1] < best:
                    best = values[row_start[i - 1] + k - 1]
            if use_bound and best < INF and (j < bound_lo[i] or j > bound_hi[i] or best + bound[i, j] > threshold):
                best = INF  # even a free cell here could not lie on a path of cost <= threshold
            if best >= INF:
                if j > phi + 1:
                    break  # nothing further right can be reached in this row
                values[pos] = INF
                pos += 1
                left = INF
                j += 1
                continue
            c = memo[rs[i], rt[j]]
            if c < 0:
                c = _cheap_cost(key_s[i], len_s[i], mask_s[i], key_t[j], len_t[j], mask_t[j])
                if c > 0 and c < max(len_s[i], len_t[j]):  # else the lower bound meets the upper bound
                    a, b = seq_s[i], seq_t[j]
                    c = levenshtein(codes_s, offs_s[a], offs_s[a + 1], codes_t, offs_t[b], offs_t[b + 1], buf)
                memo[rs[i], rt[j]] = c
            v = best + c
            if v + (bound[i, j] if use_bound else 0) > threshold:  # (a cell outside lo..hi is INF by now)
                v = INF
            else:
                if j < flo:
                    flo = j
                fhi = j
            values[pos] = v
            pos += 1
            left = v
            j += 1
        row_len[i] = j - start
        prev_lo = start
        prev_len = j - start
        plo = flo
        phi = fhi
    row_start[n] = pos
    return values[:pos], row_start, row_lo, row_len


@njit(cache=True)
def cell(values, row_start, row_lo, row_len, i, j):
    """Value of cell (i, j) of the ragged DTW matrix (INF outside the stored columns of row i)."""
    k = j - row_lo[i]
    if k < 0 or k >= row_len[i]:
        return INF
    return values[row_start[i] + k]


@njit(cache=True)
def backtrack(values, row_start, row_lo, row_len, n, m):
    """Reference backtrack from (n-1, m-1) to (0, 0); ties: diagonal, then up, then left.

    Returns (partner [m] int32: the only source row paired with each target column, else -1;
    ok: False when the end cell is INF).
    """
    partner = np.full(m, -1, np.int32)
    count = np.zeros(m, np.int32)
    i = n - 1
    j = m - 1
    if cell(values, row_start, row_lo, row_len, i, j) >= INF:
        return partner, False
    while i > 0 or j > 0:
        count[j] += 1
        partner[j] = i
        diag = cell(values, row_start, row_lo, row_len, i - 1, j - 1) if i > 0 and j > 0 else INF
        up = cell(values, row_start, row_lo, row_len, i - 1, j) if i > 0 else INF
        left = cell(values, row_start, row_lo, row_len, i, j - 1) if j > 0 else INF
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    count[0] += 1
    partner[0] = 0
    for c in range(m):
        if count[c] != 1:
            partner[c] = -1
    return partner, True
