"""Token alignment: a source model's per-position top-k moved onto the target's positions and vocabulary
(host side: numpy + numba, never JAX).

In: a source and a target tokenizer (anything :meth:`fusejax.vocab.Vocab.of` takes), the ids of one block in
both, the source's top-k ids and logits at each of its positions, optionally a vocabulary map
(:mod:`fusejax.vocab_maps`). Out: the top-k rows at the target's positions, in target ids
(:func:`align_topk`, with :class:`AlignStats`), from the DTW pairing of positions
(:func:`fusejax.dtw.align_tokens`); as the ``fusejax align`` stage (:func:`run`), the aligned store of a run.

The rules compare the strings of each ``mode`` (:mod:`fusejax.vocab`):

``mode="reference"`` reproduces the FuseLLM reference code exactly, quirks included:
  * match test at a 1-to-1 position: marker-replaced source token == target token (``soft``: or the vocab map
    sends it there), with the reference's i = 0 special case for byte-level sources;
  * fallback (no 1-to-1 partner, or no match): one entry, the *current* target token, logit 1.0.

``mode="default"`` keeps the algorithm and fixes the quirks (each can be measured by switching the mode):
  * match test: the same spelled bytes (``soft``: or the vocab map sends the source id to the target id); at
    i = 0 one leading space is ignored on both sides (SentencePiece's dummy prefix);
  * fallback one-hot on the **next** target token (the label the position predicts); the last position has no
    label inside the block, so it uses ``next_target_id`` when given, else stays empty;
  * a matching position whose projection resolves nothing falls back as well (no empty rows).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fusejax import chat, vocab_maps
from fusejax.config import Config, save_resolved
from fusejax.distributed import process_slice
from fusejax.dtw import align_tokens
from fusejax.files import write_json
from fusejax.schema import (ALIGN_COUNTS, ALIGNED_KIND, CORPUS_KIND, TOPK_KIND, RunLayout, aligned_fields,
                            check_existing, format_meta, open_checked, pack_tables, unpack_tables)
from fusejax.store import StoreError, StoreWriter, open_store
from fusejax.vocab import Vocab, check_mode

FALLBACKS = ("next_token", "reference")


@dataclasses.dataclass
class AlignStats:
    """Counts over target positions of one or more align_topk calls (add them up with ``+``)."""

    positions: int = 0
    one_to_one: int = 0  # positions with exactly one source partner
    matched: int = 0  # 1-to-1 positions whose tokens match: the source distribution is projected
    fallback: int = 0  # positions given the one-hot fallback
    empty: int = 0  # positions left with no entry

    def __add__(self, other: AlignStats) -> AlignStats:
        return AlignStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def rates(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {
            "one_to_one_rate": self.one_to_one / n,
            "match_rate": self.matched / n,
            "fallback_rate": self.fallback / n,
            "empty_rate": self.empty / n,
        }


def align_topk(
    source_tokenizer,
    source_ids,
    source_topk_ids,
    source_topk_logits,
    target_tokenizer,
    target_ids,
    vocab_map=None,
    fallback: str | None = None,
    mode: str = "default",
    next_target_id: int | None = None,
    return_stats: bool = False,
):
    """Project a source model's per-position top-k onto the target's positions and vocabulary.

    source_ids [S] int; source_topk_ids / source_topk_logits [S, k]; target_ids [T] int.
    ``vocab_map=None``: ``hard`` (a source id resolves only to the target token reading/spelling the same);
    an int array [|V_source|] (source id -> target id, -1 unmapped): ``soft``.
    ``fallback``: ``"reference"`` (one-hot on the current target token) or ``"next_token"`` (one-hot on the
    next one, ``next_target_id`` at the last position); default: the mode's own rule.
    Returns (ids [T, k] int32 padded with -1, logits [T, k] float32 padded with 0) and, with
    ``return_stats``, an :class:`AlignStats`.
    """
    check_mode(mode)
    fallback = fallback or ("reference" if mode == "reference" else "next_token")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {FALLBACKS}")
    s, t = Vocab.of(source_tokenizer), Vocab.of(target_tokenizer)
    src, tgt = s.check_ids(source_ids, "source_ids"), t.check_ids(target_ids, "target_ids")
    top_ids = np.asarray(source_topk_ids)
    top_logits = np.asarray(source_topk_logits, np.float32)
    if top_ids.ndim != 2 or top_ids.shape[0] != src.size or top_logits.shape != top_ids.shape:
        raise ValueError(
            f"source_topk_ids {top_ids.shape} / source_topk_logits {top_logits.shape}: expected [{src.size}, k]"
        )
    if not np.issubdtype(top_ids.dtype, np.integer) or (top_ids < 0).any():
        raise ValueError(f"source_topk_ids: expected source token ids (integers >= 0), got dtype {top_ids.dtype} "
                         f"and minimum {top_ids.min() if top_ids.size else None}")
    if vocab_map is not None:
        vocab_map = np.asarray(vocab_map)
        if vocab_map.shape != (s.size,):
            raise ValueError(f"vocab_map: expected shape ({s.size},) (the source vocabulary), got {vocab_map.shape}")
        if not np.issubdtype(vocab_map.dtype, np.integer) or ((vocab_map < -1) | (vocab_map >= t.size)).any():
            raise ValueError(f"vocab_map: expected target ids in [0, {t.size}) or -1 (unmapped), got dtype "
                             f"{vocab_map.dtype}, values {vocab_map.min()} .. {vocab_map.max()}")
    if next_target_id is not None:
        t.check_ids([next_target_id], "next_target_id")

    partner = align_tokens(s, src, t, tgt, mode=mode)
    out_ids, out_logits, stats = _project(s, t, src, tgt, top_ids, top_logits, partner, vocab_map, fallback, mode,
                                          next_target_id)
    return (out_ids, out_logits, stats) if return_stats else (out_ids, out_logits)


def _project(s: Vocab, t: Vocab, src, tgt, top_ids, top_logits, partner, vocab_map, fallback, mode, next_target_id):
    """align_topk's rows given the alignment ``partner`` (checked inputs); returns (ids, logits, stats)."""
    # projection of a source id onto a target id (-1: does not resolve)
    project = vocab_maps.exact_ids(s, t, mode) if vocab_map is None else vocab_map.astype(np.int64)
    if mode == "reference":
        src_keys = [s.tokens[i].replace(s.marker, t.marker) for i in src.tolist()]
        tgt_keys = [t.tokens[i] for i in tgt.tolist()]
    else:
        src_keys = [s.texts[i] for i in src.tolist()]
        tgt_keys = [t.texts[i] for i in tgt.tolist()]

    T, k = tgt.size, top_ids.shape[1]
    rows, row_logits, filled = _project_rows(project, top_ids, top_logits)
    out_ids = np.full((T, k), -1, np.int32)
    out_logits = np.zeros((T, k), np.float32)
    stats = AlignStats(positions=T)
    src_ids, tgt_ids, copied = src.tolist(), tgt.tolist(), []
    for i, j in enumerate(partner.tolist()):
        if j >= 0:
            stats.one_to_one += 1
            if _matches(s, t, mode, i, src_keys[j], tgt_keys[i], src_ids[j], tgt_ids[i], vocab_map):
                stats.matched += 1
                if filled[j]:
                    copied.append(i)
                    continue
                if mode == "reference":
                    stats.empty += 1
                    continue
        stats.fallback += 1
        if fallback == "reference":
            out_ids[i, 0] = t.vocab[tgt_keys[i]] if mode == "reference" else tgt_ids[i]
        elif i + 1 < T or next_target_id is not None:
            out_ids[i, 0] = tgt_ids[i + 1] if i + 1 < T else next_target_id
        else:
            stats.empty += 1
            continue
        out_logits[i, 0] = 1.0
    out_ids[copied], out_logits[copied] = rows[partner[copied]], row_logits[partner[copied]]
    return out_ids, out_logits, stats


