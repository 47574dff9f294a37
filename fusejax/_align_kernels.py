"""Compiled (numba) kernels for token alignment: Levenshtein distance on code arrays and the pruned DTW.

Token strings arrive as one flat int32 array of codes (characters or bytes) plus offsets: token ``t`` is
``codes[offsets[t]:offsets[t + 1]]``. The DTW matrix is stored row by row in a ragged array: row ``i`` holds
the columns ``row_lo[i] .. row_lo[i] + row_len[i] - 1``; every other cell counts as ``INF``.
"""

import numpy as np
from numba import njit

INF = np.int64(1) << 62


@njit(cache=True)
def levenshtein(codes_a, a0, a1, codes_b, b0, b1, buf):
    """Edit distance between codes_a[a0:a1] and codes_b[b0:b1]; ``buf`` is int64 scratch of size >= b1-b0+1."""
    la = a1 - a0
    lb = b1 - b0
    if la == 0:
        return lb
    if lb == 0:
        return la
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


@njit(cache=True)
def dtw_rows(codes_s, offs_s, seq_s, codes_t, offs_t, seq_t, lo, hi, threshold):
    """Cumulative DTW costs, restricted to columns lo[i]..hi[i] of row i and to values <= threshold.

    seq_s [n] / seq_t [m]: indices into the token tables (offs_*). Cells whose exact value exceeds
    ``threshold``, or outside the allowed columns, are INF. Returns (values int64, row_start [n+1],
    row_lo [n], row_len [n]). Cell cost: Levenshtein distance, memoised per (seq_s value, seq_t value).
    """
    n = seq_s.shape[0]
    m = seq_t.shape[0]
    # memo of costs keyed by distinct token pairs
    us = np.unique(seq_s)
    ut = np.unique(seq_t)
    rs = np.searchsorted(us, seq_s)
    rt = np.searchsorted(ut, seq_t)
    memo = np.full((us.shape[0], ut.shape[0]), -1, np.int32)
    maxlen = 1
    for t in range(offs_t.shape[0] - 1):
        if offs_t[t + 1] - offs_t[t] + 1 > maxlen:
            maxlen = offs_t[t + 1] - offs_t[t] + 1
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
                a, b = seq_s[i], seq_t[j]
                c = levenshtein(codes_s, offs_s[a], offs_s[a + 1], codes_t, offs_t[b], offs_t[b + 1], buf)
                memo[rs[i], rt[j]] = c
            v = best + c
            if v > threshold:
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
def _cell(values, row_start, row_lo, row_len, i, j):
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
    if _cell(values, row_start, row_lo, row_len, i, j) >= INF:
        return partner, False
    while i > 0 or j > 0:
        count[j] += 1
        partner[j] = i
        diag = _cell(values, row_start, row_lo, row_len, i - 1, j - 1) if i > 0 and j > 0 else INF
        up = _cell(values, row_start, row_lo, row_len, i - 1, j) if i > 0 else INF
        left = _cell(values, row_start, row_lo, row_len, i, j - 1) if j > 0 else INF
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
