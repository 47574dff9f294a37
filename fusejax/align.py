"""Vocabulary maps and token alignment between a *source* tokenizer and the *target* tokenizer (host side).

Pure numpy + rapidfuzz + numba (never JAX). Every public function takes ``mode``:

``mode="reference"`` reproduces the FuseLLM reference code exactly, quirks included:
  * token strings are ``convert_ids_to_tokens`` strings; each tokenizer has a word-start *marker* (``▁`` for
    SentencePiece-style vocabularies, ``Ġ`` for byte-level BPE), detected from the tokenizer itself;
  * MinED vocab map: the source token with its marker replaced by the target marker maps to the identical
    target token, else to the target token (raw string) at the smallest Levenshtein distance (lowest id on ties);
  * DTW cost: Levenshtein distance between the two tokens with their markers removed;
  * match test at a 1-to-1 position: marker-replaced source token == target token (``soft``: or the vocab map
    sends it there), with the reference's i = 0 special case for byte-level sources;
  * fallback (no 1-to-1 partner, or no match): one entry, the *current* target token, logit 1.0.

``mode="default"`` keeps the algorithm and fixes the quirks (each can be measured by switching the mode):
  * tokens are compared by the *text they spell*, as bytes: byte-level tokens are decoded, byte-fallback
    tokens (``<0x0A>``) become their byte, the marker becomes a space, and special tokens spell a role
    placeholder (``\\xffeos``, ``\\xffbos``, ...), so newlines, non-ASCII text and EOS align across tokenizers;
    the DTW cost is the byte Levenshtein distance of these spellings; at i = 0 one leading space is ignored
    on both sides (SentencePiece's dummy prefix);
  * fallback one-hot on the **next** target token (the label the position predicts); the last position has no
    label inside the block, so it uses ``next_target_id`` when given, else stays empty;
  * a matching position whose projection resolves nothing falls back as well (no empty rows).

Public API: :func:`word_start_marker`, :func:`token_strings`, :func:`token_texts`, :func:`vocab_map`,
:func:`vocab_map_summary`, :func:`align_tokens`, :func:`align_topk` and :class:`AlignStats`; the pipeline
stages :func:`run_vocab_maps` (``fusejax vocab-map``) and :func:`run_align` (``fusejax align``), which read
the corpus and top-k stores and write the aligned store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

MODES = ("reference", "default")
METHODS = ("mined", "exact")
FALLBACKS = ("next_token", "reference")
# roles whose special tokens spell the same placeholder in every vocabulary (default mode), first role wins
_SPECIAL_ROLES = ("eos", "bos", "pad", "unk")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# rows of the MinED distance matrix computed at once (rows x |target vocab| int32)
_MINED_CHUNK = 512
# characters of margin around a source token's span that the first (banded) DTW pass looks at
_BAND_BYTES = 16


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_table()
_BYTE_LEVEL_SPACE = next(c for c, b in _BYTE_LEVEL.items() if b == 0x20)  # "Ġ"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")


def _load(tokenizer):
    """A tokenizer object, or the one loaded from a path by fusejax.tokenizer.load_tokenizer."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from fusejax.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise TypeError(f"expected a transformers tokenizer or a tokenizer folder, got {type(tokenizer).__name__}")
    return tokenizer


def _pipeline_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _components(node) -> list[dict]:
    """All component dicts of a pre-tokenizer / decoder / normalizer JSON tree, depth first."""
    if isinstance(node, dict):
        found = [node] if "type" in node else []
        for value in node.values():
            found += _components(value)
        return found
    if isinstance(node, list):
        return [c for item in node for c in _components(item)]
    return []


def is_byte_level(tokenizer) -> bool:
    """True when the tokenizer is byte-level BPE (a ByteLevel pre-tokenizer or decoder)."""
    spec = _pipeline_json(_load(tokenizer))
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    return any(p["type"] == "ByteLevel" for p in parts)


