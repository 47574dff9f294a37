"""Corpus preparation: local documents -> blocks of at most ``block_size`` target tokens in a store.

Host-only (no JAX). :func:`prepare_corpus` reads documents one at a time, cuts each into blocks of text and
writes them to a store of kind ``"corpus"`` (see :mod:`fusejax.store`). Every later stage (source top-k,
alignment, training) tokenizes exactly a block's ``text``, so all models see the same characters.

Inputs (``fmt="auto"`` decides per path; a folder that is no dataset is searched recursively, sorted, for
``.txt`` / ``.jsonl`` / ``.parquet`` files, hidden ones ignored; a FIFO, socket or device, given or found, is
refused before it is opened):

* ``.txt``: the whole file is one document (``txt_split="file"``), or each run of non-blank lines is one
  (``txt_split="blank_line"``; a blank line is empty or whitespace-only; the last line ending is dropped);
* ``.jsonl``: one JSON object per line, the document in ``text_field``;
* ``.parquet``: column ``text_field`` (string or binary);
* a Hugging Face ``datasets.save_to_disk`` folder (``state.json``, or ``dataset_dict.json`` + one folder
  per split), read from its Arrow files with pyarrow, splits in the listed order;
* a TFDS prepared folder (``features.json`` + ``dataset_info.json``), through
  ``tfds.builder_from_directory(...).as_data_source()``, splits sorted (needs the ``tfds`` extra);
* ``fmt="chat"``: conversations in ``.jsonl`` files or ``save_to_disk`` folders, cut at turn boundaries
  (:func:`_chat_blocks`, :mod:`fusejax.chat`; docs/chat.md): a block's ``text`` is the JSON of its messages.

Document ids: ``<name>:<index>``, where ``<name>`` is the path relative to the folder that holds the given
input (plus ``/<split>`` for datasets) and ``<index>`` the 0-based record / line / blank-line-block index.

Bad documents are skipped and counted by reason in the summary, never dropped silently: ``empty``
(empty, whitespace-only or null), ``invalid_utf8`` (bytes that are not UTF-8, or a string with lone
surrogates), ``invalid_json`` (a ``.jsonl`` line that is not a JSON object). The first ``max_warnings``
are logged with file and record. A record without ``text_field`` or with a non-text value raises.

Cutting: the document is tokenized once with character offsets; a block ends where a token ends, never
inside a character (tokens whose offsets overlap are not separated). Characters no token's offsets cover
(whitespace that byte-level tokenizers trim from offsets) go to the next block, whose first token they
usually lead. Blocks cover the document exactly: block ``k`` is ``text[start_k:end_k]``,
``end_k = start_{k+1}``, the last one ends at the end of the text. Among the last ``boundary_window`` token
boundaries before the limit (at most half the block), a cut right after a newline is preferred, then one next
to whitespace, the latest one in each class.
Each block is then tokenized on its own (tokenization is not concatenation-stable); if it has more than
``block_size`` tokens the cut moves back by the excess and is retried. ``n_tokens`` is that count.

Store fields: ``id`` (int64 block id: the first 8 bytes, little-endian signed, of
``sha256(f"{doc_id}\\0{start}\\0{end}")``),
``doc_id`` (str), ``span`` (int64 [2], start/end in Unicode code points of the document), ``text`` (UTF-8
bytes), ``n_tokens`` (int32), ``n_bytes`` (int64), ``split`` (uint8 index into ``SPLITS``). A document
goes wholly to ``heldout`` when the hash of (seed, document id) falls below ``holdout_fraction``.

Resume / idempotence: the store meta holds the target tokenizer fingerprint, the cutting parameters and
the inputs (name, format, size in bytes, ``sha256``: :func:`input_fingerprint` of the contents); a rerun with
other values is refused (:class:`fusejax.store.StoreMismatchError` naming the key), so an input edited in
place, even to the same size and modification time, is refused, not mixed into the old blocks. Refused, not
redone: a store never deletes rows, and the blocks already written may have been read by later stages (their
stores embed this meta); ``fusejax run`` moves the old folder aside instead, or remove it. A rerun reads the inputs
again but does not tokenize documents whose blocks are all complete, checks that regenerated blocks of
the last complete document match the stored ids, and writes only the missing blocks; an interrupted and
resumed run gives a byte-identical store.

Memory: one document, one shard of blocks and the tokenization of one *window* of the document. Tokenizing
a whole document at once costs ~300 bytes per code point (offsets, ids and the tokenizer's own encoding: a
50 MB single-line file peaked at 12.7 GB), so :func:`split_document` tokenizes ``text[a:b]`` windows of
``PIECE_CHARS`` (65,536) code points, starting ``PIECE_CONTEXT`` (1,024) code points before the next block,
and cuts blocks from a window only while every token they look at ends at least ``PIECE_CONTEXT`` code
points before the window's end (tokens next to a cut-off edge may differ from the whole text's); then it
tokenizes the next window. A window grows (doubles) only when one block and its context do not fit, i.e.
when ``block_size`` tokens span more code points. The bound for one document of ``n`` UTF-8 bytes is thus
its bytes and its ``str`` (at most 5n, plus an n-byte copy while checking it), its block list and ~20 MiB
for a window; tested: cutting a 1 MiB single-line document grows the peak RSS by a few MiB (was ~300 MiB).
A document of at most ``PIECE_CHARS`` code points is one window, tokenized once as before; longer ones
give the same blocks as one tokenization of the whole text wherever tokens more than ``PIECE_CONTEXT`` code
points from an edge do not depend on the edge (tested with byte-level BPE, Llama, GPT-2, GPT-NeoX and
OpenLLaMA tokenizers).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusejax import chat
from fusejax.config import Config
from fusejax.files import write_json
from fusejax.schema import CORPUS_FIELDS, CORPUS_KIND, SPLITS, RunLayout
from fusejax.store import StoreError, StoreWriter, open_store

log = logging.getLogger(__name__)

FORMATS = ("txt", "jsonl", "parquet", "hf_disk", "tfds")
_SUFFIX_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_SAFE_NAME = re.compile(r"[^/\\]+\Z")
PIECE_CHARS = 1 << 16  # code points of a document tokenized at once when cutting it (see "Memory")
PIECE_CONTEXT = 1 << 10  # code points next to a window's cut-off edges whose tokens are not used


@dataclass(frozen=True)
class _Input:
    path: Path
    name: str  # relative name used in document ids
    fmt: str


@dataclass
class _Record:
    doc_id: str
    value: Any  # str, bytes, None, or a _Skip reason
    where: str  # file and record for messages


class _Skip(str):
    """A reader-level skip reason (e.g. invalid JSON) passed in place of a value."""


def block_id(doc_id: str, start: int, end: int) -> int:
    """Stable int64 id of the block ``[start, end)`` (code points) of document ``doc_id``."""
    digest = hashlib.sha256(f"{doc_id}\x00{start}\x00{end}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
    """Whether document ``doc_id`` goes to the held-out split (deterministic in seed and id)."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _offsets(tokenizer, text: str, a: int, b: int) -> tuple[list[int], list[int]]:
    """Token start and end offsets (code points of ``text``) of ``text[a:b]`` tokenized on its own."""
    try:
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as err:
        raise TypeError(f"{type(tokenizer).__name__}: corpus preparation needs a fast tokenizer with offsets") from err
    return [a + s for s, _ in enc["offset_mapping"]], [a + e for _, e in enc["offset_mapping"]]


