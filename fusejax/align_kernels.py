"""Compiled (numba) kernels for token alignment: Levenshtein distance on code arrays, the pruned DTW and the
nearest-token search of MinED vocabulary maps.

Token strings arrive as one flat int32 array of codes (characters or bytes) plus offsets: token ``t`` is
``codes[offsets[t]:offsets[t + 1]]``. The DTW matrix is stored row by row in a ragged array: row ``i`` holds
the columns ``row_lo[i] .. row_lo[i] + row_len[i] - 1``; every other cell counts as ``INF``.
"""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

INF = np.int64(1) << 62


@njit(cache=True, inline="always")
def _myers_column(eq, vp, vn, last):
    """One column of Myers' bit-parallel edit distance in Hyyro's form for the global distance: bit q of each
    word is row q of the DP column (vertical deltas vp / vn, horizontal hp / hn); ``eq``: the rows whose pattern
    code equals this column's code; ``last``: the bit of the last row. Returns (vp, vn, change of the last row)."""
    one = np.uint64(1)
    xv = eq | vn
    xh = (((eq & vp) + vp) ^ vp) | eq
    hp = vn | ~(xh | vp)
    hn = vp & xh
    step = 1 if hp & last else (-1 if hn & last else 0)
    hp = (hp << one) | one  # the top row of the DP is 0, 1, 2, ...: its horizontal delta is +1
    hn = hn << one
    return hn | ~(xv | hp), hp & xv, step


@njit(cache=True)
def _levenshtein_bits(codes_a, a0, a1, codes_b, b0, b1):
    """Edit distance between codes_a[a0:a1] (any length) and codes_b[b0:b1] (1 to 64 codes, the pattern):
    one :func:`_myers_column` per code of a; ``score`` is the last row."""
    lb = b1 - b0
    last = np.uint64(1) << np.uint64(lb - 1)
    vp = ~np.uint64(0)  # vertical deltas +1 / -1 (first column: 0, 1, ..., lb: all +1)
    vn = np.uint64(0)
    score = lb
    for p in range(a0, a1):
        ca = codes_a[p]
        eq = np.uint64(0)
        for q in range(lb):
            if codes_b[b0 + q] == ca:
                eq |= np.uint64(1) << np.uint64(q)
        vp, vn, step = _myers_column(eq, vp, vn, last)
        score += step
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
    return char_sets(codes, offs, seq)[0]


@njit(cache=True)
def char_sets(codes, offs, seq):
    """(present, repeated) uint64 [len(seq)]: per token, the 64-bit sets of the (hashed) characters it contains
    once or more and twice or more."""
    present = np.zeros(seq.shape[0], np.uint64)
    repeated = np.zeros(seq.shape[0], np.uint64)
    for p in range(seq.shape[0]):
        once = np.uint64(0)
        twice = np.uint64(0)
        for q in range(offs[seq[p]], offs[seq[p] + 1]):
            slot = (np.uint32(codes[q]) * np.uint32(2654435761)) >> np.uint32(26) & np.uint32(63)
            bit = np.uint64(1) << np.uint64(slot)
            twice |= once & bit
            once |= bit
        present[p], repeated[p] = once, twice
    return present, repeated


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


# ------------------------------------------------------------------------------- MinED: the nearest target token


@njit(cache=True)
def _distance_within(peq, lp, codes_t, b0, b1, limit):
    """Edit distance between a pattern of ``lp`` (1 to 64) codes, given as ``peq[code]`` = the bits of the
    pattern positions holding ``code``, and codes_t[b0:b1]; some value > ``limit`` once it must exceed
    ``limit`` (the last row changes by at most 1 per column)."""
    last = np.uint64(1) << np.uint64(lp - 1)
    vp = ~np.uint64(0)
    vn = np.uint64(0)
    score = lp
    for p in range(b0, b1):
        vp, vn, step = _myers_column(peq[codes_t[p]], vp, vn, last)
        score += step
        if score - (b1 - 1 - p) > limit:
            return limit + 1
    return score


@njit(cache=True)
def _bag_bounds(len_a, set_a, rep_a, len_b, set_b, rep_b, out):
    """out[k] = a lower bound on the Levenshtein distance between a string a and strings b[k], all of length
    ``len_b``, from char_sets (``set``, ``rep``): an edit removes at most one character of a and adds at most one
    of b, so each hash that a has and b lacks, or has twice while b has it at most once, needs its own edit (and
    the same from b's side); strings with no hash in common differ at every position of the longer. (A loop
    without branches that LLVM vectorises.)"""
    gap = np.uint64(abs(len_a - len_b))
    longer = np.int32(max(len_a, len_b))
    for k in range(out.shape[0]):
        sb = set_b[k]
        rb = rep_b[k]
        x = _popcount(set_a & ~sb) + _popcount(rep_a & ~rb)
        y = _popcount(sb & ~set_a) + _popcount(rb & ~rep_a)
        out[k] = longer if set_a & sb == 0 else np.int32(max(gap, max(x, y)))