def _project_rows(project: np.ndarray, top_ids: np.ndarray, top_logits: np.ndarray):
    """Each source position's top-k projected onto target ids: ``project [V_s]`` (-1: does not resolve; ids
    past its end, the model's padding, do not resolve either), ``top_ids`` / ``top_logits [n, k]``. Keeps the
    first entry of each target id, in rank order, filled entries first; returns (ids [n, k] int32 -1 padded,
    logits [n, k] float32 0 padded, filled entries [n])."""
    k = top_ids.shape[1]
    inside = top_ids < project.size
    ids = np.where(inside, project[np.where(inside, top_ids, 0)], -1)
    repeated = ((ids[:, :, None] == ids[:, None, :]) & np.tri(k, k, -1, bool)).any(axis=-1)  # an earlier rank has it
    keep = (ids >= 0) & ~repeated
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in rank order
    ids = np.take_along_axis(np.where(keep, ids, -1), order, axis=1).astype(np.int32)
    logits = np.take_along_axis(np.where(keep, top_logits, 0), order, axis=1).astype(np.float32)
    return ids, logits, keep.sum(axis=1)


def _matches(s: Vocab, t: Vocab, mode: str, i: int, src_key, tgt_key, src_id: int, tgt_id: int, vocab_map) -> bool:
    """The match test at a 1-to-1 target position i (keys: see align_topk)."""
    if mode == "reference":
        if i == 0 and s.byte_level and tgt_key.startswith(t.marker) and not src_key.startswith(t.marker):
            src_key = t.marker + src_key  # the reference's special case for byte-level sources
            if src_key == tgt_key:
                return True
            if vocab_map is None:
                return False
            # the reference looks the prefixed string up in a map keyed by marker-replaced source tokens
            sid = _replaced_index(s, t).get(src_key)
            return sid is not None and 0 <= vocab_map[sid] < t.size and t.tokens[vocab_map[sid]] == tgt_key
        if src_key == tgt_key:
            return True
        return vocab_map is not None and 0 <= vocab_map[src_id] < t.size and t.tokens[vocab_map[src_id]] == tgt_key
    if i == 0:
        src_key, tgt_key = src_key.removeprefix(b" "), tgt_key.removeprefix(b" ")
    return src_key == tgt_key or (vocab_map is not None and vocab_map[src_id] == tgt_id)


