"""Vocabulary maps: every source token id -> one target token id (host side: numpy + numba, never JAX).

In: a source and a target tokenizer (anything :meth:`fusejax.vocab.Vocab.of` takes). Out: int32 ``target_ids``
and ``distances`` [|V_source|] (:func:`vocab_map`) and their rates (:func:`vocab_map_summary`); as the
``fusejax vocab-map`` stage (:func:`run`), one stored map per source of a run.

The rules compare the strings of each ``mode`` (:mod:`fusejax.vocab`):

``exact``: the target token that reads the same. ``reference``: the source token with its marker replaced by
  the target's marker is the target token string; ``default``: both spell the same bytes (where several target
  tokens do, the one that is not a byte-fallback token wins, then the lowest id).
``mined`` (MinED): the ``exact`` token where there is one, else the target token at the smallest Levenshtein
  distance (``reference``: between the marker-replaced source string and the raw target string; ``default``:
  between the spelled bytes), lowest id on ties (with ``co_occurrence``: the tied target seen most often with
  the source token). The search is exact but skips most pairs: :func:`fusejax.align_kernels.nearest_tokens`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fusejax import align_kernels as K
from fusejax.config import Config, save_resolved
from fusejax.dtw import align_tokens
from fusejax.files import atomic_write, write_json
from fusejax.schema import RunLayout
from fusejax.store import open_store
from fusejax.vocab import BYTE_FALLBACK, Vocab, check_mode

METHODS = ("mined", "exact")


def _write_npz(path: Path, **arrays) -> None:
    """Write ``arrays`` to the .npz file ``path`` atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _map_strings(s: Vocab, t: Vocab, mode: str) -> tuple[list[str], list[str], dict[str, int]]:
    """(source keys, target keys, target key -> preferred target id) compared by the vocab map."""
    if mode == "reference":
        keys_s = [tok.replace(s.marker, t.marker) for tok in s.tokens]
        return keys_s, t.tokens, t.vocab
    keys_s = [b.decode("latin-1") for b in s.texts]  # one character per byte
    keys_t = [b.decode("latin-1") for b in t.texts]
    prefer = {}
    # several target tokens can spell the same bytes (byte-fallback "<0x41>" and "A"): prefer the token that
    # is not a byte-fallback token, then the lowest id
    order = sorted(range(t.size), key=lambda i: (BYTE_FALLBACK.fullmatch(t.tokens[i]) is not None, i))
    for i in order:
        prefer.setdefault(keys_t[i], i)
    return keys_s, keys_t, prefer


def exact_ids(s: Vocab, t: Vocab, mode: str) -> np.ndarray:
    """int32 [|V_source|]: the target id reading / spelling the same as each source token, else -1 (kept in
    ``s.tables``)."""
    key = ("exact", t, mode)
    if key not in s.tables:
        keys_s, _, lookup = _map_strings(s, t, mode)
        s.tables[key] = np.array([lookup.get(k, -1) for k in keys_s], np.int32)
    return s.tables[key].copy()


def _cache_path(cache_dir, s: Vocab, t: Vocab, method: str, mode: str, co_occurrence) -> Path:
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


def _co_occurrence_table(co_occurrence, n_source: int, n_target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source_ids, target_ids, counts) arrays -> summed counts by source id: (ptr int64 [n_source + 1], target
    ids, float64 counts), source ``r``'s entries at ``ptr[r]:ptr[r + 1]``, target ids ascending."""
    try:
        src, tgt, cnt = (np.asarray(a).ravel() for a in co_occurrence)
    except (TypeError, ValueError) as e:
        raise ValueError("co_occurrence: expected a tuple (source_ids, target_ids, counts) of 1-D arrays") from e
    if not (src.shape == tgt.shape == cnt.shape):
        raise ValueError(f"co_occurrence: arrays of different lengths {src.shape}, {tgt.shape}, {cnt.shape}")
    if src.size and (src.min() < 0 or src.max() >= n_source or tgt.min() < 0 or tgt.max() >= n_target):
        raise ValueError(f"co_occurrence: ids outside the vocabularies ({n_source} source, {n_target} target)")
    pairs, which = np.unique(np.stack([src, tgt]).astype(np.int64).reshape(2, -1), axis=1, return_inverse=True)
    counts = np.bincount(which.ravel(), weights=cnt.astype(np.float64), minlength=pairs.shape[1]).astype(np.float64)
    return np.searchsorted(pairs[0], np.arange(n_source + 1)), pairs[1], counts


