"""The spellings of one tokenizer's tokens, as token alignment compares them (host side: numpy, never JAX).

In: a tokenizer (a transformers tokenizer object, or a folder that fusejax.tokenizer.load_tokenizer loads) or
a :class:`Vocab` of one. Out, per token id, what each ``mode`` compares:

``mode="reference"`` (the FuseLLM reference code): the ``convert_ids_to_tokens`` string, added tokens spelled by
  their content (:func:`token_strings`).
  Each tokenizer has a word-start *marker* (``▁`` for SentencePiece-style vocabularies, ``Ġ`` for byte-level
  BPE), detected from the tokenizer itself (:func:`word_start_marker`).

``mode="default"``: the text the token *spells*, as bytes (:func:`token_texts`): byte-level tokens are decoded,
  byte-fallback tokens (``<0x0A>``) become their byte, the marker becomes a space, and special tokens spell a
  role placeholder (``\\xffeos``, ``\\xffbos``, ...), so newlines, non-ASCII text and EOS compare equal across
  tokenizers.

A :class:`Vocab` computes each of these tables on first use and keeps it: build one per tokenizer
(:meth:`Vocab.of`) and pass it wherever a tokenizer is taken.
"""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

MODES = ("reference", "default")
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token; group 1: the byte in hex
# roles whose special tokens spell the same placeholder in every vocabulary (default mode), first role wins
_SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


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
_KEYS: dict = {}  # token string (str or bytes) -> key shared by every vocabulary (see Vocab.keys)


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`MODES`."""
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


class Vocab:
    """The token spellings of one tokenizer ``tok``, each computed on first use and kept.

    ``tables`` keeps what other modules derive from this vocabulary against another one, keyed by what it is
    and that other :class:`Vocab` (the key holds it, so it stays valid as long as the table).
    """

    def __init__(self, tok):
        self.tok = tok
        self.size = len(tok)
        self.tables: dict = {}
        self._codes: dict = {}
        self._keys: dict = {}

    @classmethod
    def of(cls, tokenizer) -> Vocab:
        """``tokenizer`` itself when it is a Vocab, else a new Vocab of the tokenizer object or folder."""
        return tokenizer if isinstance(tokenizer, Vocab) else cls(_load(tokenizer))

    @functools.cached_property
    def tokens(self) -> list[str]:
        """The ``convert_ids_to_tokens`` string of every id ("" where it has none); added tokens are spelled by
        their content (tokenizers 0.23 returns the *normalized* form of those marked ``normalized``, e.g.
        OpenLLaMA's ``▁<unk>`` for ``<unk>``, where the reference saw the content)."""
        tokens = [t if t is not None else "" for t in self.tok.convert_ids_to_tokens(list(range(self.size)))]
        for i, added in getattr(self.tok, "added_tokens_decoder", {}).items():
            if i < self.size:
                tokens[i] = added.content
        return tokens

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        """Token string -> id, as the reference looks tokens up."""
        return self.tok.get_vocab()

    @functools.cached_property
    def _pipeline(self) -> dict:
        backend = getattr(self.tok, "backend_tokenizer", None)
        return json.loads(backend.to_str()) if backend is not None else {}

    @functools.cached_property
    def byte_level(self) -> bool:
        """True for byte-level BPE (a ByteLevel pre-tokenizer or decoder)."""
        parts = _components(self._pipeline.get("pre_tokenizer")) + _components(self._pipeline.get("decoder"))
        return any(p["type"] == "ByteLevel" for p in parts)

    @functools.cached_property
    def marker(self) -> str:
        """The character that marks a word start in token strings (``▁`` SentencePiece-style, ``Ġ`` byte-level).

        Read from the pre-tokenizer / normalizer / decoder (ByteLevel, Metaspace, Replace(" " -> marker)); when
        the tokenizer has no such pipeline, the more frequent of ``▁`` and ``Ġ`` as first character of tokens.
        """
        spec = self._pipeline
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
        for token in self.vocab:
            if token[:1] in counts:
                counts[token[0]] += 1
        marker = max(counts, key=counts.get)
        if counts[marker] == 0:
            name = getattr(self.tok, "name_or_path", self.tok)
            raise ValueError(f"cannot detect the word-start marker of tokenizer {name!r}")
        return marker

    @functools.cached_property
    def texts(self) -> list[bytes]:
        """The bytes each token spells (see the module docstring, default mode)."""
        tok = self.tok
        roles = {}
        for role in _SPECIAL_ROLES:
            token_id = getattr(tok, f"{role}_token_id", None)
            if token_id is not None and token_id not in roles:
                roles[token_id] = role
        added = {i: t for i, t in getattr(tok, "added_tokens_decoder", {}).items() if i < self.size}
        special = set(getattr(tok, "all_special_ids", [])) | {i for i, t in added.items() if t.special}
        texts = []
        for token_id, token in enumerate(self.tokens):
            if token_id in roles:
                texts.append(b"\xff" + roles[token_id].encode())
            elif token_id in special:
                texts.append(b"\xff" + token.encode("utf-8"))
            elif token_id in added:  # added tokens are stored as literal text (GPT-NeoX's runs of spaces)
                texts.append(token.encode("utf-8"))
            elif self.byte_level:
                texts.append(b"".join(bytes([_BYTE_LEVEL[c]]) if c in _BYTE_LEVEL else c.encode() for c in token))
            elif (m := BYTE_FALLBACK.fullmatch(token)) is not None:
                texts.append(bytes([int(m.group(1), 16)]))
            else:
                texts.append(token.replace(self.marker, " ").encode("utf-8"))
        return texts

    def _strings(self, kind: str):
        return [t.replace(self.marker, "") for t in self.tokens] if kind == "stripped" else self.texts

    def codes(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 codes, int64 offsets [V+1]) of every token: ``stripped`` (marker removed) or ``texts``."""
        if kind not in self._codes:
            strings = self._strings(kind)
            if kind == "stripped":
                flat = np.frombuffer("".join(strings).encode("utf-32-le"), np.uint32).astype(np.int32)
            else:
                flat = np.frombuffer(b"".join(strings), np.uint8).astype(np.int32)
            offsets = np.zeros(len(strings) + 1, np.int64)
            np.cumsum([len(s) for s in strings], out=offsets[1:])
            self._codes[kind] = (flat, offsets)
        return self._codes[kind]

    def keys(self, kind: str) -> np.ndarray:
        """int32 [V]: one number per distinct string of ``kind`` (see :meth:`codes`), shared by all vocabularies."""
        if kind not in self._keys:
            self._keys[kind] = np.array([_KEYS.setdefault(x, len(_KEYS)) for x in self._strings(kind)], np.int32)
        return self._keys[kind]

    def check_ids(self, ids, name: str) -> np.ndarray:
        """``ids`` as an int64 array, checked to be 1-D ids of this vocabulary (ValueError naming ``name``)."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name}: expected a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            bad = arr[(arr < 0) | (arr >= self.size)][0]
            raise ValueError(f"{name}: id {bad} is outside the vocabulary of size {self.size}")
        return arr.astype(np.int64)


def is_byte_level(tokenizer) -> bool:
    """True when the tokenizer is byte-level BPE (see :attr:`Vocab.byte_level`)."""
    return Vocab.of(tokenizer).byte_level


def word_start_marker(tokenizer) -> str:
    """The tokenizer's word-start marker (see :attr:`Vocab.marker`)."""
    return Vocab.of(tokenizer).marker


def token_strings(tokenizer, ids=None) -> list[str]:
    """``convert_ids_to_tokens`` strings of ``ids`` (default: the whole vocabulary)."""
    v = Vocab.of(tokenizer)
    return list(v.tokens) if ids is None else [v.tokens[i] for i in v.check_ids(ids, "ids")]


def token_texts(tokenizer, ids=None) -> list[bytes]:
    """The bytes each token of ``ids`` spells (default: the whole vocabulary); see the module docstring."""
    v = Vocab.of(tokenizer)
    return list(v.texts) if ids is None else [v.texts[i] for i in v.check_ids(ids, "ids")]