def _replaced_index(s: Vocab, t: Vocab) -> dict[str, int]:
    """marker-replaced source token string -> source id (first id), for the reference's i = 0 lookup."""
    key = ("replaced", t.marker)
    if key not in s.tables:
        index = {}
        for i, tok in enumerate(s.tokens):
            index.setdefault(tok.replace(s.marker, t.marker), i)
        s.tables[key] = index
    return s.tables[key]


# ------------------------------------------------------------------------------------------------- the stage


def _check_meta(store, key: str, found, expected, what: str) -> None:
    if found != expected:
        raise ValueError(
            f"store {store.path}: meta key {key!r} is {found!r}, expected {expected!r} ({what}); "
            f"rebuild that store or fix the config"
        )


def _aligned_summary(path: Path, names: list[str]) -> dict:
    """Per-source rates over every block in the aligned store at ``path``."""
    store = open_store(path)
    counts = np.zeros((len(names), len(ALIGN_COUNTS)), np.int64)
    skipped = 0
    for shard in store.shards:
        counts += np.asarray(shard.column("align_counts"), np.int64).sum(axis=0)
        skipped += int(np.count_nonzero(shard.column("skip")))
    per_source = {}
    for name, row in zip(names, counts):
        stats = AlignStats(*(int(x) for x in row))
        per_source[name] = {**dataclasses.asdict(stats), **stats.rates()}
    return {"blocks": len(store), "skipped_blocks": skipped, "sources": per_source}