def _mined(keys_s: list[str], rows: np.ndarray, keys_t: list[str], co_occurrence, workers: int):
    """(target ids, distances) int32 [len(rows)]: the MinED choice for source keys ``rows`` among all of
    ``keys_t`` (align_kernels.nearest_tokens), on ``workers`` threads (-1: every core)."""

    def codes(keys):
        flat = np.frombuffer("".join(keys).encode("utf-32-le"), np.uint32)
        offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([len(k) for k in keys], out=offsets[1:])
        return flat, offsets

    (flat_s, offs_s), (flat_t, offs_t) = codes(keys_s), codes(keys_t)
    alphabet, dense = np.unique(np.concatenate([flat_s, flat_t]), return_inverse=True)  # codes 0 .. |alphabet|-1
    codes_s, codes_t = np.split(dense.astype(np.int32), [flat_s.size])
    co = co_occurrence or (np.zeros(len(keys_s) + 1, np.int64), np.zeros(0, np.int64), np.zeros(0))
    threads = max(1, min((os.cpu_count() or 1) if workers < 0 else workers, rows.size))

    def part(k):  # every threads-th row from k: long and short tokens spread evenly
        return K.nearest_tokens(codes_s, offs_s, rows[k::threads], codes_t, offs_t, alphabet.size, *co)

    ids, dist = np.empty(rows.size, np.int32), np.empty(rows.size, np.int32)
    with ThreadPoolExecutor(threads) as pool:
        for k, (part_ids, part_dist) in enumerate(pool.map(part, range(threads))):
            ids[k::threads], dist[k::threads] = part_ids, part_dist
    return ids, dist