def split_document(text: str, tokenizer, block_size: int, *, boundary_window: int = 32,
                   piece_chars: int = PIECE_CHARS) -> list[tuple[int, int, int]]:
    """Cut ``text`` into blocks of <= ``block_size`` tokens of ``tokenizer`` (rules in the module docstring).

    Returns ``[(start, end, n_tokens)]``: code-point spans covering the text in order, and each block's
    token count when tokenized alone (no special tokens). Raises ValueError if no valid cut exists.
    ``piece_chars``: the text is tokenized in windows of this many code points (more where a block needs it).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    def score(j: int) -> int:
        """2: the cut follows a newline; 1: it touches whitespace; 0: otherwise."""
        p = ends[j - 1]
        return 2 if text[p - 1] == "\n" else int(text[p - 1].isspace() or text[p].isspace())

    def cut(c: int, i: int, hi: int) -> tuple[int, int]:
        """Token index j in (i, i + hi] and char position p of the cut ending a block that starts at (c, i)."""
        if i + hi == n:
            return n, len(text)
        window_lo = i + hi - min(boundary_window, hi // 2)
        best = None
        for j in range(i + hi, i, -1):
            if c < ends[j - 1] <= starts[j]:  # a boundary between characters
                if j <= window_lo:
                    best = best or j  # nothing valid in the window: the latest valid boundary
                    break
                if best is None or score(j) > score(best):
                    best = j
        if best is None:
            raise ValueError(
                f"cannot cut a block of <= {block_size} tokens at character {c}: no token boundary between "
                f"characters in the next {hi} tokens (block_size too small for this text)"
            )
        return best, ends[best - 1]

    blocks: list[tuple[int, int, int]] = []
    c, piece = 0, piece_chars
    while c < len(text):
        # tokenize the window text[a:b]; its tokens within PIECE_CONTEXT of a cut-off edge may differ from the
        # whole text's, so blocks are cut here only while the tokens they look at end before `safe`
        a = max(0, c - PIECE_CONTEXT) if c else 0
        b = min(len(text), a + piece)
        starts, ends = _offsets(tokenizer, text, a, b)
        n = len(starts)
        i = 0 if c == 0 else 1 + max((k for k in range(n) if ends[k] <= c), default=-1)
        safe = b if b == len(text) else b - PIECE_CONTEXT
        done = len(blocks)
        while c < len(text) and (b == len(text) or (i + block_size < n and ends[i + block_size] <= safe)):
            hi = min(block_size, n - i)
            while True:
                j, p = cut(c, i, hi)
                m = _count_tokens(tokenizer, text[c:p])
                if m <= block_size:
                    break
                hi = (j - i) - max(1, m - block_size)  # on its own the block has more tokens: move the cut back
                if hi < 1:
                    raise ValueError(
                        f"cannot cut a block of <= {block_size} tokens at character {c}: even one token's text "
                        f"tokenizes to {m} tokens on its own"
                    )
            blocks.append((c, p, m))
            c, i = p, j
        if len(blocks) == done and c < len(text):
            piece *= 2  # the window does not hold the next block and its context on both sides
    return blocks


def _expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], fmt: str) -> list[_Input]:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt {fmt!r} is not 'auto' or one of {FORMATS}")
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not paths:
        raise ValueError("prepare_corpus: no inputs given")
    out: list[_Input] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"corpus input {path} does not exist")
        base_name = path.resolve().name
        kind = _dataset_kind(path) if path.is_dir() else None
        if path.is_dir() and (fmt in ("hf_disk", "tfds") or (fmt == "auto" and kind)):
            out.append(_Input(path, base_name, fmt if fmt != "auto" else kind))
        elif path.is_dir():
            files = sorted(
                _regular_file(p) for p in path.rglob("*")
                if not p.is_dir()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and _SUFFIX_FORMATS.get(p.suffix) in ((fmt,) if fmt != "auto" else FORMATS)
            )
            if not files:
                raise ValueError(f"corpus input folder {path} holds no .txt/.jsonl/.parquet files for fmt={fmt!r}")
            out += [
                _Input(p, f"{base_name}/{p.relative_to(path).as_posix()}", _SUFFIX_FORMATS[p.suffix]) for p in files
            ]
        else:
            file_fmt = fmt if fmt != "auto" else _SUFFIX_FORMATS.get(path.suffix)
            if file_fmt not in ("txt", "jsonl", "parquet"):
                raise ValueError(
                    f"corpus input {path}: cannot tell the format from suffix {path.suffix!r} "
                    f"(fmt={fmt!r}; files must be .txt, .jsonl or .parquet)"
                )
            out.append(_Input(_regular_file(path), base_name, file_fmt))
    names = Counter(inp.name for inp in out)
    dups = sorted(name for name, k in names.items() if k > 1)
    if dups:
        raise ValueError(f"corpus inputs have the same relative names {dups}; document ids would collide")
    return out


def _regular_file(path: Path) -> Path:
    """``path``, if it is a regular file (or a link to one): reading a FIFO or device could block forever."""
    if not path.is_file():
        raise ValueError(f"corpus input {path} is not a regular file (a FIFO, socket, device or broken link)")
    return path


def _dataset_kind(folder: Path) -> str | None:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return "hf_disk"
    if (folder / "features.json").is_file() and (folder / "dataset_info.json").is_file():
        return "tfds"
    return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file())


def input_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex of a corpus input's contents: a file's bytes; for a folder (a dataset), the relative name
    (POSIX) and the sha256 of the bytes of every file under it, sorted by name. Reads every byte once, in 1 MiB
    chunks (about as long as prepare takes to read it again); never modification times."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [[p.relative_to(path).as_posix(), input_fingerprint(p)] for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _read_txt(inp: _Input, txt_split: str) -> Iterator[_Record]:
    if txt_split == "file":
        yield _Record(f"{inp.name}:0", inp.path.read_bytes(), f"{inp.path}")
        return
    index, lines = 0, []
    with open(inp.path, "rb") as f:
        for line in itertools.chain(f, [b"\n"]):  # a final blank line closes the last block
            if line.strip():
                lines.append(line)
            elif lines:
                doc = b"".join(lines)
                doc = doc[:-2] if doc.endswith(b"\r\n") else doc.removesuffix(b"\n")
                yield _Record(f"{inp.name}:{index}", doc, f"{inp.path} block {index}")
                index, lines = index + 1, []


def _text_of(obj: dict, field: str, where: str) -> Any:
    if field not in obj:
        raise KeyError(f"{where}: no field {field!r} (fields: {sorted(obj)[:20]}); set text_field")
    return obj[field]


def _read_jsonl(inp: _Input, text_field: str | None) -> Iterator[_Record]:
    """Records of a ``.jsonl`` file: the value of ``text_field`` of each object (None: the whole object)."""
    with open(inp.path, "rb") as f:
        for index, line in enumerate(f):
            where = f"{inp.path} line {index + 1}"
            doc_id = f"{inp.name}:{index}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield _Record(doc_id, _Skip("invalid_utf8"), where)
                continue
            except ValueError:
                yield _Record(doc_id, _Skip("invalid_json" if line.strip() else "empty"), where)
                continue
            if not isinstance(obj, dict):
                yield _Record(doc_id, _Skip("invalid_json"), where)
                continue
            yield _Record(doc_id, _text_of(obj, text_field, where) if text_field else obj, where)


def _arrow_column(batch, field: str, where: str):
    import pyarrow as pa

    if field not in batch.schema.names:
        raise KeyError(f"{where}: no column {field!r} (columns: {batch.schema.names}); set text_field")
    column = batch.column(batch.schema.get_field_index(field))
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise TypeError(f"{where}: column {field!r} has type {column.type}, expected string or binary")
    return column.to_pylist()


def _read_parquet(inp: _Input, text_field: str) -> Iterator[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(inp.path)
        if text_field not in pf.schema_arrow.names:
            raise KeyError(f"{inp.path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); set text_field")
        index = 0
        for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
            for value in _arrow_column(batch, text_field, str(inp.path)):
                yield _Record(f"{inp.name}:{index}", value, f"{inp.path} row {index}")
                index += 1
    except pa.ArrowException as err:  # truncated or corrupt file
        raise ValueError(f"{inp.path}: not a readable parquet file: {err}") from None


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read JSON: {err}") from None


def _safe_child(folder: Path, name: Any, what: str) -> Path:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{folder}: invalid {what} name {name!r}")
    return folder / name


def _read_hf(inp: _Input, text_field: str | None) -> Iterator[_Record]:
    """Records of a ``save_to_disk`` dataset: the column ``text_field`` (None: each row as a dict)."""
    import pyarrow as pa

    if (inp.path / "dataset_dict.json").is_file():
        splits = _read_json_file(inp.path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list):
            raise ValueError(f"{inp.path / 'dataset_dict.json'}: no 'splits' list")
        parts = [(_safe_child(inp.path, s, "split"), f"{inp.name}/{s}") for s in splits]
    else:
        parts = [(inp.path, inp.name)]
    for folder, name in parts:
        state = _read_json_file(folder / "state.json")
        files = [_safe_child(folder, f.get("filename") if isinstance(f, dict) else f, "data file")
                 for f in state.get("_data_files", [])]
        if not files:
            raise ValueError(f"{folder / 'state.json'}: no _data_files")
        index = 0
        for path in files:
            with pa.memory_map(str(path)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                    batches = iter(reader)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
                for batch in batches:
                    values = _arrow_column(batch, text_field, str(path)) if text_field else batch.to_pylist()
                    for value in values:
                        yield _Record(f"{name}:{index}", value, f"{path} row {index}")
                        index += 1


def _read_tfds(inp: _Input, text_field: str) -> Iterator[_Record]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            f"corpus input {inp.path} is a TFDS folder: install the extra with `pip install 'fusejax[tfds]'`"
        ) from None
    sources = tfds.builder_from_directory(str(inp.path)).as_data_source()
    for split in sorted(sources):
        source = sources[split]
        for index in range(len(source)):
            where = f"{inp.path} split {split} record {index}"
            yield _Record(f"{inp.name}/{split}:{index}", _text_of(source[index], text_field, where), where)


def _records(inp: _Input, text_field: str, txt_split: str) -> Iterator[_Record]:
    if inp.fmt == "txt":
        return _read_txt(inp, txt_split)
    if inp.fmt == "jsonl":
        return _read_jsonl(inp, text_field)
    if inp.fmt == "parquet":
        return _read_parquet(inp, text_field)
    if inp.fmt == "hf_disk":
        return _read_hf(inp, text_field)
    return _read_tfds(inp, text_field)


def _decode(record: _Record) -> tuple[str | None, str | None]:
    """(text, None) for a good document, (None, skip reason) for a bad one."""
    value = record.value
    if isinstance(value, _Skip):
        return None, str(value)
    if value is None:
        return None, "empty"
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(value, str):
        raise TypeError(f"{record.where}: document is a {type(value).__name__}, expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    return (value, None) if value.strip() else (None, "empty")


def prepare_corpus(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    block_size: int,
    fmt: str = "auto",
    text_field: str = "text",
    txt_split: str = "file",
    holdout_fraction: float = 0.0,
    seed: int = 0,
    boundary_window: int = 32,
    rows_per_shard: int = 4096,
    max_warnings: int = 20,
    process_index: int = 0,
    num_processes: int = 1,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Read ``inputs``, cut documents into blocks of <= ``block_size`` target tokens, write a corpus store.

    ``tokenizer``: a transformers fast tokenizer or a tokenizer folder (``fusejax.tokenizer.load_tokenizer``).
    Process ``process_index`` of ``num_processes`` (separate jobs or JAX processes sharing ``out_dir``) cuts
    every ``num_processes``-th document, starting at its index, and writes its own shards; readers combine
    them. Returns ``{"documents", "skipped": {reason: n}, "blocks", "tokens", "bytes", "heldout_blocks",
    "resumed_blocks"}``: documents, skipped and resumed_blocks are this process's, the rest count the whole
    store as it stands (see :func:`corpus_totals`).

    ``fmt="chat"``: conversations (:mod:`fusejax.chat`; ``chat_template``: a Jinja file for a tokenizer without
    one), see :func:`_chat_blocks`; the summary adds this process's ``"cut_turns"`` and ``"dropped_turns"`` (turns
    longer than the block: answer cut, or dropped), also logged as one warning line.
    """
    from fusejax.tokenizer import load_tokenizer, tokenizer_fingerprint

    if txt_split not in ("file", "blank_line"):
        raise ValueError(f"txt_split must be 'file' or 'blank_line', got {txt_split!r}")
    if not 0.0 <= holdout_fraction <= 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    tok = chat.chat_tokenizer(tokenizer, chat_template, "target") if fmt == "chat" else load_tokenizer(tokenizer)
    found = _expand_inputs(inputs, "auto" if fmt == "chat" else fmt)
    meta = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "block_size": block_size,
        "boundary_window": boundary_window,
        "text_field": text_field,
        "txt_split": txt_split,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "splits": list(SPLITS),
        "inputs": [{"name": inp.name, "format": inp.fmt, "bytes": _size(inp.path),
                    "sha256": input_fingerprint(inp.path)} for inp in found],
    }
    if fmt == "chat":
        meta["chat_template"] = chat.template_hash(tok)
        blocks, cut = _chat_blocks(found, tok, block_size, holdout_fraction, seed, process_index, num_processes)
        if cut["cut_turns"] or cut["dropped_turns"]:
            log.warning("corpus.block_size=%d: %d turn(s) too long had their answer cut to fit, %d turn(s) whose "
                        "prompt alone does not fit were dropped", block_size, cut["cut_turns"], cut["dropped_turns"])
        with StoreWriter(out_dir, kind=CORPUS_KIND, meta=meta, fields=CORPUS_FIELDS, rows_per_shard=rows_per_shard,
                         process_index=process_index) as writer:
            done = writer.completed_ids()
            if not np.array_equal(done, [bid for bid, _ in blocks[:len(done)]]):
                raise StoreError(f"{out_dir}: its blocks were cut from other conversations")
            for bid, fields in blocks[len(done):]:
                writer.add(bid, **fields)
        return {"documents": len({f["doc_id"] for _, f in blocks}), "skipped": {}, **cut, **corpus_totals(out_dir),
                "resumed_blocks": len(done)}
    skipped: Counter[str] = Counter()
    documents = 0
    ordinal = -1
    with StoreWriter(out_dir, kind=CORPUS_KIND, meta=meta, fields=CORPUS_FIELDS, rows_per_shard=rows_per_shard,
                     process_index=process_index) as writer:
        resumed = writer.num_rows
        last_doc, pending = _resume_point(out_dir, writer.completed_ids())
        for inp in found:
            for record in _records(inp, text_field, txt_split):
                ordinal += 1
                if ordinal % num_processes != process_index:  # another process's document
                    continue
                text, reason = _decode(record)
                if reason:
                    skipped[reason] += 1
                    if sum(skipped.values()) <= max_warnings:
                        log.warning("skipping %s document at %s", reason, record.where)
                    continue
                documents += 1
                if last_doc is not None:  # resuming: documents before the last complete one are done
                    if record.doc_id != last_doc:
                        continue
                    last_doc = None
                split = SPLITS.index("heldout" if is_heldout(record.doc_id, seed, holdout_fraction) else "train")
                for start, end, n_tokens in split_document(text, tok, block_size, boundary_window=boundary_window):
                    bid = block_id(record.doc_id, start, end)
                    if pending:  # complete blocks of the last resumed document
                        stored = pending.popleft()
                        if stored != bid:
                            raise StoreError(
                                f"{out_dir}: a stored block of {record.doc_id} has id {stored}, the inputs now "
                                f"give {bid} ({record.where}); the store was written from other data"
                            )
                        continue
                    data = text[start:end].encode("utf-8")
                    writer.add(
                        bid, doc_id=record.doc_id, span=np.array([start, end], np.int64), text=data,
                        n_tokens=n_tokens, n_bytes=len(data), split=split,
                    )
        if last_doc is not None or pending:
            raise StoreError(
                f"{out_dir}: holds {resumed} blocks up to document {last_doc!r} that the inputs do not reproduce"
            )
    if sum(skipped.values()) > max_warnings:
        log.warning("%d more skipped documents not logged", sum(skipped.values()) - max_warnings)
    return {"documents": documents, "skipped": dict(sorted(skipped.items())), **corpus_totals(out_dir),
            "resumed_blocks": resumed}


