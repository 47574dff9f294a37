"""Deterministic synthetic training rows for tests and benchmarks (no corpus, no models needed)."""

from __future__ import annotations

import numpy as np

from fusejax.schema import CE_FIELDS, IGNORE_LABEL, row_layout


class SyntheticTables:
    """Deterministic random training rows of :func:`fusejax.schema.row_layout` (for tests and benchmarks);
    implements :class:`fusejax.data.Batches`.

    Row ``i`` depends only on ``(seed, i)``: a random token sequence of ``seq_len + 1`` tokens (inputs are
    the first ``seq_len``, labels the next token), right padding of up to half the row when ``padding``,
    and per position and source a top-k table of distinct ids that holds the true next token with
    probability ``hit_rate``; a fraction ``empty_fraction`` of (position, source) rows is empty (all -1).
    ``source_ce`` is uniform in [1, 4) per row and source (``[S]``, or ``[T, S]`` with ``token_level_ce``);
    ``n_bytes`` counts 4 bytes per real token. ``with_tables=False``: plain causal-LM rows (no tables, no CE).
    """

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int, *, num_sources: int = 3, k: int = 10,
                 seed: int = 0, padding: bool = True, empty_fraction: float = 0.1, hit_rate: float = 0.7,
                 token_level_ce: bool = False, with_tables: bool = True):
        if vocab_size < 2 * (k + 1):
            raise ValueError(f"SyntheticTables: vocab_size={vocab_size} must be at least 2*(k+1)={2 * (k + 1)}")
        self.num_rows, self.seq_len, self.vocab_size = num_rows, seq_len, vocab_size
        self.num_sources, self.k, self.seed = num_sources, k, seed
        self.padding, self.empty_fraction, self.hit_rate = padding, empty_fraction, hit_rate
        self.token_level_ce, self.with_tables = token_level_ce, with_tables
        self.layout = row_layout(seq_len, num_sources if with_tables else 0, k,
                                 "token" if token_level_ce else "sequence")

    def row(self, i: int) -> dict[str, np.ndarray]:
        """The fields of row ``i`` (no leading batch axis)."""
        rng = np.random.default_rng([self.seed, int(i)])
        T, S, k, V = self.seq_len, self.num_sources, self.k, self.vocab_size
        tokens = rng.integers(0, V, T + 1)
        length = int(rng.integers(T // 2, T + 1)) if self.padding else T
        real = np.arange(T) < length
        out = {
            "input_ids": np.where(real, tokens[:T], 0),
            "attention_mask": real,
            "labels": np.where(real, tokens[1:], IGNORE_LABEL),
            "loss_mask": real,
            "n_bytes": 4 * length,  # as if every token spelled 4 bytes (for bits per byte)
        }
        if self.with_tables:
            # distinct ids per (t, s): a start id plus strictly increasing offsets below V
            gaps = rng.integers(1, V // (k + 1), (T, S, k))
            offsets = np.cumsum(gaps, axis=-1) - gaps[..., :1]
            hit = rng.random((T, S)) < self.hit_rate
            start = np.where(hit, tokens[1:, None], rng.integers(0, V, (T, S)))
            ids = (start[..., None] + offsets) % V
            logits = -np.sort(rng.exponential(2.0, (T, S, k)), axis=-1)  # descending, top entry first
            empty = (rng.random((T, S)) < self.empty_fraction) | ~real[:, None]
            out["table_ids"] = np.where(empty[..., None], -1, ids)
            out["table_logits"] = logits
            level = "token" if self.token_level_ce else "sequence"
            out[CE_FIELDS[level]] = rng.uniform(1, 4, self.layout[CE_FIELDS[level]][0])
        return {name: np.asarray(out[name], dtype) for name, (_, dtype) in self.layout.items()}

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows stacked along a new leading axis: ``{field: [len(indices), ...]}``."""
        rows = [self.row(i) for i in np.asarray(indices)]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}