@njit(cache=True)
def _nearest(peq, codes_s, s0, s1, sets_s, codes_t, offs_t, order, len_start, sets_t, co_ids, co_counts, buf, bound):
    """The MinED choice for the source token codes_s[s0:s1] (its pattern bits set in ``peq`` when it has 1 to
    64 codes): (target id, distance) with the smallest distance, then the largest co-occurrence count
    (``co_ids`` sorted, ``co_counts``; 0 for ids not listed), then the lowest id.

    Target tokens are visited by length difference d = 0, 1, ... (``order[len_start[l]:len_start[l + 1]]``:
    the ids of length l) until d exceeds the best distance. Within a length, _bag_bounds (``sets_s``: the
    source's char_sets, ``sets_t`` the targets' in ``order``) bounds each distance from below (into scratch
    ``bound``) and tokens are compared in order of that bound, those above the best distance never: every
    token within the final distance is compared exactly. At d equal to the best distance only ties remain, so
    without co-occurrence counts only the ids below the best one are bounded (ids ascend within a length)."""
    ls = s1 - s0
    top = len_start.shape[0] - 2  # the longest target token
    set_s, rep_s = sets_s
    set_t, rep_t = sets_t
    best_d = np.int64(2**31 - 1)
    best_c = -np.inf
    best_id = np.int64(-1)
    for d in range(max(ls, top - ls) + 1):
        if d > best_d:
            break
        for side in range(2 if d > 0 else 1):
            lt = ls - d if side == 0 else ls + d
            if lt < 0 or lt > top or len_start[lt] == len_start[lt + 1]:
                continue
            a, b = len_start[lt], len_start[lt + 1]
            if d == best_d and co_ids.shape[0] == 0:  # distance >= d: only a tie with a lower id can still win
                b = a + np.searchsorted(order[a:b], best_id)
                if a == b:
                    continue
            lb = bound[: b - a]
            _bag_bounds(ls, set_s, rep_s, lt, set_t[a:b], rep_t[a:b], lb)
            level, highest = np.int64(lb.min()), np.int64(lb.max())
            while level <= min(best_d, highest):
                for k in range(b - a):
                    if lb[k] != level:
                        continue
                    j = order[a + k]
                    if ls == 0:
                        dist = np.int64(lt)
                    elif ls <= 64:
                        dist = np.int64(_distance_within(peq, ls, codes_t, offs_t[j], offs_t[j + 1], best_d))
                    else:
                        dist = np.int64(levenshtein(codes_s, s0, s1, codes_t, offs_t[j], offs_t[j + 1], buf))
                    if dist > best_d:
                        continue
                    c = 0.0
                    if co_ids.shape[0]:
                        q = np.searchsorted(co_ids, j)
                        if q < co_ids.shape[0] and co_ids[q] == j:
                            c = co_counts[q]
                    if dist < best_d or c > best_c or (c == best_c and j < best_id):
                        best_d, best_c, best_id = dist, c, j
                level += 1
    return best_id, best_d


@njit(cache=True, nogil=True)
def nearest_tokens(codes_s, offs_s, rows, codes_t, offs_t, alphabet, co_ptr, co_ids, co_counts):
    """MinED over whole vocabularies: for each source token ``rows[i]``, the target token at the smallest
    Levenshtein distance, the most frequent in co-occurrence on ties (source ``r``'s counts: ``co_ids`` /
    ``co_counts[co_ptr[r]:co_ptr[r + 1]]``, ids sorted; ``co_ptr`` all zeros for none), then the lowest id.

    Codes are dense in ``0 .. alphabet - 1``; at least one target token. Returns (target ids int32 [len(rows)],
    distances int32); identical to comparing every pair (see :func:`_nearest`). Releases the GIL: threads may
    share the rows."""
    len_t = offs_t[1:] - offs_t[:-1]
    order = np.argsort(len_t, kind="mergesort")  # by length, ids ascending within a length
    len_start = np.searchsorted(len_t[order], np.arange(len_t.max() + 2))
    sets_t = char_sets(codes_t, offs_t, order)
    set_s, rep_s = char_sets(codes_s, offs_s, rows)
    peq = np.zeros(alphabet, np.uint64)
    buf = np.empty(len_t.max() + 1, np.int64)
    bound = np.empty(np.max(len_start[1:] - len_start[:-1]), np.int32)
    ids = np.empty(rows.shape[0], np.int32)
    dist = np.empty(rows.shape[0], np.int32)
    for i in range(rows.shape[0]):
        r = rows[i]
        s0, s1 = offs_s[r], offs_s[r + 1]
        if s1 - s0 <= 64:
            for q in range(s0, s1):
                peq[codes_s[q]] |= np.uint64(1) << np.uint64(q - s0)
        c0, c1 = co_ptr[r], co_ptr[r + 1]
        ids[i], dist[i] = _nearest(peq, codes_s, s0, s1, (set_s[i], rep_s[i]), codes_t, offs_t, order, len_start,
                                   sets_t, co_ids[c0:c1], co_counts[c0:c1], buf, bound)
        for q in range(s0, min(s1, s0 + 64)):
            peq[codes_s[q]] = 0
    return ids, dist