def word_start_marker(tokenizer) -> str:
    """The character that marks a word start in token strings (``▁`` SentencePiece-style, ``Ġ`` byte-level).

    Read from the pre-tokenizer / normalizer / decoder (ByteLevel, Metaspace, Replace(" " -> marker)); when
    the tokenizer has no such pipeline, the more frequent of ``▁`` and ``Ġ`` as first character of tokens.
    """
    tok = _load(tokenizer)
    spec = _pipeline_json(tok)
    for part in _components([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")]):
        if part["type"] == "ByteLevel":
            return _BYTE_LEVEL_SPACE
        if part["type"] == "Metaspace":
            return part["replacement"]
        if part["type"] == "Replace":
            pattern, content = part["pattern"].get("String"), part["content"]
            if pattern == " " and len(content) == 1:
                return content
            if content == " " and pattern and len(pattern) == 1:
                return pattern
    counts = {"▁": 0, _BYTE_LEVEL_SPACE: 0}
    for token in tok.get_vocab():
        if token[:1] in counts:
            counts[token[0]] += 1
    marker = max(counts, key=counts.get)
    if counts[marker] == 0:
        raise ValueError(f"cannot detect the word-start marker of tokenizer {getattr(tok, 'name_or_path', tok)!r}")
    return marker


class _Vocab:
    """Everything the alignment needs to know about one tokenizer, computed once per tokenizer object."""

    def __init__(self, tok):
        self.tok = tok
        self.size = len(tok)
        self.tokens = [t if t is not None else "" for t in tok.convert_ids_to_tokens(list(range(self.size)))]
        self.marker = word_start_marker(tok)
        self.byte_level = is_byte_level(tok)
        self.vocab = tok.get_vocab()  # token string -> id, as the reference looks tokens up
        self._texts = None
        self._codes = {}
        self.replaced = {}  # target marker -> {marker-replaced token: first source id}

    @property
    def texts(self) -> list[bytes]:
        if self._texts is None:
            self._texts = _spell(self)
        return self._texts

    def codes(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 codes, int64 offsets [V+1]) of every token: ``stripped`` (marker removed) or ``texts``."""
        if kind not in self._codes:
            if kind == "stripped":
                strings = [t.replace(self.marker, "") for t in self.tokens]
                flat = np.frombuffer("".join(strings).encode("utf-32-le"), np.uint32).astype(np.int32)
            else:
                strings = self.texts
                flat = np.frombuffer(b"".join(strings), np.uint8).astype(np.int32)
            offsets = np.zeros(len(strings) + 1, np.int64)
            np.cumsum([len(s) for s in strings], out=offsets[1:])
            self._codes[kind] = (flat, offsets)
        return self._codes[kind]

    def keys(self, kind: str) -> np.ndarray:
        """int32 [V]: one number per distinct string of ``kind`` (see :meth:`codes`), shared by all vocabularies."""
        if ("keys", kind) not in self._codes:
            strings = (t.replace(self.marker, "") for t in self.tokens) if kind == "stripped" else self.texts
            self._codes["keys", kind] = np.array([_KEYS.setdefault(x, len(_KEYS)) for x in strings], np.int32)
        return self._codes["keys", kind]


def _spell(v: _Vocab) -> list[bytes]:
    """The bytes each token of ``v`` spells (see the module docstring, default mode)."""
    tok = v.tok
    roles = {}
    for role in _SPECIAL_ROLES:
        token_id = getattr(tok, f"{role}_token_id", None)
        if token_id is not None and token_id not in roles:
            roles[token_id] = role
    added = {i: t for i, t in getattr(tok, "added_tokens_decoder", {}).items() if i < v.size}
    special = set(getattr(tok, "all_special_ids", [])) | {i for i, t in added.items() if t.special}
    texts = []
    for token_id, token in enumerate(v.tokens):
        if token_id in roles:
            texts.append(b"\xff" + roles[token_id].encode())
        elif token_id in special:
            texts.append(b"\xff" + token.encode("utf-8"))
        elif token_id in added:  # added tokens are stored as literal text (GPT-NeoX's runs of spaces)
            texts.append(token.encode("utf-8"))
        elif v.byte_level:
            texts.append(b"".join(bytes([_BYTE_LEVEL[c]]) if c in _BYTE_LEVEL else c.encode() for c in token))
        elif (m := _BYTE_FALLBACK.fullmatch(token)) is not None:
            texts.append(bytes([int(m.group(1), 16)]))
        else:
            texts.append(token.replace(v.marker, " ").encode("utf-8"))
    return texts


_KEYS: dict = {}  # token string (str or bytes) -> key shared by every vocabulary (see _Vocab.keys)
_VOCABS: dict = {}  # id(tokenizer object) or tokenizer folder -> _Vocab


def _vocab(tokenizer) -> _Vocab:
    if isinstance(tokenizer, (str, os.PathLike)):
        key = str(Path(tokenizer).resolve())
        if key not in _VOCABS:
            _VOCABS[key] = _Vocab(_load(tokenizer))
        return _VOCABS[key]
    tok = _load(tokenizer)
    cached = _VOCABS.get(id(tok))
    if cached is None or cached.tok is not tok:
        cached = _VOCABS[id(tok)] = _Vocab(tok)
    return cached


def token_strings(tokenizer, ids=None) -> list[str]:
    """``convert_ids_to_tokens`` strings of ``ids`` (default: the whole vocabulary)."""
    v = _vocab(tokenizer)
    return list(v.tokens) if ids is None else [v.tokens[i] for i in _ids(ids, v, "ids")]


def token_texts(tokenizer, ids=None) -> list[bytes]:
    """The bytes each token of ``ids`` spells (default: the whole vocabulary); see the module docstring."""
    v = _vocab(tokenizer)
    return list(v.texts) if ids is None else [v.texts[i] for i in _ids(ids, v, "ids")]


def _ids(ids, v: _Vocab, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= v.size):
        bad = arr[(arr < 0) | (arr >= v.size)][0]
        raise ValueError(f"{name}: id {bad} is outside the vocabulary of size {v.size}")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------- vocab maps


def _map_strings(s: _Vocab, t: _Vocab, mode: str) -> tuple[list[str], list[str], dict[str, int]]:
    """(source keys, target keys, target key -> preferred target id) compared by the vocab map."""
    if mode == "reference":
        keys_s = [tok.replace(s.marker, t.marker) for tok in s.tokens]
        return keys_s, t.tokens, t.vocab
    keys_s = [b.decode("latin-1") for b in s.texts]  # one character per byte, for rapidfuzz
    keys_t = [b.decode("latin-1") for b in t.texts]
    prefer = {}
    # several target tokens can spell the same bytes (byte-fallback "<0x41>" and "A"): prefer the token that
    # is not a byte-fallback token, then the lowest id
    order = sorted(range(t.size), key=lambda i: (_BYTE_FALLBACK.fullmatch(t.tokens[i]) is not None, i))
    for i in order:
        prefer.setdefault(keys_t[i], i)
    return keys_s, keys_t, prefer


def _exact_ids(s: _Vocab, t: _Vocab, mode: str) -> np.ndarray:
    """int32 [|V_source|]: the target id spelling/reading the same as each source token, else -1 (cached)."""
    key = ("exact", id(t), mode)
    if key not in s._codes:
        keys_s, _, lookup = _map_strings(s, t, mode)
        s._codes[key] = np.array([lookup.get(k, -1) for k in keys_s], np.int32)
    return s._codes[key].copy()


def _cache_path(cache_dir, s: _Vocab, t: _Vocab, method: str, mode: str, co_occurrence) -> Path:
    from fusejax.tokenizer import tokenizer_fingerprint

    key = {
        "source": tokenizer_fingerprint(s.tok),
        "target": tokenizer_fingerprint(t.tok),
        "method": method,
        "mode": mode,
        "co_occurrence": None
        if co_occurrence is None
        else hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in co_occurrence)).hexdigest(),
        "version": 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"vocab_map-{digest}.npz"


def _co_occurrence_table(co_occurrence, n_source: int, n_target: int) -> dict[int, dict[int, float]]:
    """(source_ids, target_ids, counts) arrays -> {source id: {target id: summed count}}."""
    try:
        src, tgt, cnt = (np.asarray(a).ravel() for a in co_occurrence)
    except (TypeError, ValueError) as e:
        raise ValueError("co_occurrence: expected a tuple (source_ids, target_ids, counts) of 1-D arrays") from e
    if not (src.shape == tgt.shape == cnt.shape):
        raise ValueError(f"co_occurrence: arrays of different lengths {src.shape}, {tgt.shape}, {cnt.shape}")
    if src.size and (src.min() < 0 or src.max() >= n_source or tgt.min() < 0 or tgt.max() >= n_target):
        raise ValueError(f"co_occurrence: ids outside the vocabularies ({n_source} source, {n_target} target)")
    table: dict[int, dict[int, float]] = {}
    for a, b, c in zip(src.tolist(), tgt.tolist(), cnt.tolist()):
        row = table.setdefault(a, {})
        row[b] = row.get(b, 0.0) + c
    return table


def vocab_map(
    source_tokenizer,
    target_tokenizer,
    method: str = "mined",
    mode: str = "default",
    co_occurrence=None,
    cache_dir=None,
    workers: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Map every source token to a target token.

    Returns (target_ids, distances): int32 arrays of length len(source vocab); -1 where unmapped (``exact``).
    ``method="exact"``: the target token reading the same (reference: marker-replaced string; default: same
    spelled bytes). ``method="mined"``: otherwise the target token at the smallest Levenshtein distance,
    lowest id on ties; with ``co_occurrence=(source_ids, target_ids, counts)`` (e.g. counted over aligned
    1-to-1 pairs), ties go to the candidate seen most often with the source token instead.
    ``cache_dir``: when given, the map is stored there keyed by both tokenizers' fingerprints and reused.
    """
    _check_mode(mode)
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    s, t = _vocab(source_tokenizer), _vocab(target_tokenizer)
    path = None if cache_dir is None else _cache_path(cache_dir, s, t, method, mode, co_occurrence)
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return cached["target_ids"], cached["distances"]
    table = None if co_occurrence is None else _co_occurrence_table(co_occurrence, s.size, t.size)

    target_ids = _exact_ids(s, t, mode)
    distances = np.where(target_ids >= 0, 0, -1).astype(np.int32)
    if method == "mined" and t.size:
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        keys_s, keys_t, _ = _map_strings(s, t, mode)
        todo = np.flatnonzero(target_ids < 0)
        for start in range(0, todo.size, _MINED_CHUNK):
            rows = todo[start : start + _MINED_CHUNK]
            d = cdist([keys_s[r] for r in rows], keys_t, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
            best = d.argmin(axis=1)  # first minimum = lowest target id
            best_d = d[np.arange(rows.size), best]
            if table is not None:
                for k, r in enumerate(rows.tolist()):
                    counts = table.get(r)
                    if counts:
                        tied = np.flatnonzero(d[k] == best_d[k])
                        best[k] = max(tied.tolist(), key=lambda c: (counts.get(c, 0.0), -c))
            target_ids[rows] = best
            distances[rows] = best_d
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, target_ids=target_ids, distances=distances)
        os.replace(tmp, path)
    return target_ids, distances


def vocab_map_summary(target_ids: np.ndarray, distances: np.ndarray) -> dict:
    """{"size", "exact_rate", "mapped_rate", "mean_distance" (over mapped tokens), "max_distance"}."""
    target_ids, distances = np.asarray(target_ids), np.asarray(distances)
    if target_ids.shape != distances.shape:
        raise ValueError(f"target_ids {target_ids.shape} and distances {distances.shape} differ in shape")
    mapped = target_ids >= 0
    n = max(target_ids.size, 1)
    return {
        "size": int(target_ids.size),
        "exact_rate": float(np.sum(mapped & (distances == 0)) / n),
        "mapped_rate": float(mapped.sum() / n),
        "mean_distance": float(distances[mapped].mean()) if mapped.any() else float("nan"),
        "max_distance": int(distances[mapped].max()) if mapped.any() else -1,
    }


# ----------------------------------------------------------------------------------------------- alignment


def _byte_offsets(v: _Vocab, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of each token of ``ids`` in the text they spell together."""
    offsets = v.codes("texts")[1]
    lengths = offsets[ids + 1] - offsets[ids]
    end = np.cumsum(lengths)
    return end - lengths, end


def align_tokens(source_tokenizer, source_ids, target_tokenizer, target_ids, mode: str = "default") -> np.ndarray:
    """DTW alignment of two token sequences (see the module docstring for the cost of each mode).

    Returns int32 [len(target_ids)]: the source position paired with each target position when the path pairs
    it with exactly one source position, else -1. Identical to the full O(n*m) DP, in three compiled passes:

    1. a DP restricted to a band around the byte-offset diagonal: the cost F of one path, >= the optimum;
    2. backward over the matrix, a lower bound h(cell) on the cost still to pay after each cell, from per-cell
       costs that never exceed the Levenshtein distance (0 for equal tokens, else the largest of 1, the length
       difference and the number of hashed characters one token has and the other lacks; the longer length
       when they share no character), computed only
       where it stays <= F;
    3. the exact DP, where a cell whose value plus h exceeds F counts as infinite (and its Levenshtein
       distance is never computed).

    Why the backtrack cannot change: every cell of an optimal path has value + h <= optimum <= F, so it is
    kept with its exact value (its optimal predecessor is kept too); at each step the backtrack compares
    the neighbours of a cell on an optimal path, and a neighbour that ties with the minimum lies on an
    optimal path itself, so it is kept, while a neighbour above the minimum stays above it when made
    infinite. Hence the same moves and the same tie-breaking as the full DP.
    """
    from fusejax import _align_kernels as K

    _check_mode(mode)
    s, t = _vocab(source_tokenizer), _vocab(target_tokenizer)
    src, tgt = _ids(source_ids, s, "source_ids"), _ids(target_ids, t, "target_ids")
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
    upper = K._cell(*band, n - 1, m - 1)  # the cost of a path: an upper bound on the optimal cost

    cap = min(upper + 1, 2**31 - 1)
    to_go = np.empty((n, m), np.int16 if cap <= np.iinfo(np.int16).max else np.int32)
    to_go_lo, to_go_hi = K.cost_to_go_bound(*cheap, cap, to_go)
    full_lo, full_hi = np.zeros(n, np.int64), np.full(n, m - 1, np.int64)
    rows = K.dtw_rows(codes_s, offs_s, src, codes_t, offs_t, tgt, memo, full_lo, full_hi, upper, to_go, to_go_lo, to_go_hi)
    partner, ok = K.backtrack(*rows, n, m)
    assert ok, "the pruned DTW lost the end cell"
    return partner


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
    _check_mode(mode)
    fallback = fallback or ("reference" if mode == "reference" else "next_token")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {FALLBACKS}")
    s, t = _vocab(source_tokenizer), _vocab(target_tokenizer)
    src, tgt = _ids(source_ids, s, "source_ids"), _ids(target_ids, t, "target_ids")
    top_ids = np.asarray(source_topk_ids)
    top_logits = np.asarray(source_topk_logits, np.float32)
    if top_ids.ndim != 2 or top_ids.shape[0] != src.size or top_logits.shape != top_ids.shape:
        raise ValueError(
            f"source_topk_ids {top_ids.shape} / source_topk_logits {top_logits.shape}: expected [{src.size}, k]"
        )
    if vocab_map is not None:
        vocab_map = np.asarray(vocab_map)
        if vocab_map.shape != (s.size,):
            raise ValueError(f"vocab_map: expected shape ({s.size},) (the source vocabulary), got {vocab_map.shape}")
    if next_target_id is not None:
        _ids([next_target_id], t, "next_target_id")

    partner = align_tokens(s.tok, src, t.tok, tgt, mode=mode)
    out_ids, out_logits, stats = _project(s, t, src, tgt, top_ids, top_logits, partner, vocab_map, fallback, mode,
                                          next_target_id)
    return (out_ids, out_logits, stats) if return_stats else (out_ids, out_logits)


def _project(s: _Vocab, t: _Vocab, src, tgt, top_ids, top_logits, partner, vocab_map, fallback, mode, next_target_id):
    """align_topk's rows given the alignment ``partner`` (checked inputs); returns (ids, logits, stats)."""
    # projection of a source id onto a target id (-1: does not resolve)
    project = _exact_ids(s, t, mode) if vocab_map is None else vocab_map.astype(np.int64)
    if mode == "reference":
        src_keys = [s.tokens[i].replace(s.marker, t.marker) for i in src.tolist()]
        tgt_keys = [t.tokens[i] for i in tgt.tolist()]
    else:
        src_keys = [s.texts[i] for i in src.tolist()]
        tgt_keys = [t.texts[i] for i in tgt.tolist()]

    T, k = tgt.size, top_ids.shape[1]
    out_ids = np.full((T, k), -1, np.int32)
    out_logits = np.zeros((T, k), np.float32)
    stats = AlignStats(positions=T)
    for i in range(T):
        j = int(partner[i])
        if j >= 0:
            stats.one_to_one += 1
            if _matches(s, t, mode, i, src_keys[j], tgt_keys[i], int(src[j]), int(tgt[i]), vocab_map):
                stats.matched += 1
                row = []
                for sid, logit in zip(top_ids[j].tolist(), top_logits[j].tolist()):
                    tid = int(project[sid]) if sid < project.size else -1  # ids past the tokenizer: model padding
                    if tid >= 0 and tid not in row:
                        row.append(tid)
                        out_logits[i, len(row) - 1] = logit
                out_ids[i, : len(row)] = row
                if row or mode == "reference":
                    stats.empty += not row
                    continue
        stats.fallback += 1
        if fallback == "reference":
            out_ids[i, 0] = t.vocab[tgt_keys[i]] if mode == "reference" else tgt[i]
        elif i + 1 < T or next_target_id is not None:
            out_ids[i, 0] = tgt[i + 1] if i + 1 < T else next_target_id
        else:
            stats.empty += 1
            continue
        out_logits[i, 0] = 1.0
    return out_ids, out_logits, stats


def _matches(s: _Vocab, t: _Vocab, mode: str, i: int, src_key, tgt_key, src_id: int, tgt_id: int, vocab_map) -> bool:
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


def _replaced_index(s: _Vocab, t: _Vocab) -> dict[str, int]:
    """marker-replaced source token string -> source id (first id), for the reference's i = 0 lookup."""
    if t.marker not in s.replaced:
        index = {}
        for i, tok in enumerate(s.tokens):
            index.setdefault(tok.replace(s.marker, t.marker), i)
        s.replaced[t.marker] = index
    return s.replaced[t.marker]


# ------------------------------------------------------------------------------------------------- the stage

ALIGNED_KIND = "aligned"
_COUNTS = ("positions", "one_to_one", "matched", "fallback", "empty")  # AlignStats fields, in order


def _process_slot() -> tuple[int, int]:
    """(process index, process count) of this run, from the same settings as fusejax.distributed.initialize."""
    from fusejax.distributed import plan

    found = plan()
    if found is None:
        return 0, 1
    if found["process_id"] is None or found["num_processes"] is None:  # a TPU pod: JAX knows the layout
        import jax

        return jax.process_index(), jax.process_count()
    return found["process_id"], found["num_processes"]


def _source_names(cfg) -> list[str]:
    """Source names in config order (the config already checked they are unique, safe folder names)."""
    names = [src.name for src in cfg.sources]
    if not names:
        raise ValueError("config: `sources` is empty; the alignment needs at least one source")
    return names


def _vocab_map_file(cfg, name: str) -> Path:
    return Path(cfg.run.output_dir) / "vocab_maps" / f"{name}.npz"


def _vocab_map_meta(cfg, source_fp: str, target_fp: str) -> dict:
    return {"source_fingerprint": source_fp, "target_fingerprint": target_fp, "method": cfg.vocab_map.method,
            "mode": cfg.vocab_map.mode, "co_occurrence": cfg.vocab_map.co_occurrence}


def _load_vocab_map(cfg, name: str, source_fp: str, target_fp: str) -> np.ndarray | None:
    """The stored map of source ``name`` (int32 [|V_source|]) if it was built for these settings, else None."""
    path = _vocab_map_file(cfg, name)
    if not path.is_file():
        return None
    with np.load(path) as f:
        if json.loads(str(f["meta"])) != _vocab_map_meta(cfg, source_fp, target_fp):
            return None
        return f["target_ids"]


def _co_occurrence(cfg, name: str, src_tok, tgt_tok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source ids, target ids, counts) of the token pairs that align_tokens pairs 1-to-1 over the corpus."""
    from fusejax.tokenizer import encode_block
    from fusejax.store import open_store

    out = Path(cfg.run.output_dir)
    corpus, topk = open_store(out / "corpus", verify=True), open_store(out / "represent" / name, verify=True)
    pairs = []
    for row in corpus:
        src = np.asarray(topk.get(row["id"])["input_ids"])
        tgt = np.asarray(encode_block(tgt_tok, row["text"].decode("utf-8")))
        partner = align_tokens(src_tok, src, tgt_tok, tgt, mode=cfg.vocab_map.mode)
        ok = partner >= 0
        pairs.append(np.stack([src[partner[ok]], tgt[ok]], axis=1))
    unique, counts = np.unique(np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64), axis=0, return_counts=True)
    return unique[:, 0], unique[:, 1], counts


def run_vocab_maps(cfg) -> dict:
    """The ``fusejax vocab-map`` stage: one map per source onto the target vocabulary.

    Writes ``<run.output_dir>/vocab_maps/<source name>.npz`` (``target_ids``, ``distances`` int32
    [|V_source|], ``meta``: both tokenizer fingerprints and the settings; a map with the same meta is reused)
    and ``vocab_maps/summary.json`` (per source: exact-match rate, mean distance, ...). ``vocab_map.
    co_occurrence`` breaks distance ties by 1-to-1 alignment counts over the corpus (needs the top-k stores).
    Returns the summary.
    """
    from fusejax.config import save_resolved
    from fusejax.store import write_json
    from fusejax.tokenizer import load_tokenizer, tokenizer_fingerprint

    names = _source_names(cfg)
    tgt_tok = load_tokenizer(cfg.target.tokenizer_path)
    target_fp = tokenizer_fingerprint(tgt_tok)
    summary = {}
    for name, source in zip(names, cfg.sources):
        src_tok = load_tokenizer(source.tokenizer_path)
        source_fp = tokenizer_fingerprint(src_tok)
        meta = _vocab_map_meta(cfg, source_fp, target_fp)
        path = _vocab_map_file(cfg, name)
        if _load_vocab_map(cfg, name, source_fp, target_fp) is None:
            counts = _co_occurrence(cfg, name, src_tok, tgt_tok) if cfg.vocab_map.co_occurrence else None
            ids, dist = vocab_map(src_tok, tgt_tok, method=cfg.vocab_map.method, mode=cfg.vocab_map.mode,
                                  co_occurrence=counts)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, target_ids=ids, distances=dist, meta=np.array(json.dumps(meta, sort_keys=True)))
            os.replace(tmp, path)
        with np.load(path) as f:
            summary[name] = {**vocab_map_summary(f["target_ids"], f["distances"]), **meta}
    if _process_slot()[0] == 0:  # every process builds the same maps; one writes the summary
        write_json(path.parent / "summary.json", summary)
        save_resolved(cfg, path.parent)
    return summary


def _check_meta(store, key: str, found, expected, what: str) -> None:
    if found != expected:
        raise ValueError(
            f"store {store.path}: meta key {key!r} is {found!r}, expected {expected!r} ({what}); "
            f"rebuild that store or fix the config"
        )


def _aligned_summary(path: Path, names: list[str]) -> dict:
    """Per-source rates over every block in the aligned store at ``path``."""
    from fusejax.store import open_store

    store = open_store(path)
    counts = np.zeros((len(names), len(_COUNTS)), np.int64)
    skipped = 0
    for shard in store.shards:
        counts += np.asarray(shard.column("align_counts"), np.int64).sum(axis=0)
        skipped += int(np.count_nonzero(shard.column("skip")))
    per_source = {}
    for name, row in zip(names, counts):
        stats = AlignStats(*(int(x) for x in row))
        per_source[name] = {**dataclasses.asdict(stats), **stats.rates()}
    return {"blocks": len(store), "skipped_blocks": skipped, "sources": per_source}


def run_align(cfg) -> dict:
    """The ``fusejax align`` stage: every source's top-k store, aligned to the target's tokens, in one store.

    Reads the corpus store ``<run.output_dir>/corpus`` and the top-k stores ``represent/<source name>``;
    writes ``<run.output_dir>/aligned`` (kind ``"aligned"``), one row per corpus block (same id, corpus order),
    with S sources in config order:

    * ``input_ids`` [T] int32: the target tokenizer's ids of the block text + EOS (as the top-k stage does);
    * ``table_ids`` / ``table_logits`` [T, S, k] int32 / float32: align_topk of each source (target-vocab
      ids, -1 padded; logits 0 there); ``seq_ce`` [S] float32: each source's mean CE over the block;
    * ``token_ce`` [T, S] float32: the CE of the source token paired 1-to-1 with target position t; positions
      without a 1-to-1 partner get the source's ``seq_ce`` (its mean, so they favour no source);
    * ``byte_ce`` [S] float32: the sum of the source's token CE over the block / UTF-8 bytes of the block;
    * ``n_bytes`` int32, ``split`` uint8 (from the corpus), ``skip`` bool: a source had non-finite logits;
    * ``align_counts`` [S, 5] int32: AlignStats counts (positions, one_to_one, matched, fallback, empty).

    ``align.use_vocab_map`` uses the maps of ``fusejax vocab-map`` (``soft``; built here when missing), else
    ``hard``. Process i of n (fusejax.distributed settings) writes a contiguous slice of the blocks; a rerun
    resumes; top-k stores built for another corpus, tokenizer or k are refused. Writes the per-source rates
    to ``<run.output_dir>/aligned_summary.json`` and returns them.
    """
    from fusejax.config import save_resolved
    from fusejax.distributed import process_slice
    from fusejax.store import Field, StoreError, StoreWriter, open_store, write_json
    from fusejax.tokenizer import encode_block, load_tokenizer, tokenizer_fingerprint

    names = _source_names(cfg)
    out = Path(cfg.run.output_dir)
    k = cfg.represent.k
    corpus = open_store(out / "corpus", verify=True)
    _check_meta(corpus, "kind", corpus.kind, "corpus", "the corpus store")
    tgt_tok = load_tokenizer(cfg.target.tokenizer_path)
    target_fp = tokenizer_fingerprint(tgt_tok)
    _check_meta(corpus, "tokenizer_fingerprint", corpus.meta.get("tokenizer_fingerprint"), target_fp,
                f"the target tokenizer {cfg.target.tokenizer_path}")
    src_toks, stores, maps, fingerprints = [], [], [], []
    for name, source in zip(names, cfg.sources):
        tok = load_tokenizer(source.tokenizer_path)
        fp = tokenizer_fingerprint(tok)
        store = open_store(out / "represent" / name, verify=True)
        _check_meta(store, "kind", store.kind, "topk", f"the top-k store of source {name!r}")
        _check_meta(store, "tokenizer_fingerprint", store.meta.get("tokenizer_fingerprint"), fp,
                    f"the tokenizer {source.tokenizer_path} of source {name!r}")
        _check_meta(store, "k", store.meta.get("k"), k, "represent.k")
        _check_meta(store, "corpus", store.meta.get("corpus"), corpus.meta, f"the corpus store {corpus.path}")
        if cfg.align.use_vocab_map:
            if _load_vocab_map(cfg, name, fp, target_fp) is None:
                run_vocab_maps(cfg)
            maps.append(_load_vocab_map(cfg, name, fp, target_fp))
        else:
            maps.append(None)
        src_toks.append(tok)
        stores.append(store)
        fingerprints.append(fp)

    S = len(names)
    fields = [
        Field("input_ids", "int32", (), ragged=True),
        Field("table_ids", "int32", (S, k), ragged=True),
        Field("table_logits", "float32", (S, k), ragged=True),
        Field("seq_ce", "float32", (S,)),
        Field("token_ce", "float32", (S,), ragged=True),
        Field("byte_ce", "float32", (S,)),
        Field("n_bytes", "int32"),
        Field("split", "uint8"),
        Field("skip", "bool"),
        Field("align_counts", "int32", (S, len(_COUNTS))),
    ]
    meta = {
        "sources": names,
        "source_fingerprints": fingerprints,
        "target_fingerprint": target_fp,
        "k": k,
        "mode": cfg.align.mode,
        "fallback": cfg.align.fallback,
        "vocab_map": {key: getattr(cfg.vocab_map, key) for key in ("method", "mode", "co_occurrence")}
        if cfg.align.use_vocab_map
        else None,
        "corpus": corpus.meta,
    }
    process, processes = _process_slot()
    start, stop = process_slice(len(corpus), process, processes)
    path = out / "aligned"
    with StoreWriter(path, kind=ALIGNED_KIND, meta=meta, fields=fields, rows_per_shard=cfg.represent.shard_size,
                     process_index=process) as writer:
        done = writer.completed_ids()
        if len(done) and not np.array_equal(done, [corpus.row(i)["id"] for i in range(start, start + len(done))]):
            raise StoreError(f"{path}: stored blocks do not follow the corpus {corpus.path}")
        t = _vocab(tgt_tok)
        for position in range(start + len(done), stop):
            block = corpus.row(position)
            tgt = np.asarray(encode_block(tgt_tok, block["text"].decode("utf-8")), np.int32)
            n_bytes = int(block["n_bytes"])
            T = tgt.size
            table_ids = np.full((T, S, k), -1, np.int32)
            table_logits = np.zeros((T, S, k), np.float32)
            token_ce = np.zeros((T, S), np.float32)
            seq_ce, byte_ce = np.zeros(S, np.float32), np.zeros(S, np.float32)
            counts = np.zeros((S, len(_COUNTS)), np.int32)
            skip = False
            for n, (name, tok, store, vmap) in enumerate(zip(names, src_toks, stores, maps)):
                try:
                    row = store.get(block["id"])
                except KeyError:
                    raise StoreError(f"{store.path}: block {block['id']} of the corpus is missing (source {name!r})")
                src = np.asarray(row["input_ids"], np.int64)
                top_ids = np.asarray(row["topk_ids"])
                top_logits = np.asarray(row["topk_logits"], np.float32)
                ce = np.asarray(row["token_ce"], np.float32)
                if top_ids.shape != (src.size, k) or ce.shape != (src.size,):
                    raise StoreError(
                        f"{store.path}: block {block['id']} has {src.size} input_ids but topk_ids {top_ids.shape} "
                        f"and token_ce {ce.shape}"
                    )
                s = _vocab(tok)
                partner = align_tokens(tok, src, tgt_tok, tgt, mode=cfg.align.mode)
                ids, logits, stats = _project(s, t, src, tgt.astype(np.int64), top_ids, top_logits, partner, vmap,
                                              cfg.align.fallback, cfg.align.mode, None)
                table_ids[:, n], table_logits[:, n] = ids, logits
                seq_ce[n] = row["seq_ce"]
                token_ce[:, n] = np.where(partner >= 0, ce[np.maximum(partner, 0)], seq_ce[n])
                byte_ce[n] = ce.sum(dtype=np.float64) / max(n_bytes, 1)
                counts[n] = dataclasses.astuple(stats)
                skip |= int(row["nonfinite"]) > 0
            writer.add(
                int(block["id"]), input_ids=tgt, table_ids=table_ids, table_logits=table_logits, seq_ce=seq_ce,
                token_ce=token_ce, byte_ce=byte_ce, n_bytes=n_bytes, split=block["split"], skip=skip,
                align_counts=counts,
            )
    if process != 0:  # process 0 writes the summary, from the shards complete at that time
        return {}
    summary = {**_aligned_summary(path, names), "corpus_blocks": len(corpus)}
    write_json(out / "aligned_summary.json", summary)
    save_resolved(cfg, path)
    return summary