def _chat_blocks(found: list[_Input], tok, block_size: int, holdout_fraction: float, seed: int,
                 process_index: int, num_processes: int) -> tuple[list[tuple[int, dict]], Counter[str]]:
    """Every block of this process's conversations as ``(block id, store fields)``, all checked before a row is
    written, and the counts of turns cut and dropped to fit ``block_size``: a block is a run of messages cut at
    turn boundaries (:func:`fusejax.chat.split_conversation`), ``text`` their JSON (a cut answer stored cut),
    ``span`` their message range, ``n_tokens`` the rendered tokens, ``n_bytes`` the UTF-8 bytes of the assistant
    content. Inputs are ``.jsonl`` files or ``save_to_disk`` datasets; a bad record is an error naming its file
    and line or row (no skipping: a conversation is kept whole or not at all)."""
    blocks, ordinal, counts = [], -1, Counter({"cut_turns": 0, "dropped_turns": 0})
    for inp in found:
        if inp.fmt not in ("jsonl", "hf_disk"):
            raise ValueError(f"corpus input {inp.path}: corpus.format chat reads .jsonl files and datasets "
                             f"saved with save_to_disk, not {inp.fmt}")
        for record in (_read_jsonl if inp.fmt == "jsonl" else _read_hf)(inp, None):
            if isinstance(record.value, _Skip) and record.value == "empty":
                continue
            ordinal += 1
            if ordinal % num_processes != process_index:
                continue
            if isinstance(record.value, _Skip):
                raise ValueError(f"{record.where}: {record.value} (expected one JSON conversation per line)")
            messages = chat.messages_of(record.value, record.where)
            split = SPLITS.index("heldout" if is_heldout(record.doc_id, seed, holdout_fraction) else "train")
            runs, cut = chat.split_conversation(messages, tok, block_size, record.where)
            counts.update(cut)
            for first, end, part in runs:
                data = json.dumps(part, ensure_ascii=False).encode("utf-8")
                blocks.append((block_id(record.doc_id, first, end), dict(
                    doc_id=record.doc_id, span=np.array([first, end], np.int64), text=data,
                    n_tokens=len(chat.encode(tok, part, record.where)[0]), n_bytes=chat.assistant_bytes(part),
                    split=split)))
    return blocks, counts


