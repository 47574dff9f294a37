"""Read and write Hugging Face ``config.json`` + safetensors checkpoints for :class:`Transformer`, without torch.

Loading builds the abstract model with ``nnx.eval_shape``, computes each parameter's ``NamedSharding`` from its
``logical_axes`` and fills it one parameter at a time with ``jax.make_array_from_callback``, so the model is
never gathered on one device. Pickle checkpoints (``*.bin``, ``*.pt``, ...) are refused, never unpickled.

Each architecture's weight map is a list of :class:`_Map` rows: one Hugging Face tensor (per layer when its
name contains ``{i}``, per expert of a mixture of experts when it contains ``{e}``) and the parameter(s) of ours
it holds. Fused HF tensors (GPT-NeoX ``query_key_value``, MPT ``Wqkv``, GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` and
``gate_up_proj``) hold several of ours, split along one axis after an optional transpose, and are fused again on
save.

Transformers quirk: ``MptForCausalLM`` always builds a 4x MLP and ignores ``expansion_ratio``, yet saves the
value it was given, so its folders may say ``expansion_ratio: 2`` over 4x tensors (MosaicML's own code honours
the field). :func:`read_config` follows the tensors: the MLP width of an MPT folder is that of its first
``ffn.up_proj`` tensor when the folder has weights, so both kinds of folder load; we write the true ratio.
Likewise, as transformers does, a folder whose config ties the embeddings but that holds an output projection
(``lm_head.weight``) other than the embedding table loads untied, with a warning; and a folder holding both
``model.safetensors`` and an index is read from ``model.safetensors``. MPT's ``attn_config.alibi_bias_max`` and
the Llama-style families' ``partial_rotary_factor`` are refused (see :mod:`fusejax.models.config`): transformers
ignores them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import struct
import warnings
from pathlib import Path, PurePath
from typing import BinaryIO

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open

from fusejax.files import TEMP_PREFIX, atomic_write
from fusejax.models.config import ModelConfig
from fusejax.models.transformer import Transformer
from fusejax.sharding import make_mesh, named_sharding

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
FINGERPRINT_WINDOWS, FINGERPRINT_WINDOW_BYTES = 16, 64 * 1024  # tensor data sampled by safetensors_fingerprint

# safetensors dtype tag <-> numpy dtype (bfloat16 through ml_dtypes, as numpy has none); weights are floats
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in _DTYPES.items()}
_WEIGHT_TAGS = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read (missing, corrupt, pickle-only, mismatching the config)."""


@dataclasses.dataclass(frozen=True)
class _Map:
    """One HF tensor <-> our parameter(s).

    ``hf``: names, the first written on save, all tried on load; ``{i}`` marks a per-layer tensor, ``{e}`` a
    per-expert one (see :func:`_indices`).
    ``ours``: our parameter paths (``layers.wq``); per-layer params carry a leading ``layers`` axis.
    ``hf_shape``: the HF tensor's shape (per layer). ``shape``: the shape after the optional transpose, from
    which ``split_axis`` (when several of ours) picks each of ours, or which it cuts in pieces of ``sections``
    sizes. ``pad_axis``: our axis padded to the padded vocabulary.
    """

    hf: tuple[str, ...]
    ours: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    split_axis: int | None = None
    sections: tuple[int, ...] | None = None
    pad_axis: int | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]

    def split(self, a: np.ndarray, padded_vocab: int) -> list[np.ndarray]:
        """HF tensor -> our per-layer arrays, in ``ours`` order."""
        a = (a.T if self.transpose else a).reshape(self.shape)
        if self.sections is not None:
            parts = np.split(a, np.cumsum(self.sections)[:-1], self.split_axis)
        elif self.split_axis is not None:
            parts = [np.take(a, j, self.split_axis) for j in range(len(self.ours))]
        else:
            parts = [a]
        if self.pad_axis is not None:
            widths = [(0, 0)] * a.ndim
            widths[self.pad_axis] = (0, padded_vocab - a.shape[self.pad_axis])
            parts = [np.pad(p, widths) for p in parts]
        return parts

    def join(self, parts: list[np.ndarray]) -> np.ndarray:
        """Our per-layer arrays -> the HF tensor (vocab padding removed)."""
        if self.pad_axis is not None:
            parts = [np.take(p, np.arange(self.shape[self.pad_axis]), self.pad_axis) for p in parts]
        if self.sections is not None:
            a = np.concatenate(parts, self.split_axis)
        else:
            a = parts[0] if self.split_axis is None else np.stack(parts, self.split_axis)
        if self.transpose:
            return a.reshape(self.hf_shape[::-1]).T
        return a.reshape(self.hf_shape)


