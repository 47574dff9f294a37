"""Training and evaluation rows from the aligned store, as fixed-shape padded numpy arrays (host only).

One block is one row, right-padded to ``seq_len`` (blocks hold at most ``corpus.block_size`` target tokens
plus EOS, so ``seq_len`` must be at least that). Blocks are not packed together: the aligned tables are per
block and a block never attends to another. Row fields (the trainer's batch fields, see ``train.BATCH_AXES``):

  input_ids, attention_mask         [n, T] int32    the target's ids of the block text (+ EOS), 1 = token
  labels, loss_mask                 [n, T] int32    labels[t] = input_ids[t + 1]; loss_mask[t] = both real
  table_ids                         [n, T, S, k] int32    the aligned top-k of each source (target vocab, -1 pad)
  table_logits                      [n, T, S, k] float32  their logits (0 where the id is -1)
  source_ce  or  source_ce_token    [n, S] / [n, T, S] float32  the CE that fusion compares across sources
  n_bytes                           [n] int32       UTF-8 bytes of the block text (bits per byte)

This module never imports JAX.
"""

from __future__ import annotations

import numpy as np

from fusejax.store import open_store
from fusejax.tokenizer import encode_block

SPLITS = ("train", "heldout")  # the corpus store's split codes


class AlignedBatches:
    """Rows of one split of an aligned store (``kind == "aligned"``), skipping blocks flagged ``skip``.

    ``ce_level``: "sequence" (``source_ce [n,S]``) or "token" (``source_ce_token [n,T,S]``); ``ce_unit``:
    "token" (mean CE per source token) or "byte" (CE per UTF-8 byte; sequence level only).
    """

    def __init__(self, path, *, seq_len: int, split: str = "train", ce_level: str = "sequence", ce_unit: str = "token"):
        self.store = open_store(path)
        if self.store.kind != "aligned":
            raise ValueError(f"{path}: a store of kind {self.store.kind!r}, expected an aligned store")
        if ce_level == "token" and ce_unit == "byte":
            raise ValueError("train.ce_unit='byte' needs train.ce_level='sequence' (per-byte CE is per block)")
        self.seq_len, self.ce_level, self.ce_unit = seq_len, ce_level, ce_unit
        keep = []
        for shard in self.store.shards:
            split_ok = np.asarray(shard.column("split")) == SPLITS.index(split)
            keep.append(split_ok & ~np.asarray(shard.column("skip"), bool))
        self.positions = np.flatnonzero(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
        self.num_rows = len(self.positions)
        if self.num_rows == 0:
            raise ValueError(f"{path}: no {split!r} blocks without a skip flag")
        self.num_sources = len(self.store.meta["sources"])
        self.k = int(self.store.meta["k"])

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        n, T, S, k = len(indices), self.seq_len, self.num_sources, self.k
        out = {
            "input_ids": np.zeros((n, T), np.int32),
            "attention_mask": np.zeros((n, T), np.int32),
            "table_ids": np.full((n, T, S, k), -1, np.int32),
            "table_logits": np.zeros((n, T, S, k), np.float32),
            "n_bytes": np.zeros(n, np.int32),
        }
        ce = np.zeros((n, T, S) if self.ce_level == "token" else (n, S), np.float32)
        for b, i in enumerate(indices):
            row = self.store.row(int(self.positions[i]))
            m = len(row["input_ids"])
            if m > T:
                raise ValueError(f"block {row['id']} has {m} target tokens, more than train.seq_len={T}")
            out["input_ids"][b, :m] = row["input_ids"]
            out["attention_mask"][b, :m] = 1
            out["table_ids"][b, :m] = row["table_ids"]
            out["table_logits"][b, :m] = np.where(row["table_ids"] >= 0, row["table_logits"], 0.0)
            out["n_bytes"][b] = row["n_bytes"]
            if self.ce_level == "token":
                ce[b, :m] = row["token_ce"]
            else:
                ce[b] = row["byte_ce"] if self.ce_unit == "byte" else row["seq_ce"]
        out["source_ce_token" if self.ce_level == "token" else "source_ce"] = ce
        out.update(next_token_targets(out["input_ids"], out["attention_mask"]))
        return out


def next_token_targets(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """``labels [n,T]`` (the next token, -100 where there is none) and ``loss_mask [n,T]`` (1 where scored)."""
    loss_mask = np.zeros_like(attention_mask)
    loss_mask[:, :-1] = attention_mask[:, :-1] & attention_mask[:, 1:]
    labels = np.full_like(input_ids, -100)
    labels[:, :-1] = np.where(loss_mask[:, :-1] == 1, input_ids[:, 1:], -100)
    return {"labels": labels, "loss_mask": loss_mask}


class TokenBatches:
    """Plain causal-LM rows (no fusion tables) of one split of a corpus store, tokenized with ``tokenizer``.

    Used to pre-train models from scratch, for CLM-only baselines and for held-out evaluation. ``tokenizer``
    is a transformers tokenizer; each block's ids get its EOS appended (like the top-k stage) and must fit in
    ``seq_len`` (no truncation, so bits per byte stay exact). Rows carry empty one-source tables (``table_ids`` all -1), so the fusion term
    is absent and the trainer's step is the same compiled function shape as a fused one with S=1, k=1.
    """

    def __init__(self, corpus_path, tokenizer, *, seq_len: int, split: str = "train"):
        self.store = open_store(corpus_path)
        if self.store.kind != "corpus":
            raise ValueError(f"{corpus_path}: a store of kind {self.store.kind!r}, expected a corpus store")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        codes = [np.asarray(shard.column("split")) for shard in self.store.shards]
        self.positions = np.flatnonzero(np.concatenate(codes) == SPLITS.index(split)) if codes else np.zeros(0, np.int64)
        self.num_rows = len(self.positions)
        if self.num_rows == 0:
            raise ValueError(f"{corpus_path}: no {split!r} blocks")

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        n, T = len(indices), self.seq_len
        ids = np.zeros((n, T), np.int32)
        mask = np.zeros((n, T), np.int32)
        n_bytes = np.zeros(n, np.int32)
        for b, i in enumerate(indices):
            row = self.store.row(int(self.positions[i]))
            seq = encode_block(self.tokenizer, row["text"].decode("utf-8"))
            if len(seq) > T:
                raise ValueError(f"block {row['id']} has {len(seq)} tokens with this tokenizer, more than seq_len={T}")
            ids[b, : len(seq)], mask[b, : len(seq)] = seq, 1
            n_bytes[b] = row["n_bytes"]
        return {
            "input_ids": ids, "attention_mask": mask, "n_bytes": n_bytes,
            "table_ids": np.full((n, T, 1, 1), -1, np.int32), "table_logits": np.zeros((n, T, 1, 1), np.float32),
            "source_ce": np.zeros((n, 1), np.float32), **next_token_targets(ids, mask),
        }