def corpus_totals(out_dir: str | os.PathLike) -> dict[str, int]:
    """``{"blocks", "tokens", "bytes", "heldout_blocks"}`` over every complete shard of the corpus store."""
    store = open_store(out_dir)
    totals = Counter()
    for shard in store.shards:
        totals["tokens"] += int(np.sum(shard.column("n_tokens"), dtype=np.int64))
        totals["bytes"] += int(np.sum(shard.column("n_bytes"), dtype=np.int64))
        totals["heldout"] += int(np.count_nonzero(shard.column("split") == SPLITS.index("heldout")))
    return {"blocks": len(store), "tokens": totals["tokens"], "bytes": totals["bytes"],
            "heldout_blocks": totals["heldout"]}


def _resume_point(out_dir: str | os.PathLike, done: np.ndarray) -> tuple[str | None, deque[int]]:
    """Document id of this writer's last complete block and the ids of that document's complete blocks, in
    order; ``done``: the writer's completed ids in write order."""
    if not len(done):
        return None, deque()
    store = open_store(out_dir)
    last = store.get(int(done[-1]))["doc_id"]
    first = len(done) - 1
    while first > 0 and store.get(int(done[first - 1]))["doc_id"] == last:
        first -= 1
    return last, deque(int(i) for i in done[first:])