def _linear(hf: str | tuple[str, ...], ours, d_in: int, out: tuple[int, ...], split_axis=None, conv1d=False,
            sections=None):
    """A torch ``Linear`` weight [out, in] (or GPT-2 ``Conv1D`` [in, out]) -> ours [in, *out]."""
    hf = (hf,) if isinstance(hf, str) else hf
    n_out = math.prod(out)
    hf_shape = (d_in, n_out) if conv1d else (n_out, d_in)
    ours = (ours,) if isinstance(ours, str) else ours
    axis = None if split_axis is None else split_axis + 1
    return _Map(hf, ours, hf_shape, (d_in, *out), transpose=not conv1d, split_axis=axis, sections=sections)


def _bias(hf: str | tuple[str, ...], ours, out: tuple[int, ...], split_axis=None):
    hf = (hf,) if isinstance(hf, str) else hf
    ours = (ours,) if isinstance(ours, str) else ours
    return _Map(hf, ours, (math.prod(out),), out, split_axis=split_axis)


def _vector(hf: str | tuple[str, ...], ours: str, n: int):
    return _bias(hf, ours, (n,))


def _indices(row: _Map, c: ModelConfig) -> tuple[list[dict[str, int]], tuple[int, ...]]:
    """The ``{i}`` (layer) and ``{e}`` (expert) values of a row's HF tensors, in order, and the leading shape
    ``([L][, X])`` of ours that they stack into."""
    lead = (c.num_layers,) * row.per_layer + (c.num_experts,) * ("{e}" in row.hf[0])
    return [dict(zip("ie", index)) for index in np.ndindex(*lead)], lead


def _weight_map(c: ModelConfig) -> list[_Map]:
    """The HF <-> fusejax weight map of one model."""
    D, H, K, E, F, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    qkv, qkv_b = ("layers.wq", "layers.wk", "layers.wv"), ("layers.bq", "layers.bk", "layers.bv")
    names = _HF_NAMES[c.arch] if c.num_experts is None else {**_HF_NAMES[c.arch], **_MIXTRAL_NAMES}
    p = names["layer"]
    rows: list[_Map] = []
    norms = [(p + names["norm1"], "layers.attn_norm"), (p + names["norm2"], "layers.mlp_norm"),
             (names["final_norm"], "final_norm")]
    if c.post_norms:
        norms += [(p + names["post_norm1"], "layers.attn_out_norm"), (p + names["post_norm2"], "layers.mlp_out_norm")]
    for hf, ours in norms:
        rows.append(_vector(f"{hf}.weight", f"{ours}_scale", D))
        if c.norm_bias:
            rows.append(_vector(f"{hf}.bias", f"{ours}_bias", D))
    if c.qk_norm:
        rows += [_vector(f"{p}self_attn.{x}_norm.weight", f"layers.{x}_norm_scale", E) for x in "qk"]
    conv1d = c.arch == "gpt2"
    if c.model_type == "phi3":  # fused q|k|v along the heads: [(H + K + K) * E, D]
        rows.append(_linear(f"{p}self_attn.qkv_proj.weight", qkv, D, (H + 2 * K, E), split_axis=0, sections=(H, K, K)))
    elif "qkv" not in names:
        for name, ours, heads in (("q", "wq", H), ("k", "wk", K), ("v", "wv", K)):
            rows.append(_linear(f"{p}self_attn.{name}_proj.weight", f"layers.{ours}", D, (heads, E)))
            if c.attention_bias:
                rows.append(_bias(f"{p}self_attn.{name}_proj.bias", f"layers.b{ours[1]}", (heads, E)))
    else:  # fused q|k|v; GPT-NeoX rows are laid out [head, (q|k|v), head_dim], MPT and GPT-2 [(q|k|v), head, ...]
        layout, axis = ((H, 3, E), 1) if c.arch == "gpt_neox" else ((3, H, E), 0)
        rows.append(_linear(p + names["qkv"] + ".weight", qkv, D, layout, split_axis=axis, conv1d=conv1d))
        if c.attention_bias:
            rows.append(_bias(p + names["qkv"] + ".bias", qkv_b, layout, split_axis=axis))
    wo_shape = (D, H * E) if not conv1d else (H * E, D)
    rows.append(_Map((p + names["o"] + ".weight",), ("layers.wo",), wo_shape, (H, E, D), transpose=not conv1d))
    if c.attention_out_bias:
        rows.append(_vector(p + names["o"] + ".bias", "layers.bo", D))
    mlp_in = (("gate", "_gate", D, F),) if c.mlp == "gated" else ()
    mlp_in += (("up", "_up", D, F),)
    if c.model_type == "phi3":  # fused gate|up: [2F, D]
        rows.append(_linear(f"{p}mlp.gate_up_proj.weight", ("layers.w_gate", "layers.w_up"), D, (2, F), split_axis=0))
        mlp_in = ()
    if c.num_experts is not None:  # the router, then one gated MLP per expert
        rows.append(_linear(p + names["router"] + ".weight", "layers.router", D, (c.num_experts,)))
        p += names["expert"]
    for key, ours, d_in, d_out in (*mlp_in, ("down", "_down", F, D)):
        rows.append(_linear(f"{p}{names[key]}.weight", f"layers.w{ours}", d_in, (d_out,), conv1d=conv1d))
        if c.mlp_bias:
            rows.append(_vector(f"{p}{names[key]}.bias", f"layers.b{ours}", d_out))
    if c.position == "learned":
        P = c.max_position_embeddings
        rows.append(_Map((names["pos_embed"],), ("pos_embed",), (P, D), (P, D)))
    rows.append(_Map((names["embed"],), ("embed",), (V, D), (V, D), pad_axis=0))
    if not c.tie_embeddings:
        rows.append(_Map(names["lm_head"], ("lm_head",), (V, D), (D, V), transpose=True, pad_axis=1))
    if c.arch == "gpt2":  # hub GPT-2 checkpoints may lack the "transformer." prefix
        rows = [
            r if r.ours == ("lm_head",) else dataclasses.replace(r, hf=(r.hf[0], r.hf[0].removeprefix("transformer.")))
            for r in rows
        ]
    return rows