class BlockAligner:
    """The checked inputs of the alignment of a run, and the aligned-store row of any corpus block
    (:meth:`row`): what ``fusejax align`` writes and what ``align.on_the_fly`` computes while training.

    Reads ``<run.output_dir>``'s corpus store, every source's top-k store (``represent/<name>``) and, with
    ``align.use_vocab_map``, the vocabulary maps; refuses (one line naming the store or map and the key) top-k
    stores built for another corpus, tokenizer, k or logits dtype, or of another format version. ``maps``:
    "build" (a map that is missing, or was built for other tokenizers or settings, is built by ``fusejax
    vocab-map``) or "require" (one line naming the missing map); ``verify``: check every store's checksums.
    ``meta``: the aligned store's meta for these inputs. ``copied``: the positions (in source order) of the
    sources with the target's tokenizer, whose rows are their top-k rows as they are (no alignment; not stored).
    """

    def __init__(self, cfg: Config, *, maps: str = "build", verify: bool = True):
        from fusejax.tokenizer import tokenizer_fingerprint

        if maps not in ("build", "require"):
            raise ValueError(f"maps={maps!r}: expected 'build' or 'require'")
        self.names = vocab_maps.source_names(cfg)
        self.k, self.mode, self.fallback = cfg.represent.k, cfg.align.mode, cfg.align.fallback
        layout = RunLayout.of(cfg)
        self.corpus = open_checked(layout.corpus, CORPUS_KIND, verify=verify)
        self.chat = chat.is_chat(self.corpus.meta)
        self.target = Vocab.of(self._tokenizer(cfg.target, "target"))
        self.target_fingerprint = tokenizer_fingerprint(self.target.tok)
        _check_meta(self.corpus, "tokenizer_fingerprint", self.corpus.meta.get("tokenizer_fingerprint"),
                    self.target_fingerprint, f"the target tokenizer {cfg.target.tokenizer_path}")
        self.vocabs, self.stores, self.fingerprints = [], [], []
        for name, source in zip(self.names, cfg.sources):  # every input checked before anything is written
            s = Vocab.of(self._tokenizer(source, f"source {name!r}"))
            fp = tokenizer_fingerprint(s.tok)
            store = open_checked(layout.topk(name), TOPK_KIND, verify=verify)
            _check_meta(store, "tokenizer_fingerprint", store.meta.get("tokenizer_fingerprint"), fp,
                        f"the tokenizer {source.tokenizer_path} of source {name!r}")
            _check_meta(store, "k", store.meta.get("k"), self.k, "represent.k")
            _check_meta(store, "logits_dtype", store.meta.get("logits_dtype"), cfg.represent.logits_dtype,
                        "represent.logits_dtype; every top-k store of a run has the same")
            _check_meta(store, "corpus", store.meta.get("corpus"), self.corpus.meta,
                        f"the corpus store {self.corpus.path}")
            if self.chat:
                _check_meta(store, "chat_template", store.meta.get("chat_template"), chat.template_hash(s.tok),
                            f"the chat template of source {name!r}")
            self.vocabs.append(s)
            self.stores.append(store)
            self.fingerprints.append(fp)
        # a chat block is rendered by each model's own template: every source is aligned
        self.copied = [] if self.chat else [n for n, fp in enumerate(self.fingerprints)
                                            if fp == self.target_fingerprint]
        self.maps = [None] * len(self.names)
        if cfg.align.use_vocab_map:
            self.maps = [self._map(cfg, name, fp, maps) for name, fp in zip(self.names, self.fingerprints)]
        self.meta = format_meta(
            ALIGNED_KIND,
            sources=self.names,
            copied=[self.names[n] for n in self.copied],
            source_fingerprints=self.fingerprints,
            target_fingerprint=self.target_fingerprint,
            k=self.k,
            mode=self.mode,
            fallback=self.fallback,
            vocab_map={key: getattr(cfg.vocab_map, key) for key in ("method", "mode", "co_occurrence")}
            if cfg.align.use_vocab_map
            else None,
            corpus=self.corpus.meta,
        )

    def _tokenizer(self, ref, key: str):
        """The tokenizer of ``ref`` (a target or source config), with its chat template for a chat corpus."""
        if self.chat:
            return chat.chat_tokenizer(ref.tokenizer_path, ref.chat_template, key)
        return ref.tokenizer_path

    def _map(self, cfg: Config, name: str, fingerprint: str, maps: str) -> np.ndarray:
        found = vocab_maps.load_map(cfg, name, fingerprint, self.target_fingerprint)
        if found is None and maps == "build":
            vocab_maps.run(cfg)
            found = vocab_maps.load_map(cfg, name, fingerprint, self.target_fingerprint)
        if found is None:
            raise StoreError(
                f"vocabulary map {RunLayout.of(cfg).vocab_map(name)} of source {name!r} is missing or was built "
                f"for other tokenizers or vocab_map settings; run `fusejax vocab-map` (or `fusejax run`) first")
        return found

    def row(self, position: int) -> dict:
        """The aligned-store row of the corpus block at ``position``: ``{"id": block id, field: value}`` with
        the fields of :func:`fusejax.schema.aligned_fields` (see :func:`run`; the tables of the sources not in
        ``copied`` packed by :func:`fusejax.schema.pack_tables`, their logits float32 holding the top-k stores'
        values exactly)."""
        from fusejax.tokenizer import encode_block

        t, k, S = self.target, self.k, len(self.names)
        aligned = [n for n in range(S) if n not in self.copied]
        block = self.corpus.row(position)
        where = f"block {block['id']}"
        if self.chat:
            messages = chat.block_messages(block["text"])
            tgt, tgt_spans = chat.encode(t.tok, messages, where)
            tgt = tgt.astype(np.int32)
        else:
            tgt = np.asarray(encode_block(t.tok, block["text"].decode("utf-8")), np.int32)
        n_bytes = int(block["n_bytes"])
        T = tgt.size
        table_ids = np.full((T, len(aligned), k), -1, np.int32)
        table_logits = np.zeros((T, len(aligned), k), np.float32)
        token_ce = np.zeros((T, len(aligned)), np.float32)
        seq_ce, byte_ce = np.zeros(S, np.float32), np.zeros(S, np.float32)
        counts = np.zeros((S, len(ALIGN_COUNTS)), np.int32)
        skip = False
        for n, (name, s, store, vmap) in enumerate(zip(self.names, self.vocabs, self.stores, self.maps)):
            row = source_row(store, block["id"], name, k)
            ce = np.asarray(row["token_ce"], np.float32)
            seq_ce[n] = row["seq_ce"]
            skip |= int(row["nonfinite"]) > 0
            if n in self.copied:  # the target's tokens: its top-k rows as they are
                if not np.array_equal(row["input_ids"], tgt):
                    raise StoreError(f"{store.path}: block {block['id']} holds other input_ids than the target "
                                     f"tokenizer's encoding of the block (source {name!r})")
                byte_ce[n] = ce.sum(dtype=np.float64) / max(n_bytes, 1)
                counts[n] = (T, T, T, 0, 0)
                continue
            src, top_ids = np.asarray(row["input_ids"], np.int64), np.asarray(row["topk_ids"])
            top_logits = np.asarray(row["topk_logits"], np.float32)
            a = aligned.index(n)
            if self.chat:
                src_ids, src_spans = chat.encode(s.tok, messages, where)
                if not np.array_equal(src_ids, src):
                    raise StoreError(f"{store.path}: {where} of source {name!r} holds other ids than its chat "
                                     f"template renders now")
                stats = self._align_chat(n, a, s, src, src_spans, top_ids, top_logits, ce, vmap, tgt, tgt_spans,
                                         table_ids, table_logits, token_ce, seq_ce)
                ce = ce[chat.scored_positions(src.size, src_spans, end_of_turn=False)]
            else:
                partner = align_tokens(s, src, t, tgt, mode=self.mode)
                ids, logits, stats = _project(s, t, src, tgt.astype(np.int64), top_ids, top_logits, partner, vmap,
                                              self.fallback, self.mode, None)
                table_ids[:, a], table_logits[:, a] = ids, logits
                token_ce[:, a] = np.where(partner >= 0, ce[np.maximum(partner, 0)], seq_ce[n])
            byte_ce[n] = ce.sum(dtype=np.float64) / max(n_bytes, 1)
            counts[n] = dataclasses.astuple(stats)
        out = {"id": int(block["id"]), "input_ids": tgt, **pack_tables(table_ids, table_logits), "seq_ce": seq_ce,
               "token_ce": token_ce, "byte_ce": byte_ce, "n_bytes": n_bytes, "split": block["split"], "skip": skip,
               "align_counts": counts}
        return {**out, "scored": chat.scored_positions(T, tgt_spans)} if self.chat else out

    def _align_chat(self, n: int, a: int, s: Vocab, src, src_spans, top_ids, top_logits, ce, vmap, tgt, tgt_spans,
                    table_ids, table_logits, token_ce, seq_ce) -> AlignStats:
        """Source ``n``'s column ``a`` of a chat block's tables, filled span by span: the content tokens of each
        assistant message are aligned to the target's content tokens of the same message (DTW on the *predicted*
        tokens), and the source row predicting a token is copied to the target position predicting its partner;
        the target's end-of-turn token (right after the span) is paired with the source's, if it has one. A
        pair passes the match test as content tokens do (same spelling, or the vocabulary map); an unpaired or
        unmatched position gets the one-hot of the token it predicts. Template positions stay empty (they are
        never scored). ``token_ce``: the partner's CE, else ``seq_ce``: the source's mean CE over its assistant
        content tokens."""
        t, stats = self.target, AlignStats()
        scored = chat.scored_positions(src.size, src_spans, end_of_turn=False)
        seq_ce[n] = ce[scored].mean() if scored.any() else 0.0

        def fill(ta: int, tb: int, sa: int, sb: int, partner: np.ndarray) -> AlignStats:
            """Target positions predicting tokens [ta, tb) from the source rows predicting tokens [sa, sb)."""
            ids, logits, part = _project(s, t, src[sa:sb], tgt[ta:tb].astype(np.int64), top_ids[sa - 1:sb - 1],
                                         top_logits[sa - 1:sb - 1], partner, vmap, "reference", self.mode, None)
            table_ids[ta - 1:tb - 1, a], table_logits[ta - 1:tb - 1, a] = ids, logits
            token_ce[ta - 1:tb - 1, a] = np.where(partner >= 0, ce[sa - 1 + np.maximum(partner, 0)], seq_ce[n])
            return part

        for (ta, tb), (sa, sb) in zip(tgt_spans, src_spans):
            if tb < tgt.size:  # the end of turn (before the next span's content: adjacent spans keep theirs)
                has_end = sb < src.size
                stats += fill(tb, tb + 1, sb, sb + has_end, np.array([0 if has_end else -1]))
            ta, sa = max(ta, 1), max(sa, 1)  # a first token of the text has no position predicting it
            if ta < tb and sa < sb:
                stats += fill(ta, tb, sa, sb, align_tokens(s, src[sa:sb], t, tgt[ta:tb], mode=self.mode))
        return stats