def vocab_map(
    source_tokenizer,
    target_tokenizer,
    method: str = "mined",
    mode: str = "default",
    co_occurrence=None,
    cache_dir=None,
    workers: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Map every source token to a target token by ``method`` and ``mode`` (rules: the module docstring).

    Returns (target_ids, distances): int32 arrays of length len(source vocab); -1 where unmapped (``exact``).
    ``co_occurrence=(source_ids, target_ids, counts)`` (e.g. counted over aligned 1-to-1 pairs) breaks the
    ``mined`` ties. ``cache_dir``: when given, the map is stored there keyed by both tokenizers' fingerprints
    and reused. ``workers``: threads of the MinED search (-1: every core).
    """
    check_mode(mode)
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    s, t = Vocab.of(source_tokenizer), Vocab.of(target_tokenizer)
    path = None if cache_dir is None else _cache_path(cache_dir, s, t, method, mode, co_occurrence)
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return cached["target_ids"], cached["distances"]
    table = None if co_occurrence is None else _co_occurrence_table(co_occurrence, s.size, t.size)

    target_ids = exact_ids(s, t, mode)
    distances = np.where(target_ids >= 0, 0, -1).astype(np.int32)
    if method == "mined" and t.size:
        keys_s, keys_t, _ = _map_strings(s, t, mode)
        todo = np.flatnonzero(target_ids < 0)
        target_ids[todo], distances[todo] = _mined(keys_s, todo, keys_t, table, workers)
    if path is not None:
        _write_npz(path, target_ids=target_ids, distances=distances)
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


# ------------------------------------------------------------------------------------------------- the stage


def source_names(cfg: Config) -> list[str]:
    """Source names in config order (the config already checked they are unique, safe folder names)."""
    names = [src.name for src in cfg.sources]
    if not names:
        raise ValueError("config: `sources` is empty; the alignment needs at least one source")
    return names


def _meta(cfg: Config, source_fp: str, target_fp: str) -> dict:
    return {"source_fingerprint": source_fp, "target_fingerprint": target_fp, "method": cfg.vocab_map.method,
            "mode": cfg.vocab_map.mode, "co_occurrence": cfg.vocab_map.co_occurrence}


def load_map(cfg: Config, name: str, source_fp: str, target_fp: str) -> np.ndarray | None:
    """The stored map of source ``name`` (int32 [|V_source|]) if it was built for these tokenizer fingerprints
    and settings, else None."""
    path = RunLayout.of(cfg).vocab_map(name)
    if not path.is_file():
        return None
    with np.load(path) as f:
        if json.loads(str(f["meta"])) != _meta(cfg, source_fp, target_fp):
            return None
        return f["target_ids"]


def _co_occurrence(cfg: Config, name: str, s: Vocab, t: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source ids, target ids, counts) of the token pairs that align_tokens pairs 1-to-1 over the corpus."""
    from fusejax.tokenizer import encode_block

    layout = RunLayout.of(cfg)
    corpus, topk = open_store(layout.corpus, verify=True), open_store(layout.topk(name), verify=True)
    pairs = []
    for row in corpus:
        src = np.asarray(topk.get(row["id"])["input_ids"])
        tgt = np.asarray(encode_block(t.tok, row["text"].decode("utf-8")))
        partner = align_tokens(s, src, t, tgt, mode=cfg.vocab_map.mode)
        ok = partner >= 0
        pairs.append(np.stack([src[partner[ok]], tgt[ok]], axis=1))
    found = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    unique, counts = np.unique(found, axis=0, return_counts=True)
    return unique[:, 0], unique[:, 1], counts


def run(cfg: Config) -> dict:
    """The ``fusejax vocab-map`` stage: one map per source onto the target vocabulary.

    Writes ``vocab_maps/<source name>.npz`` under ``run.output_dir`` (``target_ids``, ``distances`` int32
    [|V_source|], ``meta``: both tokenizer fingerprints and the settings; a map with the same meta is reused)
    and ``vocab_maps/summary.json`` (per source: exact-match rate, mean distance, ...). ``vocab_map.
    co_occurrence`` breaks distance ties by 1-to-1 alignment counts over the corpus (needs the top-k stores).
    Returns the summary.
    """
    from fusejax.distributed import is_main_process
    from fusejax.tokenizer import tokenizer_fingerprint

    names = source_names(cfg)
    layout = RunLayout.of(cfg)
    t = Vocab.of(cfg.target.tokenizer_path)
    target_fp = tokenizer_fingerprint(t.tok)
    summary = {}
    for name, source in zip(names, cfg.sources):
        s = Vocab.of(source.tokenizer_path)
        source_fp = tokenizer_fingerprint(s.tok)
        meta = _meta(cfg, source_fp, target_fp)
        path = layout.vocab_map(name)
        if load_map(cfg, name, source_fp, target_fp) is None:
            counts = _co_occurrence(cfg, name, s, t) if cfg.vocab_map.co_occurrence else None
            ids, dist = vocab_map(s, t, method=cfg.vocab_map.method, mode=cfg.vocab_map.mode, co_occurrence=counts)
            _write_npz(path, target_ids=ids, distances=dist, meta=np.array(json.dumps(meta, sort_keys=True)))
        with np.load(path) as f:
            summary[name] = {**vocab_map_summary(f["target_ids"], f["distances"]), **meta}
    if is_main_process():  # every process builds the same maps; one writes the summary
        write_json(layout.vocab_maps / "summary.json", summary)
        save_resolved(cfg, layout.vocab_maps)
    return summary