# Hugging Face tensor names per architecture ("layer" is the per-layer prefix)
_MIXTRAL_NAMES = dict(router="block_sparse_moe.gate", expert="block_sparse_moe.experts.{e}.", gate="w1", up="w3",
                      down="w2")
_HF_NAMES = {
    "llama": dict(
        layer="model.layers.{i}.", norm1="input_layernorm", norm2="post_attention_layernorm",
        final_norm="model.norm", o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj",
        down="mlp.down_proj", embed="model.embed_tokens.weight", lm_head=("lm_head.weight",),
    ),
    "gemma": dict(
        layer="model.layers.{i}.", norm1="input_layernorm", post_norm1="post_attention_layernorm",
        norm2="pre_feedforward_layernorm", post_norm2="post_feedforward_layernorm", final_norm="model.norm",
        o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
        embed="model.embed_tokens.weight", lm_head=("lm_head.weight",),
    ),
    "gpt_neox": dict(
        layer="gpt_neox.layers.{i}.", norm1="input_layernorm", norm2="post_attention_layernorm",
        final_norm="gpt_neox.final_layer_norm", qkv="attention.query_key_value", o="attention.dense",
        up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", embed="gpt_neox.embed_in.weight",
        lm_head=("embed_out.weight", "lm_head.weight"),
    ),
    "mpt": dict(
        layer="transformer.blocks.{i}.", norm1="norm_1", norm2="norm_2", final_norm="transformer.norm_f",
        qkv="attn.Wqkv", o="attn.out_proj", up="ffn.up_proj", down="ffn.down_proj",
        embed="transformer.wte.weight", lm_head=("lm_head.weight",),
    ),
    "gpt2": dict(
        layer="transformer.h.{i}.", norm1="ln_1", norm2="ln_2", final_norm="transformer.ln_f",
        qkv="attn.c_attn", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj", embed="transformer.wte.weight",
        pos_embed="transformer.wpe.weight", lm_head=("lm_head.weight",),
    ),
}


class _SafetensorsFile:
    """One safetensors file: checked with ``safe_open``, tensors read from a memory map (bfloat16 via ml_dtypes)."""

    def __init__(self, path: Path):
        try:
            with safe_open(str(path), framework="numpy") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            self.header = json.loads(fh.read(n))
        self.header.pop("__metadata__", None)
        self.path, self.data_start = path, 8 + n
        self.data = np.memmap(path, dtype=np.uint8, mode="r")

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = (self.data_start + o for o in info["data_offsets"])
        return self.data[start:end].view(dtype).reshape(info["shape"])


