"""Declared once: the fields of every store, the layout of a training batch, and the folders of a run.

Stores (written through :mod:`fusejax.store`; a store's ``kind`` says which of these it holds):

  corpus   one row per block of target text          (:data:`CORPUS_FIELDS`, stage ``prepare``)
  topk     one row per block, one source's top-k     (:func:`topk_fields`, stage ``represent``)
  aligned  one row per block, every source aligned   (:func:`aligned_fields`, stage ``align``)

Training and evaluation rows (:func:`row_layout`; built by :mod:`fusejax.data`, consumed by the train step,
which adds a leading micro-batch axis; the logical axes name how :mod:`fusejax.sharding` lays them out):

  input_ids, attention_mask   [T] int32        the target's ids of a block (+ EOS), 1 = token
  labels, loss_mask           [T] int32        labels[t] = input_ids[t + 1] (-100: none); loss_mask: scored
  table_ids                   [T, S, k] int32  each source's top-k aligned to the target vocabulary (-1: empty)
  table_logits                [T, S, k] float32  their logits (0 where the id is -1)
  source_ce                   [S] float32      the CE that fusion compares across sources (``ce_level: sequence``)
  source_ce_token             [T, S] float32   the same per target position (``ce_level: token``)
  n_bytes                     [] int32         UTF-8 bytes of the block text (bits per byte; not a step input)

Rows without the table fields (``num_sources=0``) are plain causal-LM rows: the step treats them as rows
whose every table entry is empty, so the fusion term vanishes (the one way to train CLM-only).

Never imports JAX.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fusejax.config import Config
from fusejax.store import Field

# ------------------------------------------------------------------------------------------------ stores

SPLITS = ("train", "heldout")  # the corpus store's ``split`` codes: index in this tuple

CORPUS_KIND, TOPK_KIND, ALIGNED_KIND = "corpus", "topk", "aligned"

CORPUS_FIELDS = (
    Field("doc_id", "str"),  # "<input file>:<document index>"
    Field("span", "int64", (2,)),  # character span of the block in its document
    Field("text", "bytes"),  # UTF-8 text of the block
    Field("n_tokens", "int32"),  # target tokens of the block (without EOS)
    Field("n_bytes", "int64"),
    Field("split", "uint8"),  # index in SPLITS
)


def topk_fields(k: int, logits_dtype: str) -> list[Field]:
    """Fields of a source's top-k store: the block's source ids ``input_ids [T]``, ``topk_ids [T, k]``,
    ``topk_logits [T, k]`` (``logits_dtype``), ``token_ce [T]`` and ``seq_ce`` (CE of each next token / their
    mean) and ``nonfinite`` (positions with NaN/inf logits)."""
    return [
        Field("input_ids", "int32", (), ragged=True),
        Field("topk_ids", "int32", (k,), ragged=True),
        Field("topk_logits", logits_dtype, (k,), ragged=True),
        Field("token_ce", "float32", (), ragged=True),
        Field("seq_ce", "float32"),
        Field("nonfinite", "int32"),
    ]


# counts of fusejax.align.AlignStats per source and block, in this order (field ``align_counts``)
ALIGN_COUNTS = ("positions", "one_to_one", "matched", "fallback", "empty")


def aligned_fields(num_sources: int, k: int) -> list[Field]:
    """Fields of the aligned store for ``num_sources`` sources at top-``k`` (see :func:`fusejax.align.run`)."""
    S = num_sources
    return [
        Field("input_ids", "int32", (), ragged=True),
        Field("table_ids", "int32", (S, k), ragged=True),
        Field("table_logits", "float32", (S, k), ragged=True),
        Field("seq_ce", "float32", (S,)),
        Field("token_ce", "float32", (S,), ragged=True),
        Field("byte_ce", "float32", (S,)),
        Field("n_bytes", "int32"),
        Field("split", "uint8"),
        Field("skip", "bool"),
        Field("align_counts", "int32", (S, len(ALIGN_COUNTS))),
    ]


# ---------------------------------------------------------------------------------------- training rows

# field -> logical axes (after the batch axis: one row) for every field the train step reads
STEP_AXES = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "labels": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "table_ids": ("batch", "length", "sources", "topk"),
    "table_logits": ("batch", "length", "sources", "topk"),
    "source_ce": ("batch", "sources"),
    "source_ce_token": ("batch", "length", "sources"),
}
TEXT_FIELDS = ("input_ids", "attention_mask", "labels", "loss_mask")
TABLE_FIELDS = ("table_ids", "table_logits")
CE_FIELDS = {"sequence": "source_ce", "token": "source_ce_token"}  # train.ce_level -> its field
IGNORE_LABEL = -100  # labels where there is no next token


def row_layout(seq_len: int, num_sources: int = 0, k: int = 0, ce_level: str = "sequence",
               *, n_bytes: bool = True) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{field: (shape of one row, dtype)}`` of training rows of ``seq_len`` tokens; with ``num_sources`` > 0
    also the top-``k`` tables and the sources' CE (its field by ``ce_level``); ``n_bytes``: include it."""
    T, S = seq_len, num_sources
    out = {name: ((T,), np.dtype(np.int32)) for name in TEXT_FIELDS}
    if S:
        if ce_level not in CE_FIELDS:
            raise ValueError(f"ce_level={ce_level!r}: expected one of {tuple(CE_FIELDS)}")
        out["table_ids"] = ((T, S, k), np.dtype(np.int32))
        out["table_logits"] = ((T, S, k), np.dtype(np.float32))
        out[CE_FIELDS[ce_level]] = (((T, S) if ce_level == "token" else (S,)), np.dtype(np.float32))
    if n_bytes:
        out["n_bytes"] = ((), np.dtype(np.int32))
    return out


def empty_rows(n: int, layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """``n`` rows of ``layout`` holding padding: ids, masks, logits and CE 0; labels and table ids empty."""
    fill = {"labels": IGNORE_LABEL, "table_ids": -1}
    return {name: np.full((n, *shape), fill.get(name, 0), dtype) for name, (shape, dtype) in layout.items()}


# ------------------------------------------------------------------------------------------- run folders


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where each stage of a run writes, under ``root`` (``run.output_dir``); ``export`` may lie elsewhere."""

    root: Path
    export: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> RunLayout:
        """The layout of a run folder ``root`` with the export inside it (the default)."""
        return cls(root=Path(root), export=Path(root) / "export")

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        """The layout of the run configured by ``cfg`` (a :class:`fusejax.config.Config`)."""
        layout = cls.at(cfg.run.output_dir)
        return dataclasses.replace(layout, export=Path(cfg.export.path)) if cfg.export.path else layout

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def represent(self) -> Path:
        return self.root / "represent"

    def topk(self, source: str) -> Path:
        """The top-k store of source ``source``."""
        return self.represent / source

    @property
    def vocab_maps(self) -> Path:
        return self.root / "vocab_maps"

    def vocab_map(self, source: str) -> Path:
        """The vocabulary map of source ``source`` onto the target's (an .npz file)."""
        return self.vocab_maps / f"{source}.npz"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def aligned_summary(self) -> Path:
        return self.root / "aligned_summary.json"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def stale(self) -> Path:
        """Where ``fusejax run`` moves a stage folder whose inputs changed."""
        return self.root / "stale"


# folder names inside a training folder (``RunLayout.train`` or any Trainer output folder)
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
SUMMARY = "summary.json"