def source_row(store, block_id: int, name: str, k: int) -> dict:
    """The row of block ``block_id`` in the top-k store ``store`` of source ``name`` (top-``k``); a missing
    block or fields of other lengths than its ``input_ids``: :class:`StoreError` naming the store."""
    try:
        row = store.get(block_id)
    except KeyError:
        raise StoreError(f"{store.path}: block {block_id} of the corpus is missing (source {name!r})")
    n = len(row["input_ids"])
    if np.shape(row["topk_ids"]) != (n, k) or np.shape(row["token_ce"]) != (n,):
        raise StoreError(f"{store.path}: block {block_id} has {n} input_ids but topk_ids "
                         f"{np.shape(row['topk_ids'])} and token_ce {np.shape(row['token_ce'])}")
    return row


def block_tables(row: dict, names: list[str], copied: dict, k: int, *, ce_level: str,
                 ce_unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every source's tables of one aligned-store ``row`` (``input_ids`` [m]): ``(table_ids [m, S, k] int32, -1
    padded; table_logits [m, S, k] float32; source_ce)`` for the S sources ``names``, where ``source_ce`` is
    the CE the fusion compares (``train.ce_level`` / ``train.ce_unit``): the token CE [m, S] float32 for
    "token", else the row's ``byte_ce`` (unit "byte") or ``seq_ce`` [S]. The sources in ``copied`` ({source
    position: its top-k store}: the target's own tokenizer) are read from their top-k rows; the others are
    unpacked from the row. A copied row of another length: :class:`StoreError`."""
    m, S = len(row["input_ids"]), len(names)
    table_ids, table_logits = np.full((m, S, k), -1, np.int32), np.zeros((m, S, k), np.float32)
    token_ce = np.zeros((m, S), np.float32)
    stored = [n for n in range(S) if n not in copied]
    table_ids[:, stored], table_logits[:, stored] = unpack_tables(row["table_counts"], row["table_ids"],
                                                                  row["table_logits"], k)
    token_ce[:, stored] = row["token_ce"]
    for n, store in copied.items():
        top = source_row(store, row["id"], names[n], k)
        if len(top["input_ids"]) != m:
            raise StoreError(f"{store.path}: block {row['id']} has {len(top['input_ids'])} input_ids; the "
                             f"aligned store has {m} target tokens (source {names[n]!r})")
        table_ids[:, n], table_logits[:, n], token_ce[:, n] = top["topk_ids"], top["topk_logits"], top["token_ce"]
    if ce_level == "token":
        return table_ids, table_logits, token_ce
    return table_ids, table_logits, np.asarray(row["byte_ce"] if ce_unit == "byte" else row["seq_ce"], np.float32)


def run(cfg: Config) -> dict:
    """The ``fusejax align`` stage: every source's top-k store, aligned to the target's tokens, in one store.

    Reads the corpus store ``<run.output_dir>/corpus`` and the top-k stores ``represent/<source name>``;
    writes ``<run.output_dir>/aligned`` (kind ``"aligned"``, fields :func:`fusejax.schema.aligned_fields`),
    one row per corpus block (same id, corpus order), with S sources in config order:

    * ``input_ids`` [T]: the target tokenizer's ids of the block text + EOS (as the top-k stage does);
    * the tables ``ids`` / ``logits`` [T, A, k] of the A sources not in meta ``copied`` (the sources with the
      target's tokenizer, whose tables and token CE the train reader takes from their top-k stores as they
      are): align_topk of each (target-vocab ids, -1 padded),
      stored without their empty entries (:func:`fusejax.schema.pack_tables`: ``table_counts`` [T, A],
      ``table_ids`` [N], ``table_logits`` [N] in ``represent.logits_dtype``, the top-k stores' dtype, so the
      logits are stored exactly); ``seq_ce`` [S] float32: each source's mean CE over the block;
    * ``token_ce`` [T, A] float32: the CE of the source token paired 1-to-1 with target position t; positions
      without a 1-to-1 partner get the source's ``seq_ce`` (its mean, so they favour no source);
    * ``byte_ce`` [S] float32: the sum of the source's token CE over the block / UTF-8 bytes of the block;
    * ``n_bytes`` int32, ``split`` uint8 (from the corpus), ``skip`` bool: a source had non-finite logits;
    * ``align_counts`` [S, 5] int32: AlignStats counts (positions, one_to_one, matched, fallback, empty);
    * a chat corpus: ``scored`` [T] bool, the positions predicting assistant content tokens and each turn's
      end-of-turn token (the only ones trained on); the tables are filled there only
      (:meth:`BlockAligner._align_chat`), and ``seq_ce`` / ``byte_ce`` are taken over the content positions and
      the assistant bytes.

    ``align.use_vocab_map`` uses the maps of ``fusejax vocab-map`` (``soft``; built here when missing), else
    ``hard``. JAX process i of n writes a contiguous slice of the blocks; a rerun resumes; top-k stores built
    for another corpus, tokenizer, k or logits dtype, or of another format version, are refused before anything
    is written (:class:`BlockAligner`). Writes the per-source rates to ``<run.output_dir>/aligned_summary.json``
    and returns them. With ``align.on_the_fly`` it only checks these inputs (building missing maps) and writes
    no store: ``fusejax train`` aligns each batch itself (:class:`fusejax.data.AlignedOnTheFly`).
    """
    import jax

    path = RunLayout.of(cfg).aligned
    if not cfg.align.on_the_fly:
        check_existing(path, ALIGNED_KIND)
    aligner = BlockAligner(cfg)
    if cfg.align.on_the_fly:
        return {"on_the_fly": True, "sources": aligner.names, "corpus_blocks": len(aligner.corpus)}
    corpus = aligner.corpus
    process = jax.process_index()
    start, stop = process_slice(len(corpus), process, jax.process_count())
    fields = aligned_fields(len(aligner.names), aligner.k, aligner.target.size, cfg.represent.logits_dtype,
                            copied=len(aligner.copied), chat=aligner.chat)
    with StoreWriter(path, kind=ALIGNED_KIND, meta=aligner.meta, fields=fields,
                     rows_per_shard=cfg.represent.shard_size, process_index=process) as writer:
        done = writer.completed_ids()
        if len(done) and not np.array_equal(done, [corpus.row(i)["id"] for i in range(start, start + len(done))]):
            raise StoreError(f"{path}: stored blocks do not follow the corpus {corpus.path}")
        for position in range(start + len(done), stop):
            row = aligner.row(position)
            writer.add(row.pop("id"), **row)
    if process != 0:  # process 0 writes the summary, from the shards complete at that time
        return {}
    summary = {**_aligned_summary(path, aligner.names), "corpus_blocks": len(corpus)}
    write_json(RunLayout.of(cfg).aligned_summary, summary)
    save_resolved(cfg, path)
    return summary


def explain(cfg: Config, position: int = 0) -> dict:
    """One corpus block's alignment, for reading (the Colab notebook shows it as a table): the block at
    ``position`` of the run's corpus store aligned as :meth:`BlockAligner.row` aligns it (plain-text corpora;
    the top-k stores of ``fusejax represent`` and, with ``align.use_vocab_map``, the vocabulary maps are needed).

    Returns ``{"sources": [S] names, "target": [T] target token strings, "paired": [T][S] the string of the
    source token paired 1-to-1 with each target position (None: no 1-to-1 partner), "table_ids" [T, S, k]
    int32 / "table_logits" [T, S, k] float32 (row t: each source's top-k for the token after t, in target ids,
    -1 padded), "source_ce" [S] or [T, S] float32 (the CE that ``train.ce_level`` and ``train.ce_unit`` have the
    fusion compare)}``; :func:`fusejax.fusion.fused_topk` of the tables gives the fused teacher.
    """
    aligner = BlockAligner(cfg, maps="require")
    if aligner.chat:
        raise ValueError(f"explain: {aligner.corpus.path} is a chat corpus; only plain-text blocks are explained")
    row = aligner.row(position)
    tgt, t, S = row["input_ids"], aligner.target, len(aligner.names)
    copied = {n: aligner.stores[n] for n in aligner.copied}
    table_ids, table_logits, source_ce = block_tables(row, aligner.names, copied, aligner.k,
                                                      ce_level=cfg.train.ce_level, ce_unit=cfg.train.ce_unit)
    paired = [[None] * S for _ in range(tgt.size)]
    for n, (name, s, store) in enumerate(zip(aligner.names, aligner.vocabs, aligner.stores)):
        top = source_row(store, row["id"], name, aligner.k)
        if n in copied:
            partner = np.arange(tgt.size)
        else:
            partner = align_tokens(s, np.asarray(top["input_ids"], np.int64), t, tgt, mode=aligner.mode)
        for i, j in enumerate(partner.tolist()):
            paired[i][n] = s.tokens[top["input_ids"][j]] if j >= 0 else None
    return {"sources": list(aligner.names), "target": [t.tokens[i] for i in tgt.tolist()], "paired": paired,
            "table_ids": table_ids, "table_logits": table_logits, "source_ce": source_ce}
