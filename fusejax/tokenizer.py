"""Tokenizers whose ids equal each model's own tokenizer, and a fingerprint of what decides those ids.

Host-only (no JAX). A tokenizer folder is read in this order:

* ``tokenizer.json``: the `tokenizers` serialization is used as is (it *is* the model's own tokenizer);
* ``tokenizer.model``: a SentencePiece model (Llama family) is converted here so that ids equal
  ``sentencepiece.SentencePieceProcessor.encode``, including runs of spaces, a leading space and byte
  fallback; literal special-token text such as ``"<s>"`` is encoded as text, as SentencePiece does
  (Unigram models, user-defined pieces and treat_whitespace_as_suffix are refused with a ValueError);
* ``vocab.json`` + ``merges.txt``: a GPT-2 style byte-level BPE.

bos/eos/unk/pad and the chat template come from ``tokenizer_config.json`` (a key missing or null there is taken from
``special_tokens_map.json``; the chat template from ``chat_template.jinja`` when that file exists); for a
SentencePiece folder without them, from the model's own pieces.
``added_tokens.json`` extends the vocabulary of the last two kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# sentencepiece_model.proto enums
_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 2, 3, 4
_SPM_BPE = 2
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\n")  # first line of a tiktoken BPE file: base64 token, rank


def load_tokenizer(path_or_tokenizer: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Folder path -> fast tokenizer equal to the model's own; a tokenizer object is returned unchanged.

    Raises FileNotFoundError / ValueError naming the folder or file when it is missing or unreadable.
    """
    if isinstance(path_or_tokenizer, PreTrainedTokenizerBase):
        return path_or_tokenizer
    if not isinstance(path_or_tokenizer, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer expects a folder path or a tokenizer, got {type(path_or_tokenizer).__name__}")
    folder = Path(path_or_tokenizer)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a folder")

    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    specials = {  # a key missing or null in tokenizer_config.json falls back to special_tokens_map.json
        key: _token_content(config.get(key), folder, key) or _token_content(special_map.get(key), folder, key)
        for key in SPECIAL_TOKEN_KEYS
    }
    kwargs = {key: config[key] for key in ("model_max_length", "chat_template") if key in config}
    if (folder / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
        kwargs["chat_template"] = _read_file(folder / "chat_template.jinja", lambda p: Path(p).read_text("utf-8"))

    json_file = folder / "tokenizer.json"
    if json_file.is_file():
        backend = _read_file(json_file, Tokenizer.from_file)
    elif (folder / "tokenizer.model").is_file():
        backend, spm_specials = _sentencepiece_backend(folder / "tokenizer.model")
        specials = {key: specials[key] or spm_specials[key] for key in SPECIAL_TOKEN_KEYS}
        kwargs.update(
            add_bos_token=bool(config.get("add_bos_token", True)),  # LlamaTokenizer's defaults
            add_eos_token=bool(config.get("add_eos_token", False)),
            split_special_tokens=True,  # SentencePiece never turns text "<s>" into the control id
        )
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _byte_level_bpe_backend(folder, add_prefix_space=bool(config.get("add_prefix_space", False)))
    else:
        raise FileNotFoundError(
            f"no tokenizer files in {folder}: expected tokenizer.json, tokenizer.model, or vocab.json + merges.txt"
        )
    if not json_file.is_file():  # tokenizer.json already lists its added tokens
        _add_listed_tokens(backend, folder / "added_tokens.json", set(specials.values()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(folder), **specials, **kwargs)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 hex over what decides ids: backend JSON (minus truncation/padding), special ids, flags."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer_fingerprint needs a fast tokenizer with a backend, got {type(tok).__name__}")
    state = json.loads(backend.to_str())
    state.pop("truncation", None)  # set per call; they do not change the ids of a text
    state.pop("padding", None)
    payload = {
        "backend": state,
        "special_ids": {key: getattr(tok, f"{key}_id") for key in SPECIAL_TOKEN_KEYS},
        "split_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _add_listed_tokens(backend: Tokenizer, path: Path, special: set) -> None:
    """Append the tokens of an `added_tokens.json` ({token: id}, ids right after the vocabulary) to `backend`."""
    listed = _read_json(path)
    for token, index in listed.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"{path}: token {token!r} has id {index!r}; expected an integer")
    for token, index in sorted(listed.items(), key=lambda item: item[1]):
        if backend.token_to_id(token) == index:
            continue
        if index != backend.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"{path}: token {token!r} has id {index}, expected {backend.get_vocab_size(with_added_tokens=True)}"
            )
        backend.add_tokens([AddedToken(token, special=token in special, normalized=False)])


def _read_file(path: Path, reader, *, also: Path | None = None):
    """``reader(path)``; any failure is a ValueError naming ``path`` (and ``also``, a file read with it)."""
    try:
        return reader(str(path))
    except Exception as err:  # tokenizers / protobuf raise assorted types for corrupt files
        with_file = f" or {also}" if also else ""
        raise ValueError(f"cannot read tokenizer file {path}{with_file}: {err}") from err


def _read_json(path: Path) -> dict:
    """JSON object in `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}

    def read(name):
        with open(name, encoding="utf-8") as f:
            return json.load(f)

    data = _read_file(path, read)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value, folder: Path, key: str) -> str | None:
    """A special token as written in a config (string, AddedToken dict or null) -> its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{folder}: field {key!r} must be a string, an AddedToken object or null, got {value!r}")


def _sentencepiece_backend(path: Path) -> tuple[Tokenizer, dict[str, str | None]]:
    """SentencePiece BPE `tokenizer.model` -> (`tokenizers.Tokenizer` with equal ids, its bos/eos/unk/pad)."""
    from sentencepiece import sentencepiece_model_pb2

    def parse(name):
        proto = sentencepiece_model_pb2.ModelProto()
        with open(name, "rb") as f:
            data = f.read()
        if _TIKTOKEN_LINE.match(data):
            raise ValueError("a tiktoken BPE file (Llama 3) needs the tokenizer.json beside it")
        proto.ParseFromString(data)
        if not proto.pieces:
            raise ValueError("no pieces")
        return proto

    proto = _read_file(path, parse)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _SPM_BPE:
        raise ValueError(f"{path}: only SentencePiece BPE models are supported, model_type is {trainer.model_type}")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: treat_whitespace_as_suffix=true is not supported")
    pieces = proto.pieces
    user_defined = [p.piece for p in pieces if p.type == _SPM_USER_DEFINED]
    if user_defined:  # SentencePiece matches them atomically inside BPE; no `tokenizers` equivalent here
        raise ValueError(f"{path}: user-defined pieces are not supported, found {user_defined[:5]}")
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == _SPM_NORMAL}

    # SentencePiece merges the adjacent pair whose merged piece has the highest score, the leftmost on ties.
    # BPE ranks merges instead; ranking longer pieces first among equal scores reproduces the leftmost
    # rule on runs of "▁" (Llama gives all whitespace-only pieces the same score).
    order = sorted(
        (i for i, p in enumerate(pieces) if p.type == _SPM_NORMAL and len(p.piece) > 1),
        key=lambda i: (-pieces[i].score, -len(pieces[i].piece), i),
    )
    merges = [
        (piece[:k], piece[k:])
        for piece in (pieces[i].piece for i in order)
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    ]
    unk = pieces[trainer.unk_id].piece
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    )

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # drop leading/trailing spaces, collapse inner runs to one
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decoder_steps)

    backend.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (_SPM_UNKNOWN, _SPM_CONTROL)]
    )
    ids = {"bos_token": trainer.bos_id, "eos_token": trainer.eos_id, "unk_token": trainer.unk_id,
           "pad_token": trainer.pad_id}
    specials = {key: pieces[i].piece if 0 <= i < len(pieces) else None for key, i in ids.items()}
    return backend, specials


def _byte_level_bpe_backend(folder: Path, add_prefix_space: bool) -> Tokenizer:
    """GPT-2 style `vocab.json` + `merges.txt` -> byte-level BPE `tokenizers.Tokenizer`."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    bpe = _read_file(vocab, lambda name: models.BPE.from_file(name, str(merges)), also=merges)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def encode_block(tok, text: str) -> list[int]:
    """A block's ids as every stage sees them: ``tok``'s ids of ``text`` (no BOS) with its EOS appended
    (as the FuseLLM reference does); no EOS when the tokenizer has none."""
    ids = tok.encode(text, add_special_tokens=False)
    return ids + [tok.eos_token_id] if tok.eos_token_id is not None else ids