def run(cfg: Config) -> dict[str, Any]:
    """Stage ``prepare``: the corpus store at ``<run.output_dir>/corpus`` cut with the target's tokenizer.

    Every JAX process cuts its share of the documents (see :func:`prepare_corpus`; ``run.output_dir`` must be
    on a file system every host sees); after a barrier, process 0 writes ``corpus/summary.json`` with the
    whole store's totals. Returns that summary (``documents`` and ``skipped`` are this process's).
    """
    import jax

    from fusejax.config import save_resolved
    from fusejax.distributed import barrier, is_main_process

    c = cfg.corpus
    if not c.inputs:
        raise ValueError("corpus.inputs is empty: list the files or folders to read")
    out = RunLayout.of(cfg).corpus
    summary = prepare_corpus(
        list(c.inputs), cfg.target.tokenizer_path, out, block_size=c.block_size, fmt=c.format,
        text_field=c.text_field, txt_split=c.txt_split, holdout_fraction=c.holdout_fraction, seed=cfg.run.seed,
        process_index=jax.process_index(), num_processes=jax.process_count(), chat_template=cfg.target.chat_template,
    )
    barrier("prepare")
    summary.update(corpus_totals(out))
    if summary["blocks"] == 0:
        raise ValueError(f"corpus.inputs {list(c.inputs)} gave no blocks (skipped documents: {summary['skipped']})")
    if is_main_process():
        save_resolved(cfg, out)
        write_json(out / "summary.json", summary)
    return summary