class CheckpointFiles:
    """The safetensors file(s) of a checkpoint folder: ``model.safetensors``, else an index with sharded files
    (transformers' order)."""

    def __init__(self, folder: Path):
        index, single = folder / INDEX_NAME, folder / WEIGHTS_NAME
        self._files: dict[Path, _SafetensorsFile] = {}
        if single.is_file():
            self.source = single
            self.where = dict.fromkeys(self._open(single).header, single)
        elif index.is_file():
            self.source = index
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, not a mapping")
            for name, file in weight_map.items():  # lexically inside: a link inside the folder may point anywhere
                if not isinstance(file, str) or PurePath(file).is_absolute() or ".." in PurePath(file).parts:
                    raise CheckpointError(f"{index}: weight_map entry {name!r}: {file!r} is not a file inside {folder}")
            self.where = {name: folder / file for name, file in weight_map.items()}
            for file in sorted(set(self.where.values())):
                if not file.is_file():
                    raise CheckpointError(f"{index}: lists {file.name}, which is missing from {folder}")
        else:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
            if pickles:
                raise CheckpointError(
                    f"{folder}: only pickle checkpoints {pickles}; fusejax never unpickles weights (arbitrary code "
                    f"execution). Convert them to {WEIGHTS_NAME} with a trusted tool first."
                )
            raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")

    def _open(self, path: Path) -> _SafetensorsFile:
        if path not in self._files:
            self._files[path] = _SafetensorsFile(path)
        return self._files[path]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of tensor ``name`` from its file's header; None when absent."""
        info = self._open(self.where[name]).header.get(name) if name in self.where else None
        return None if info is None else tuple(info["shape"])

    def read(self, names: tuple[str, ...], expected: tuple[int, ...], config_source: Path) -> np.ndarray:
        """The first of ``names`` present, checked against the ``expected`` shape (which config_source implies)."""
        name = next((n for n in names if n in self.where), None)
        if name is None:
            also = f" (nor {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
            raise CheckpointError(f"{self.source}: tensor {names[0]!r} is missing{also}")
        file = self._open(self.where[name])
        if name not in file.header:
            raise CheckpointError(f"{file.path}: tensor {name!r} listed in {self.source.name} is missing")
        if file.header[name]["dtype"] not in _WEIGHT_TAGS:
            raise CheckpointError(f"{file.path}: tensor {name!r} has dtype {file.header[name]['dtype']}; model "
                                  "weights must be floating point")
        array = file.get(name)
        if tuple(array.shape) != tuple(expected):
            raise CheckpointError(
                f"{file.path}: tensor {name!r} has shape {tuple(array.shape)}, but {config_source} implies "
                f"{tuple(expected)}"
            )
        return array


