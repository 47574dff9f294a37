"""Training and evaluation rows, as fixed-shape padded numpy arrays (host only), and their order.

One block is one row of :func:`fusejax.schema.row_layout`, right-padded to ``seq_len`` (blocks hold at most
``corpus.block_size`` target tokens plus EOS, so ``seq_len`` must be at least that). Blocks are not packed
together: the aligned tables are per block and a block never attends to another.
:class:`AlignedBatches` reads the aligned store (fusion rows), :class:`AlignedOnTheFly` builds the same rows
from the top-k stores while training (``align.on_the_fly``); :class:`TokenBatches` tokenizes a corpus store
(plain causal-LM rows, no tables).

Data order (:func:`stream_rows`) is a pure function of ``(seed, position)``: the rows are read in
epoch-wise permutations seeded by ``(seed, epoch)``, and a step reads the next ``batch_size`` positions of
that endless stream (at most ``MAX_EPOCHS_PER_BATCH`` times the rows, refused before anything is allocated).
A checkpoint stores the position, so a resumed run reads exactly the rows an uninterrupted one would (even
with another batch size).

This module never imports JAX.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from fusejax import chat
from fusejax.align import BlockAligner, block_tables
from fusejax.schema import (ALIGNED_KIND, CE_FIELDS, CORPUS_KIND, IGNORE_LABEL, SPLITS, TOPK_KIND, RunLayout,
                            empty_rows, open_checked, row_layout)
from fusejax.store import StoreError
from fusejax.tokenizer import encode_block


class Batches(Protocol):
    """Random-access rows of training data: ``rows(indices) -> {field: np.ndarray [len(indices), ...]}`` with
    the fields of :func:`fusejax.schema.row_layout`. Data may also have ``prefetch(indices)``, which starts
    building rows that a later ``rows`` call reads (the trainer calls it with the next batch's rows)."""

    num_rows: int

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


MAX_EPOCHS_PER_BATCH = 16  # a batch reads every row at most this many times


def bucket(n: int, minimum: int = 1) -> int:
    """A padded size for ``n`` (a length or a batch): the power of two >= n, at least ``minimum``. A few
    fixed shapes, so that a jitted function over padded arrays compiles a few times, not once per size."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def check_batch_size(batch_size: int, num_rows: int) -> None:
    """Refuse (ValueError naming ``train.batch_size``) a batch that no data holds: none without rows, none of
    more than ``MAX_EPOCHS_PER_BATCH`` times the ``num_rows`` training rows."""
    if num_rows < 1:
        raise ValueError(f"training data has {num_rows} rows; need at least one")
    if batch_size > MAX_EPOCHS_PER_BATCH * num_rows:
        raise ValueError(f"train.batch_size={batch_size}: more than {MAX_EPOCHS_PER_BATCH} x the {num_rows} "
                         f"training rows (a batch would read every row {batch_size // num_rows} times)")


def stream_rows(seed: int, start: int, count: int, num_rows: int) -> np.ndarray:
    """Row indices [count] int64 at positions ``start .. start+count`` of the endless row stream: epoch e
    is the permutation of ``range(num_rows)`` drawn with ``np.random.default_rng([seed, e])``. A ``count``
    beyond :func:`check_batch_size` is refused before anything is allocated."""
    check_batch_size(count, num_rows)
    flat = start + np.arange(count, dtype=np.int64)
    epochs, positions = np.divmod(flat, num_rows)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        sel = epochs == epoch
        out[sel] = perm[positions[sel]]
    return out


class AlignedBatches:
    """Rows of one split of an aligned store (``kind == "aligned"``), skipping blocks flagged ``skip``.

    ``ce_level``: "sequence" (``source_ce [n,S]``) or "token" (``source_ce_token [n,T,S]``); ``ce_unit``:
    "token" (mean CE per source token) or "byte" (CE per UTF-8 byte; sequence level only). ``sources``: the
    source names, in table order. The tables and token CE of the sources in the store's meta ``copied`` (the
    target's tokenizer) are read from their top-k stores, ``represent/<name>`` in the run folder the store was
    written in (the folder holding ``path`` once links are resolved: a study variant links a shared store).
    """

    def __init__(self, path, *, seq_len: int, split: str = "train", ce_level: str = "sequence", ce_unit: str = "token"):
        self.store = open_checked(path, ALIGNED_KIND)
        keep = [(np.asarray(shard.column("split")) == SPLITS.index(split)) & ~np.asarray(shard.column("skip"), bool)
                for shard in self.store.shards]
        sources = self.store.meta["sources"]
        layout = RunLayout.at(Path(path).resolve().parent)  # the run the store was written in (path may be a link)
        copied = {sources.index(name): open_checked(layout.topk(name), TOPK_KIND)
                  for name in self.store.meta.get("copied", [])}
        self._select(path, np.concatenate(keep) if keep else np.zeros(0, bool), sources, int(self.store.meta["k"]),
                     copied, seq_len=seq_len, split=split, ce_level=ce_level, ce_unit=ce_unit)

    def _select(self, where, keep: np.ndarray, sources, k: int, copied: dict, *, seq_len: int, split: str,
                ce_level: str, ce_unit: str) -> None:
        """Serve the blocks at the positions where ``keep [blocks]`` bool is set (error naming ``where`` if none);
        ``copied``: {source position: its top-k store} of the sources whose rows are their top-k rows."""
        if ce_level == "token" and ce_unit == "byte":
            raise ValueError("train.ce_unit='byte' needs train.ce_level='sequence' (per-byte CE is per block)")
        self.seq_len, self.ce_level, self.ce_unit = seq_len, ce_level, ce_unit
        self.positions = np.flatnonzero(keep)
        self.num_rows = len(self.positions)
        if self.num_rows == 0:
            raise ValueError(f"{where}: no {split!r} blocks without a skip flag")
        self.sources = list(sources)
        self.num_sources, self.k, self.copied = len(self.sources), k, copied
        self.layout = row_layout(seq_len, self.num_sources, k, ce_level)

    def _blocks(self, positions: np.ndarray) -> list[dict]:
        """The aligned-store rows at block ``positions``."""
        return [self.store.row(int(p)) for p in positions]

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        T = self.seq_len
        out = empty_rows(len(indices), self.layout)
        ce = out[CE_FIELDS[self.ce_level]]
        scored = np.ones_like(out["attention_mask"])
        for b, row in enumerate(self._blocks(self.positions[np.asarray(indices, np.int64)])):
            m = len(row["input_ids"])
            if m > T:
                raise ValueError(f"block {row['id']} has {m} target tokens, more than train.seq_len={T}")
            out["input_ids"][b, :m] = row["input_ids"]
            out["attention_mask"][b, :m] = 1
            out["table_ids"][b, :m], out["table_logits"][b, :m], source_ce = block_tables(
                row, self.sources, self.copied, self.k, ce_level=self.ce_level, ce_unit=self.ce_unit)
            out["n_bytes"][b] = row["n_bytes"]
            if "scored" in row:  # a chat block: only the assistant's tokens are scored
                scored[b, :m] = row["scored"]
            if self.ce_level == "token":
                ce[b, :m] = source_ce
            else:
                ce[b] = source_ce
        out.update(next_token_targets(out["input_ids"], out["attention_mask"], scored))
        return out


class AlignedOnTheFly(AlignedBatches):
    """The rows :class:`AlignedBatches` reads from the aligned store, aligned as they are read from the top-k
    stores and vocabulary maps of the run configured by ``cfg`` (``align.on_the_fly``): equal arrays, and no
    aligned store. Blocks are aligned by :class:`fusejax.align.BlockAligner` (a missing top-k store or vocab
    map: one line naming it) in ``align.workers`` processes (None: one per host core; 0: in this process);
    :meth:`prefetch` starts aligning the rows of a later :meth:`rows` call. ``seq_len``, ``ce_level`` and
    ``ce_unit`` come from ``cfg.train``; call :meth:`close` to stop the workers.
    """

    def __init__(self, cfg, *, split: str = "train"):
        self.cfg, self.aligner = cfg, BlockAligner(cfg, maps="require", verify=False)
        corpus = self.aligner.corpus
        codes = [np.asarray(shard.column("split")) for shard in corpus.shards]
        keep = np.concatenate(codes) == SPLITS.index(split) if codes else np.zeros(0, bool)
        for name, store in zip(self.aligner.names, self.aligner.stores):  # blocks with non-finite logits
            missing = ~np.isin(corpus.ids, store.ids)
            if missing.any():
                raise StoreError(f"{store.path}: block {corpus.ids[missing][0]} of the corpus is missing "
                                 f"(source {name!r})")
            flags = [np.asarray(shard.column("nonfinite")) for shard in store.shards]
            keep &= ~np.isin(corpus.ids, store.ids[np.concatenate(flags) > 0])
        tc = cfg.train
        copied = {n: self.aligner.stores[n] for n in self.aligner.copied}
        self._select(corpus.path, keep, self.aligner.names, self.aligner.k, copied, seq_len=tc.seq_len, split=split,
                     ce_level=tc.ce_level, ce_unit=tc.ce_unit)
        self.workers = cfg.align.workers
        if self.workers is None:  # the cores this process may use (macOS has no affinity: all of them)
            self.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[int, Future] = {}  # block position -> its row being aligned

    def _submit(self, position: int) -> Future:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.cfg,))
        return self._pool.submit(_aligned_row, position)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start aligning the rows ``indices`` (a no-op without worker processes)."""
        if self.workers:
            for p in self.positions[np.asarray(indices, np.int64)].tolist():
                if p not in self._pending:
                    self._pending[p] = self._submit(p)

    def _blocks(self, positions: np.ndarray) -> list[dict]:
        if not self.workers:
            return [self.aligner.row(p) for p in positions.tolist()]
        futures = [self._pending.pop(p, None) or self._submit(p) for p in positions.tolist()]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the worker processes (rows prefetched and not read are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._pending.clear()


_ALIGNER = None  # a worker process's BlockAligner


def _start_worker(cfg) -> None:
    global _ALIGNER
    _ALIGNER = BlockAligner(cfg, maps="require", verify=False)


def _aligned_row(position: int) -> dict:
    return _ALIGNER.row(position)


def next_token_targets(input_ids: np.ndarray, attention_mask: np.ndarray, scored: np.ndarray | None = None
                       ) -> dict[str, np.ndarray]:
    """``labels [n,T]`` (the next token, -100 where there is none) and ``loss_mask [n,T]`` (1 where scored);
    ``scored [n,T]``: also 0 where it is 0 (a chat block's positions that predict no assistant token)."""
    loss_mask = np.zeros_like(attention_mask)
    loss_mask[:, :-1] = attention_mask[:, :-1] & attention_mask[:, 1:]
    if scored is not None:
        loss_mask &= np.asarray(scored, loss_mask.dtype)
    labels = np.full_like(input_ids, IGNORE_LABEL)
    labels[:, :-1] = np.where(loss_mask[:, :-1] == 1, input_ids[:, 1:], IGNORE_LABEL)
    return {"labels": labels, "loss_mask": loss_mask}


class TokenBatches:
    """Plain causal-LM rows (no fusion tables) of one split of a corpus store, tokenized with ``tokenizer``.

    Used to pre-train models from scratch, for CLM-only baselines and for held-out evaluation. ``tokenizer``
    is a transformers tokenizer; each block's ids get its EOS appended (like the top-k stage) and must fit in
    ``seq_len`` (no truncation, so bits per byte stay exact). A chat corpus's blocks are rendered with the
    tokenizer's chat template (``chat_template``: a Jinja file for one without; :func:`fusejax.chat.encode`)
    and only the positions predicting assistant tokens are scored.
    """

    def __init__(self, corpus_path, tokenizer, *, seq_len: int, split: str = "train",
                 chat_template: str | None = None):
        self.store = open_checked(corpus_path, CORPUS_KIND)
        self.chat = chat.is_chat(self.store.meta)
        if self.chat:
            tokenizer = chat.chat_tokenizer(tokenizer, chat_template, "target")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        codes = [np.asarray(shard.column("split")) for shard in self.store.shards]
        split_codes = np.concatenate(codes) if codes else np.zeros(0, np.int64)
        self.positions = np.flatnonzero(split_codes == SPLITS.index(split))
        self.num_rows = len(self.positions)
        if self.num_rows == 0:
            raise ValueError(f"{corpus_path}: no {split!r} blocks")
        self.layout = row_layout(seq_len)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        T = self.seq_len
        out = empty_rows(len(indices), self.layout)
        ids, mask = out["input_ids"], out["attention_mask"]
        scored = np.ones_like(mask)
        for b, i in enumerate(indices):
            row = self.store.row(int(self.positions[i]))
            if self.chat:
                seq, spans = chat.encode(self.tokenizer, chat.block_messages(row["text"]), f"block {row['id']}")
            else:
                seq = encode_block(self.tokenizer, row["text"].decode("utf-8"))
            if len(seq) > T:
                raise ValueError(f"block {row['id']} has {len(seq)} tokens with this tokenizer, more than seq_len={T}")
            ids[b, : len(seq)], mask[b, : len(seq)] = seq, 1
            if self.chat:
                scored[b, : len(seq)] = chat.scored_positions(len(seq), spans)
            out["n_bytes"][b] = row["n_bytes"]
        out.update(next_token_targets(ids, mask, scored))
        return out
