"""Declared once: the fields of every store, the layout of a training batch, and the folders of a run.

Stores (written through :mod:`fusejax.store`; a store's ``kind`` says which of these it holds):

  corpus   one row per block of target text          (:data:`CORPUS_FIELDS`, stage ``prepare``)
  topk     one row per block, one source's top-k     (:func:`topk_fields`, stage ``represent``)
  aligned  one row per block, every source aligned   (:func:`aligned_fields`, stage ``align``)

Each store's meta holds its ``format_version`` (:data:`FORMAT_VERSIONS`; a store without one has version 1);
:func:`open_checked` and :func:`check_existing` refuse a store of another version with one line naming the
store and both versions. Compact encodings (version 2 of topk and aligned): token ids in the narrowest
integer type holding the vocabulary (:func:`index_dtype`: uint8, uint16 or int32); logits in
``represent.logits_dtype`` (bfloat16 by default: 16 bits, the float32 exponent range, 8 significant bits;
the aligned store keeps the top-k stores' dtype, so alignment never rounds); the aligned tables without
their empty entries (:func:`pack_tables` / :func:`unpack_tables`). Version 3 of the aligned store holds no
copy of a source that has the target's tokenizer (meta ``copied``: the target's own top-k, as in the paper):
its tables and token CE are its top-k store's rows as they are, read from there by the train reader.

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
from fusejax.store import Field, StoreError, StoreReader, open_store

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


FORMAT_VERSIONS = {CORPUS_KIND: 1, TOPK_KIND: 2, ALIGNED_KIND: 3}  # kind -> the meta["format_version"] written


class StoreFormatError(StoreError):
    """A store of another kind or format version than this fusejax reads and writes."""


def format_meta(kind: str, **meta) -> dict:
    """The meta of a new store of ``kind``: ``meta`` plus its ``format_version``."""
    return {**meta, "format_version": FORMAT_VERSIONS[kind]}


def check_format(store: StoreReader, kind: str) -> None:
    """Refuse (:class:`StoreFormatError`, naming the store and both values) a store of another kind or version."""
    if store.kind != kind:
        raise StoreFormatError(f"store {store.path} holds kind {store.kind!r}, expected a {kind!r} store")
    found, wanted = store.meta.get("format_version", 1), FORMAT_VERSIONS[kind]
    if found != wanted:
        raise StoreFormatError(
            f"store {store.path} has format version {found} of {kind!r} stores; this fusejax reads and writes "
            f"version {wanted}: remove it to rebuild it, or use `fusejax run`, which moves it aside"
        )


def open_checked(path, kind: str, *, verify: bool = False) -> StoreReader:
    """:func:`fusejax.store.open_store` of a store that must be of ``kind`` and its current format version."""
    store = open_store(path, verify=verify)
    check_format(store, kind)
    return store


def check_existing(path, kind: str, **meta) -> None:
    """Before writing a store of ``kind`` at ``path``: refuse one that holds rows of another format version,
    or whose meta has another value at one of the keys of ``meta`` (one line naming the store, the key and both
    values). Nothing there, or a store without rows (which the writer replaces), passes."""
    if not any(Path(path).glob("manifest*.json")):
        return
    store = open_store(path)
    if not len(store):
        return
    check_format(store, kind)
    for key, value in meta.items():
        if store.meta.get(key, "<missing>") != value:
            raise StoreFormatError(
                f"store {store.path} was written with {key} = {store.meta.get(key, '<missing>')!r}; this run "
                f"has {key} = {value!r}: rerun with the same, or remove the store to rebuild it"
            )


def index_dtype(n: int) -> str:
    """The narrowest store dtype holding every integer in ``[0, n)``: uint8, uint16 or int32."""
    for dtype, limit in (("uint8", 1 << 8), ("uint16", 1 << 16), ("int32", 1 << 31)):
        if n <= limit:
            return dtype
    raise ValueError(f"{n} ids do not fit int32")


def topk_fields(k: int, logits_dtype: str, vocab_size: int) -> list[Field]:
    """Fields of a source's top-k store: the block's source ids ``input_ids [T]``, ``topk_ids [T, k]`` (both
    :func:`index_dtype` of ``vocab_size``), ``topk_logits [T, k]`` (``logits_dtype``), ``token_ce [T]`` and
    ``seq_ce`` (CE of each next token / their mean) and ``nonfinite`` (positions with NaN/inf logits)."""
    ids = index_dtype(vocab_size)
    return [
        Field("input_ids", ids, (), ragged=True),
        Field("topk_ids", ids, (k,), ragged=True),
        Field("topk_logits", logits_dtype, (k,), ragged=True),
        Field("token_ce", "float32", (), ragged=True),
        Field("seq_ce", "float32"),
        Field("nonfinite", "int32"),
    ]


# counts of fusejax.align.AlignStats per source and block, in this order (field ``align_counts``)
ALIGN_COUNTS = ("positions", "one_to_one", "matched", "fallback", "empty")


def aligned_fields(num_sources: int, k: int, vocab_size: int, logits_dtype: str, copied: int = 0, *,
                   chat: bool = False) -> list[Field]:
    """Fields of the aligned store for ``num_sources`` sources at top-``k`` (see :func:`fusejax.align.run`), of
    which ``copied`` have the target's tokenizer: their tables and token CE are not stored (meta ``copied``).
    Target ids in :func:`index_dtype` of the target's ``vocab_size``; the tables of the other A = S - copied
    sources packed by :func:`pack_tables` (``table_counts [T, A]``, ``table_ids [N]``, ``table_logits [N]`` in
    ``logits_dtype``) and their ``token_ce [T, A]``; ``seq_ce``, ``byte_ce``, ``align_counts`` of all S;
    ``chat``: also ``scored [T]`` bool, the positions that predict assistant tokens."""
    S, A, ids = num_sources, num_sources - copied, index_dtype(vocab_size)
    return [
        Field("input_ids", ids, (), ragged=True),
        Field("table_counts", index_dtype(k + 1), (A,), ragged=True),
        Field("table_ids", ids, (), ragged=True),
        Field("table_logits", logits_dtype, (), ragged=True),
        Field("seq_ce", "float32", (S,)),
        Field("token_ce", "float32", (A,), ragged=True),
        Field("byte_ce", "float32", (S,)),
        Field("n_bytes", "int32"),
        Field("split", "uint8"),
        Field("skip", "bool"),
        Field("align_counts", "int32", (S, len(ALIGN_COUNTS))),
    ] + ([Field("scored", "bool", (), ragged=True)] if chat else [])


def pack_tables(ids: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
    """A block's tables ``ids [T, S, k]`` (-1 padded, filled entries first in each row) and ``logits [T, S, k]``
    without their empty entries: ``table_counts [T, S]`` (filled entries per row), ``table_ids [N]`` and
    ``table_logits [N]`` (the filled entries in row-major order; N = the sum of the counts)."""
    filled = ids >= 0
    counts = filled.sum(axis=-1)
    if not np.array_equal(filled, np.arange(ids.shape[-1]) < counts[..., None]):
        raise ValueError("table rows must hold their filled entries first (an id >= 0 after a -1)")
    return {"table_counts": counts, "table_ids": ids[filled], "table_logits": logits[filled]}


def unpack_tables(counts: np.ndarray, ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`pack_tables`: ``(ids [T, S, k] int32 -1 padded, logits [T, S, k] float32 0 padded)``."""
    filled = np.arange(k) < np.asarray(counts)[..., None]
    out_ids = np.full(filled.shape, -1, np.int32)
    out_logits = np.zeros(filled.shape, np.float32)
    out_ids[filled], out_logits[filled] = ids, logits
    return out_ids, out_logits


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
    """Where each stage of a run writes, under ``root`` (``run.output_dir``); the ``corpus`` store, the
    ``export`` and the ``merge`` (the merged model of ``fusejax merge``) may lie elsewhere."""

    root: Path
    corpus: Path
    export: Path
    merge: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> RunLayout:
        """The layout of a run folder ``root`` with everything inside it (the default)."""
        root = Path(root)
        return cls(root=root, corpus=root / "corpus", export=root / "export", merge=root / "merge")

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        """The layout of the run configured by ``cfg`` (a :class:`fusejax.config.Config`)."""
        placed = {"corpus": cfg.run.corpus_dir, "export": cfg.export.path, "merge": cfg.merge.path}
        return dataclasses.replace(cls.at(cfg.run.output_dir), **{k: Path(p) for k, p in placed.items() if p})

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

    def pair(self, source: str) -> Path:
        """The run folder of the fusion of source ``source`` alone into the target (``run.pairwise``)."""
        return self.root / "pairs" / source

    @property
    def stale(self) -> Path:
        """Where ``fusejax run`` moves a stage folder whose inputs changed."""
        return self.root / "stale"


# folder names inside a training folder (``RunLayout.train`` or any Trainer output folder)
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
SUMMARY = "summary.json"