def safetensors_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex of one safetensors file, reading at most 1 MiB of its tensor data whatever its size.

    Hashed: the file size; the 8-byte header length and the JSON header (tensor names, dtypes, shapes, offsets,
    ``__metadata__``); and the tensor data, whole when it is at most ``FINGERPRINT_WINDOWS *
    FINGERPRINT_WINDOW_BYTES`` (1 MiB), else ``FINGERPRINT_WINDOWS`` (16) windows of 64 KiB evenly spaced from its
    first byte to its last. Cost: one open, 17 reads. Two models of one architecture have the same header, but
    different weights (another seed, run or checkpoint) differ in every window; an edit confined to a few
    weights of a file above 1 MiB may fall between windows and go unnoticed. Never the modification time.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        digest.update(head + f.read(min(struct.unpack("<Q", head)[0], size) if len(head) == 8 else 0))
        start = f.tell()
        data = size - start
        if data <= FINGERPRINT_WINDOWS * FINGERPRINT_WINDOW_BYTES:
            digest.update(f.read())
        else:
            for i in range(FINGERPRINT_WINDOWS):
                f.seek(start + i * (data - FINGERPRINT_WINDOW_BYTES) // (FINGERPRINT_WINDOWS - 1))
                digest.update(f.read(FINGERPRINT_WINDOW_BYTES))
    return digest.hexdigest()


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex of a model folder's content as :func:`load_pretrained` reads it; cheap for 7B folders.

    Hashed: the bytes of ``config.json`` and of ``model.safetensors.index.json`` (absent: recorded as such) and,
    for every ``*.safetensors`` file directly in the folder (sorted; temporary files of a save left out), its
    name and :func:`safetensors_fingerprint` (size, JSON header, 1 MiB of sampled tensor data). Not hashed:
    modification times (a copied or touched folder keeps its fingerprint), tokenizer files (see
    :func:`fusejax.tokenizer.tokenizer_fingerprint`), pickle checkpoints (never read).
    """
    folder = Path(path)
    parts: dict[str, str | None] = {}
    for name in (CONFIG_NAME, INDEX_NAME):
        file = folder / name
        parts[name] = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
    for file in sorted(folder.glob("*.safetensors")):
        if not file.name.startswith(TEMP_PREFIX):
            parts[file.name] = safetensors_fingerprint(file)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of checkpoint folder ``path`` (its ``config.json``); overrides set fields."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (a Hugging Face checkpoint folder needs {CONFIG_NAME})")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(config).__name__}")
    return _follow_tensors(Path(path), ModelConfig.from_hf(config, source=str(file), **overrides))


def _follow_tensors(folder: Path, config: ModelConfig) -> ModelConfig:
    """``config`` corrected where transformers follows the folder's tensors over its config.json (see the
    module docstring): an MPT MLP as wide as its first ``ffn.up_proj`` tensor; untied embeddings when the
    folder holds an output projection other than the embedding table. A config.json alone (fusejax plan), or
    tensors absent or malformed (load_pretrained names them): the config as it is."""
    if not (config.arch == "mpt" or config.tie_embeddings):
        return config
    if not ((folder / INDEX_NAME).is_file() or (folder / WEIGHTS_NAME).is_file()):
        return config
    files = CheckpointFiles(folder)
    if config.arch == "mpt":
        shape = files.shape(f"{_HF_NAMES['mpt']['layer'].format(i=0)}{_HF_NAMES['mpt']['up']}.weight")
        if shape is not None and len(shape) == 2 and shape[0] != config.intermediate_size:
            config = config.replace(intermediate_size=shape[0])
    if config.tie_embeddings:
        rows = {row.ours: row.hf for row in _weight_map(config.replace(tie_embeddings=False))}
        embed, head = (next((n for n in rows[key] if n in files.where), None) for key in (("embed",), ("lm_head",)))
        if embed and head and (files.shape(embed) != files.shape(head)
                               or not np.array_equal(files.read((embed,), files.shape(embed), folder),
                                                     files.read((head,), files.shape(head), folder))):
            warnings.warn(f"{files.source}: config.json ties the embeddings, but {head!r} differs from {embed!r}; "
                          "loading them untied, as transformers does", stacklevel=3)
            config = config.replace(tie_embeddings=False)
    return config


def _default_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def model_shardings(model: Transformer, mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """The model state with every Variable's value replaced by its ``NamedSharding`` (from ``logical_axes``,
    under the model's own ``rules``). ``mesh=None``: the default device alone. Works on concrete and on
    abstract (``nnx.eval_shape``) models.
    """
    mesh = _default_mesh() if mesh is None else mesh
    rules = dict(model.rules)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = var.get_value().shape
        axes = var.get_metadata().get("logical_axes", (None,) * len(shape))
        name = ".".join(map(str, path))
        flat.append((path, var.replace(named_sharding(mesh, axes, shape, name=name, rules=rules))))
    return nnx.from_flat_state(flat)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str = "none",
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> Transformer:
    """A :class:`Transformer` from a Hugging Face folder (config.json + safetensors), placed on ``mesh``.

    ``dtype``: parameter dtype; ``compute_dtype``: activation dtype (default ``dtype``); ``remat``: policy name;
    ``rules``: sharding-rule overrides of the model (parameters and activations). Raises
    :class:`CheckpointError` or ``ModelConfigError`` naming the file and tensor or field at fault.
    """
    folder = Path(path)
    config = read_config(folder, param_dtype=dtype, dtype=compute_dtype or dtype, remat=remat)
    config_source = folder / CONFIG_NAME
    checkpoint = CheckpointFiles(folder)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), rules=rules))
    graphdef, state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(model_shardings(abstract, mesh)))
    rows = {ours: (row, j) for row in _weight_map(config) for j, ours in enumerate(row.ours)}
    param_dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    used: set[str] = set()

    def read(row: _Map, j: int, index: dict[str, int]) -> np.ndarray:
        names = tuple(n.format(**index) for n in row.hf)
        used.update(names)
        tensor = checkpoint.read(names, row.hf_shape, config_source)
        return row.split(tensor, config.padded_vocab_size)[j].astype(param_dtype)

    flat = []
    for key, var in nnx.to_flat_state(state):
        row, j = rows[".".join(map(str, key))]
        indices, lead = _indices(row, config)
        host = np.stack([read(row, j, index) for index in indices])
        host = host.reshape(*lead, *host.shape[1:])
        sharding = shardings[key].get_value()
        array = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
        flat.append((key, var.replace(array)))
    unused = sorted(set(checkpoint.where) - used - _ignorable(checkpoint.where, config))
    if unused:
        warnings.warn(f"{checkpoint.source}: {len(unused)} tensors not used by the model: {unused[:8]}", stacklevel=2)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _ignorable(names, config: ModelConfig) -> set[str]:
    """Checkpoint tensors that are buffers, not weights (causal-mask and rotary caches, a tied lm_head)."""
    buffers = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")
    tied = ("lm_head.weight",) if config.tie_embeddings else ()
    return {n for n in names if n.endswith(buffers) or n in tied}


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole (possibly sharded, possibly multi-host) array as one numpy array."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_pretrained(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """Write ``config.json`` and safetensors weights that ``transformers`` loads, vocab padding removed.

    Above ``max_shard_bytes`` the weights go to ``model-0000k-of-0000n.safetensors`` files plus
    ``model.safetensors.index.json``. Every file is written to a temporary name and renamed into place; stale
    weight files from an earlier save, and temporary files of a killed one, are removed. With several
    processes all must call; process 0 writes.
    """
    c: ModelConfig = model.config
    hf_config = c.to_hf()  # a config transformers cannot express is refused before anything is written
    folder = Path(path)
    params = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model))}
    dtype = np.dtype(jax.numpy.dtype(c.param_dtype))
    tensors = []  # (hf name, hf shape, row, (layer[, expert])), row by row so each row's params are gathered once
    for row in _weight_map(c):
        for index in _indices(row, c)[0]:
            tensors.append((row.hf[0].format(**index), row.hf_shape, row, tuple(index.values())))
    shards, size = [[]], 0
    for t in tensors:
        nbytes = math.prod(t[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes

    cache: dict[str, np.ndarray] = {}  # the current row's parameters on the host

    def produce(row: _Map, index: tuple[int, ...]) -> np.ndarray:
        if not all(name in cache for name in row.ours):
            cache.clear()
            cache.update({name: _to_host(params[name].get_value()) for name in row.ours})
        return row.join([cache[name][index] for name in row.ours]).astype(dtype)

    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        entries = [(hf, shape, functools.partial(produce, row, index)) for hf, shape, row, index in shard]
        write_safetensors(folder / name, entries, dtype, writer)
    if not writer:
        return
    if len(shards) > 1:
        # a model.safetensors of an earlier save would be read before the index: gone before the index exists
        (folder / WEIGHTS_NAME).unlink(missing_ok=True)
        weight_map = {hf: name for name, shard in zip(names, shards) for hf, *_ in shard}
        total = sum(math.prod(t[1]) for t in tensors) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(folder / INDEX_NAME, lambda f: f.write(json.dumps(index, indent=2).encode()))
    atomic_write(folder / CONFIG_NAME, lambda f: f.write(json.dumps(hf_config, indent=2).encode()))
    keep = set(names) | ({INDEX_NAME} if len(shards) > 1 else set())
    # weight files of an earlier save with other shards; temporary files of a save that was killed
    leftovers = [*folder.glob("model*.safetensors*"), *folder.glob(f"{TEMP_PREFIX}model*.safetensors*"),
                 *folder.glob(f"{TEMP_PREFIX}{CONFIG_NAME}.*")]
    for stale in leftovers:
        if stale.name not in keep:
            stale.unlink()


def write_safetensors(path: Path, entries, dtype: np.dtype, writer: bool) -> None:
    """Write ``entries`` [(name, shape, produce() -> array)] as one safetensors file via temp + rename.

    Every process runs ``produce`` (gathering sharded arrays is collective); only the ``writer`` writes.
    """
    header, offset = {}, 0
    for name, shape, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    if not writer:
        for *_, produce in entries:
            produce()
        return

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for *_, produce in entries:
            f.write(np.ascontiguousarray(produce()).tobytes())

    atomic_write(path, write)
