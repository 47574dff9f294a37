"""`ModelConfig`: one frozen dataclass describing every supported decoder (Llama 2/3, Mistral and Mixtral,
Qwen2/2.5, Qwen3, Phi-3/4, Gemma 2, Gemma 3 text, GPT-NeoX, MPT, GPT-2).

Architectures differ by fields, not subclasses. :meth:`ModelConfig.from_hf` reads a Hugging Face
``config.json`` dict (transformers v4 and v5 layouts) and :meth:`ModelConfig.to_hf` writes one that
transformers v5 loads; one parser and one writer per ``model_type`` (``_PARSERS``, ``_WRITERS``). Options we
do not implement raise :class:`ModelConfigError` naming the file and field.

The Llama-style model types share the ``llama`` arch and differ only in these fields:
  ``llama``    ``rope_scaling`` (Llama 3.1: ``llama3``; also ``linear``, ``dynamic``, ``yarn``), tied embeddings
  ``mistral``  ``sliding_window`` on every layer
  ``mixtral``  Mistral's layers (no default window) with a top-k routed mixture of gated-MLP experts
               (``num_experts``, ``experts_per_token``; per-expert tensors in hf_io)
  ``qwen2``    biases on q, k and v only (``attention_out_bias=False``); ``sliding_window`` on the layers from
               ``max_window_layers`` on when ``use_sliding_window`` (``layer_types``)
  ``qwen3``    per-head RMSNorm of queries and keys (``qk_norm``), explicit ``head_dim`` (default 128)
  ``phi3``     partial rotary, ``longrope`` scaling; fused ``qkv_proj``/``gate_up_proj`` tensors (in hf_io)
The Gemma model types share the ``gemma`` arch: ``(1 + w)`` RMSNorm (``norm="rms_plus_one"``, also over queries
and keys with ``qk_norm``) before and after attention and MLP (``post_norms``), embeddings times
sqrt(hidden_size), ``softmax_scale`` from ``query_pre_attn_scalar``, sliding and global layers (``layer_types``):
  ``gemma2``       every other layer sliding; soft-capped attention scores and logits (``attn_logit_softcap``,
                   ``final_logit_softcap``)
  ``gemma3_text``  ``qk_norm``; by default 5 sliding layers to 1 global; sliding layers rotate with their own
                   unscaled base (``rope_local_theta``), global ones with ``rope_theta`` and ``rope_scaling``
                   (``linear`` in Gemma 3's configs); no attention soft-capping
MPT: transformers' ``MptForCausalLM`` builds a 4x MLP whatever ``expansion_ratio`` says, and saves that
``expansion_ratio`` unchanged; :func:`fusejax.models.hf_io.read_config` follows the tensors (see there).

Remat policies (``remat``), applied per scanned layer with ``jax.checkpoint``:
  ``none``           no rematerialisation (store every activation)
  ``full``           save nothing inside a layer; recompute it all in the backward pass
  ``dots``           save the outputs of matrix multiplications (``jax.checkpoint_policies.dots_saveable``)
  ``dots_no_batch``  save matmul outputs without batch dimensions (``dots_with_no_batch_dims_saveable``)

Attention paths (``attention_impl``), one function computed with the softmax in float32 (``[B, H, T, T]``: the
scores of a batch of ``B`` sequences of ``T`` tokens):
  ``explicit``  the scores in one float32 tensor ``[B, H, T, T]``, masked and soft-maxed (the reference path)
  ``chunked``   the explicit path on blocks of ``attention_chunk`` queries (``lax.map``), each block recomputed
                in the backward pass: scores ``[B, H, chunk, T]`` at a time
  ``xla``       ``jax.nn.dot_product_attention(implementation="xla")``: XLA's own einsum/softmax on every backend
                (it too materialises ``[B, H, T, T]``); padding as a key mask
  ``cudnn``     ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention on GPUs, no
                ``[B, H, T, T]`` tensor; padding as per-row lengths, so rows must be right-padded (every fusejax
                batch is), the causal mask and the window as its own arguments. It serves neither soft-capped
                scores nor ALiBi, computes in ``bfloat16`` or ``float16`` only, with ``head_dim`` a multiple of 8
                up to 256 (128 before Hopper, which JAX checks when it compiles): :meth:`ModelConfig.cudnn_refusal`
  ``auto``      ``cudnn`` on an NVIDIA GPU (``transformer.platform() == "cuda"``) for a model it serves; else
                ``chunked`` when ``T > attention_chunk``, else ``xla`` (``explicit`` with ``attn_logit_softcap``, which
                ``jax.nn.dot_product_attention`` cannot apply; ``xla`` and ``cudnn`` are refused with it)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fusejax.models.rope import ROPE_KEYS, USES_ORIGINAL_MAX, RopeScaling

ARCHS = ("llama", "gemma", "gpt_neox", "mpt", "gpt2")
# Hugging Face model_type -> our arch
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "phi3": "llama",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gpt_neox": "gpt_neox",
    "mpt": "mpt",
    "gpt2": "gpt2",
}
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "mpt": "MptForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
NORMS = ("rms", "rms_plus_one", "layer")  # rms_plus_one: RMSNorm scaled by (1 + w), in float32 (Gemma)
POSITIONS = ("rope", "alibi", "learned")
MLPS = ("gated", "plain")  # gated: act(x W_gate) * (x W_up) (SwiGLU); plain: act(x W_up)
# Hugging Face activation names we implement (see transformer.ACTIVATIONS)
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked", "explicit")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face names of per-layer attention kinds
DTYPES = ("float32", "bfloat16", "float16")


class ModelConfigError(ValueError):
    """A model configuration that is malformed or uses an option fusejax does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters plus dtypes and remat policy; ``None`` fields are resolved in ``__post_init__``."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: num_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    position: str = "rope"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None: head_dim (full rotary); fewer dims rotate only the first ones
    rope_scaling: RopeScaling | None = None  # None: plain RoPE (fusejax.models.rope); not on rope_local_theta layers
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX) instead of sequential
    mlp: str = "gated"
    activation: str = "silu"
    attention_bias: bool = False  # biases on q, k, v and output projections
    attention_out_bias: bool | None = None  # bias on the output projection; None: attention_bias (Qwen2: False)
    qk_norm: bool = False  # the model's norm (no bias) over head_dim of each query and key head, before RoPE
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # a query sees keys with q - k < sliding_window (Mistral)
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: all sliding iff a window
    rope_local_theta: float | None = None  # unscaled RoPE base of sliding layers (Gemma 3); None: as other layers
    post_norms: bool = False  # norm the attention and MLP outputs too before adding them (Gemma 2/3)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype (Gemma)
    attn_logit_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    num_experts: int | None = None  # sparse mixture-of-experts MLP with this many experts (Mixtral); None: dense
    experts_per_token: int = 2  # experts each token is routed to (top-k of the router's softmax)
    alibi_bias_max: int = 8
    softmax_scale: float | None = None  # None: head_dim ** -0.5
    vocab_multiple: int = 128  # embedding rows padded to a multiple of this (sharding over "vocab")
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str | None = None  # Hugging Face model_type written by to_hf; None: the arch's own
    dtype: str = "float32"  # compute dtype of activations (attention softmax and logits are always float32)
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS
    attention_chunk: int = 512  # queries per block of the chunked attention path

    def __post_init__(self):
        def check(field, value, allowed):
            if value not in allowed:
                raise ModelConfigError(f"ModelConfig.{field}={value!r}: expected one of {allowed}")

        check("arch", self.arch, ARCHS)
        check("norm", self.norm, NORMS)
        check("position", self.position, POSITIONS)
        check("mlp", self.mlp, MLPS)
        check("activation", self.activation, ACTIVATIONS)
        check("remat", self.remat, REMAT_POLICIES)
        check("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check("dtype", self.dtype, DTYPES)
        check("param_dtype", self.param_dtype, DTYPES)
        if self.model_type is None:
            if self.arch not in HF_MODEL_TYPES:
                raise ModelConfigError(f"ModelConfig.model_type=None: arch {self.arch!r} needs one of "
                                       f"{sorted(t for t, a in HF_MODEL_TYPES.items() if a == self.arch)}")
            object.__setattr__(self, "model_type", self.arch)
        elif HF_MODEL_TYPES.get(self.model_type) != self.arch:
            raise ModelConfigError(f"ModelConfig.model_type={self.model_type!r} is not a {self.arch!r} model type")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_multiple",
                      "attention_chunk"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"ModelConfig.{field}={value!r}: expected a positive integer")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ModelConfigError(
                    f"ModelConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for field in ("num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"ModelConfig.{field}={value!r}: expected a positive integer")
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        for field in ("eos_token_id", "layer_types"):  # lists from JSON (parsers, checkpoint metadata)
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        if isinstance(self.rope_scaling, dict):  # checkpoint metadata
            object.__setattr__(self, "rope_scaling", RopeScaling(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in self.rope_scaling.items()}))
        if self.attention_out_bias is None:
            object.__setattr__(self, "attention_out_bias", self.attention_bias)
        if self.layer_types is not None and (len(self.layer_types) != self.num_layers
                                             or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ModelConfigError(f"ModelConfig.layer_types={list(self.layer_types)}: expected num_layers="
                                   f"{self.num_layers} entries, each one of {LAYER_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.position == "rope" and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ModelConfigError(
                f"ModelConfig.rotary_dim={self.rotary_dim}: expected an even number in (0, head_dim={self.head_dim}]"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelConfigError(f"ModelConfig.sliding_window={self.sliding_window!r}: expected None or >= 1")
        if self.attention_impl == "xla" and self.attn_logit_softcap is not None:
            raise ModelConfigError(f"ModelConfig.attention_impl='xla': jax.nn.dot_product_attention cannot "
                                   f"soft-cap scores (attn_logit_softcap={self.attn_logit_softcap}); use auto, "
                                   "chunked or explicit")
        if self.attention_impl == "cudnn" and self.cudnn_refusal():
            raise ModelConfigError(f"ModelConfig.attention_impl='cudnn': {self.cudnn_refusal()}; use auto, "
                                   "chunked or explicit")
        if self.num_experts is not None and not 1 <= self.experts_per_token <= self.num_experts:
            raise ModelConfigError(
                f"ModelConfig.experts_per_token={self.experts_per_token!r}: expected 1..num_experts={self.num_experts}"
            )
        if self.num_experts is not None and (self.mlp != "gated" or self.mlp_bias):
            raise ModelConfigError("ModelConfig: experts (num_experts) are gated MLPs without biases")
        self._check_rope_scaling()

    def _check_rope_scaling(self):
        s = self.rope_scaling
        if s is None:
            return
        if self.position != "rope" or s.rope_type not in ROPE_KEYS:
            raise ModelConfigError(f"ModelConfig.rope_scaling={s}: needs position='rope' and a rope_type of "
                                   f"{tuple(ROPE_KEYS)}")
        for key in ROPE_KEYS[s.rope_type][0]:
            if getattr(s, key) is None:
                raise ModelConfigError(f"ModelConfig.rope_scaling: rope_type {s.rope_type!r} needs {key!r}")
        for key in ("short_factor", "long_factor"):
            value = getattr(s, key)
            if value is not None and len(value) != self.rotary_dim // 2:
                raise ModelConfigError(f"ModelConfig.rope_scaling.{key} has {len(value)} entries; expected "
                                       f"rotary_dim // 2 = {self.rotary_dim // 2}")
        if s.rope_type == "dynamic" and self.rotary_dim <= 2:
            raise ModelConfigError(f"ModelConfig.rotary_dim={self.rotary_dim}: dynamic RoPE needs more than 2")

    def cudnn_refusal(self) -> str | None:
        """Why cuDNN flash attention (``attention_impl="cudnn"``) cannot serve this model, naming the field, or
        None when it can (see :mod:`fusejax.models.config`)."""
        if self.attn_logit_softcap is not None:
            return f"attn_logit_softcap={self.attn_logit_softcap}: cuDNN cannot soft-cap scores"
        if self.position == "alibi":
            return "position='alibi': cuDNN would need ALiBi as a [H, T, T] bias"
        if self.dtype not in ("bfloat16", "float16"):
            return f"dtype={self.dtype!r}: cuDNN attention runs in bfloat16 or float16 only"
        if self.head_dim % 8 or self.head_dim > 256:
            return f"head_dim={self.head_dim}: cuDNN needs a multiple of 8, at most 256"
        return None

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of ``vocab_multiple`` (rows of the embedding table)."""
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through ``sliding_window`` (and uses ``rope_local_theta``)."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
        """Our config from a Hugging Face ``config.json`` dict; ``overrides`` set fields such as dtype or remat."""
        model_type = config.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ModelConfigError(
                f"{source}: model_type={model_type!r} is not supported; supported: {sorted(HF_MODEL_TYPES)}"
            )
        fields = _PARSERS[model_type](_Reader(config, source))
        fields.update(
            model_type=model_type,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
        )
        fields.update(overrides)
        try:
            return cls(**fields)
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers v5 layout) for this model, without vocab padding."""
        out = _WRITERS[self.model_type](self)
        out.update(
            model_type=self.model_type,
            architectures=[HF_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.param_dtype,
        )
        return out


_REQUIRED = object()


class _Reader:
    """Typed access to a config.json dict; errors name the file and the field."""

    def __init__(self, config: Mapping[str, Any], source: str):
        self.config, self.source = config, source

    def get(self, key: str, default: Any = _REQUIRED, types: type | tuple[type, ...] = object, within=None,
            minimum: int = 1):
        """``config[key]`` (or ``within[key]``) of type ``types``; every int read this way is a size or count
        and must be at least ``minimum``."""
        where = within if within is not None else self.config
        if key not in where or where[key] is None:
            if default is _REQUIRED:
                raise ModelConfigError(f"{self.source}: required field {key!r} is missing")
            return default
        value = where[key]
        if types is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and types in (int, float)):
            raise ModelConfigError(f"{self.source}: field {key!r}={value!r} has the wrong type (expected {types})")
        if types is int and value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ModelConfigError(f"{self.source}: field {key!r}={value!r}: expected {what}")
        return value

    def nullable(self, key: str, default: Any, types: type | tuple[type, ...]) -> Any:
        """``config[key]`` where an explicit null turns the option off and an absent field means ``default``."""
        return self.get(key, None, types) if key in self.config else default

    def unsupported(self, key: str, value: Any, why: str = "") -> ModelConfigError:
        return ModelConfigError(f"{self.source}: field {key!r}={value!r} is not supported by fusejax{why}")

    def activation(self, key: str, default: str) -> str:
        value = self.get(key, default, str)
        if value not in ACTIVATIONS:
            raise self.unsupported(key, value, f" (activations: {ACTIVATIONS})")
        return value


def _rope(r: _Reader, head_dim: int, *, theta: float = 10000.0, v4_theta: str = "rope_theta",
          partial: tuple[str, float] | None = None, aliases: Mapping[str, str] | None = None,
          original_max: int | None = None) -> dict[str, Any]:
    """rope_theta, rotary_dim and rope_scaling from v5 ``rope_parameters`` or v4 fields (``v4_theta``,
    ``rope_scaling``...); ``theta``: the family's default base. ``partial``: (v4 field, default) of the partial
    rotary factor of a family whose transformers class rotates only part of each head (Phi-3, GPT-NeoX); None:
    the class rotates every dimension and ignores the factor, so a factor other than 1 is refused.
    ``aliases``, ``original_max``: see :func:`_rope_scaling`."""
    params = dict(r.get("rope_parameters", {}, dict))
    scaling = r.get("rope_scaling", None, dict)
    if scaling is not None:  # v4 layout: rope_scaling holds only the scaling part
        params = {**scaling, **params}
    field = "rope_scaling" if scaling is not None and r.config.get("rope_parameters") is None else "rope_parameters"
    read_theta = r.get("rope_theta", None, float, within=params)
    theta = r.get(v4_theta, theta, float) if read_theta is None else read_theta
    v4_partial, default_partial = partial or ("partial_rotary_factor", 1.0)
    factor_field = f"{field}.partial_rotary_factor" if "partial_rotary_factor" in params else v4_partial
    factor = r.get("partial_rotary_factor", None, float, within=params)
    factor = r.get(v4_partial, default_partial, float) if factor is None else factor
    if partial is None and factor != 1.0:
        raise r.unsupported(factor_field, factor, f" (transformers' {r.config['model_type']} class rotates every "
                            "dimension of a head and ignores it)")
    return {"position": "rope", "rope_theta": theta, "rotary_dim": int(head_dim * factor),
            "rope_scaling": _rope_scaling(r, params, field, aliases, original_max)}


def _rope_scaling(r: _Reader, params: dict[str, Any], field: str, aliases: Mapping[str, str] | None = None,
                  original_max: int | None = None) -> RopeScaling | None:
    """The scaling part of the RoPE parameters ``params`` read from ``field``; None for rope_type ``default``.
    ``aliases``: old rope_type names of this family; ``original_max``: the family's own
    ``original_max_position_embeddings``, which takes priority over the one in the rope parameters."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = (aliases or {}).get(rope_type, rope_type)
    if rope_type == "default":
        return None
    if rope_type not in ROPE_KEYS:
        raise r.unsupported(field, params, f" (rope_type {rope_type!r}; implemented: default, {', '.join(ROPE_KEYS)})")
    required, optional = ROPE_KEYS[rope_type]
    sub = _Reader(params, f"{r.source}: field {field!r}")
    for key in params:
        if key not in (*required, *optional, "rope_type", "type", "rope_theta", "partial_rotary_factor"):
            raise r.unsupported(f"{field}.{key}", params[key], f" with rope_type {rope_type!r}")
    types = {"original_max_position_embeddings": int, "truncate": bool, "short_factor": list, "long_factor": list}
    values = {key: sub.get(key, _REQUIRED if key in required else None, types.get(key, float))
              for key in (*required, *optional)}
    for key in ("short_factor", "long_factor"):
        if values.get(key) is not None:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values[key]):
                raise r.unsupported(f"{field}.{key}", values[key], " (expected a list of numbers)")
            values[key] = tuple(float(v) for v in values[key])
    if rope_type in USES_ORIGINAL_MAX:  # as transformers' standardize_rope_params: a top-level value wins
        original_max = original_max or r.get("original_max_position_embeddings", None, int)
        values["original_max_position_embeddings"] = original_max or values["original_max_position_embeddings"]
    return RopeScaling(rope_type, **values)


def _read_sizes(r: _Reader, *, kv_heads: int | None, head_dim: int | None, max_positions: int,
                norm_eps: float) -> dict[str, Any]:
    """The size fields every Llama- and Gemma-style config.json names alike (:func:`_write_sizes` writes them);
    the keyword arguments are the family's defaults for absent fields (None: the number of heads for
    ``kv_heads``, hidden_size // num_attention_heads for ``head_dim``)."""
    hidden, heads = r.get("hidden_size", types=int), r.get("num_attention_heads", types=int)
    return dict(
        vocab_size=r.get("vocab_size", types=int),
        hidden_size=hidden,
        intermediate_size=r.get("intermediate_size", types=int),
        num_layers=r.get("num_hidden_layers", types=int),
        num_heads=heads,
        num_kv_heads=r.get("num_key_value_heads", kv_heads or heads, int),
        head_dim=r.get("head_dim", head_dim, int) or hidden // heads,
        max_position_embeddings=r.get("max_position_embeddings", max_positions, int),
        norm_eps=r.get("rms_norm_eps", norm_eps, float),
    )


def _llama(r: _Reader, *, kv_heads: int | None = None, head_dim: int | None = None, max_positions: int = 2048,
           norm_eps: float = 1e-6, **rope) -> dict[str, Any]:
    """The fields every Llama-style family shares; keyword arguments: the family's defaults for absent fields
    (see :func:`_read_sizes`), ``rope``: options of :func:`_rope`."""
    sizes = _read_sizes(r, kv_heads=kv_heads, head_dim=head_dim, max_positions=max_positions, norm_eps=norm_eps)
    return dict(
        arch="llama",
        **sizes,
        norm="rms",
        **_rope(r, sizes["head_dim"], **rope),
        mlp="gated",
        activation=r.activation("hidden_act", "silu"),
        tie_embeddings=r.get("tie_word_embeddings", False, bool),
    )


def _llama_family(r: _Reader) -> dict[str, Any]:
    return dict(_llama(r), attention_bias=r.get("attention_bias", False, bool), mlp_bias=r.get("mlp_bias", False, bool))


def _mistral(r: _Reader) -> dict[str, Any]:
    """No bias options; its own default window is 4096 when the field is absent."""
    return dict(_llama(r, kv_heads=8, max_positions=131072), sliding_window=r.nullable("sliding_window", 4096, int))


def _mixtral(r: _Reader) -> dict[str, Any]:
    """Mistral's layers (no bias options; no window when the field is absent) with a mixture of experts."""
    jitter = r.get("router_jitter_noise", 0.0, float)
    if jitter:
        raise r.unsupported("router_jitter_noise", jitter, " (only 0.0)")
    return dict(_llama(r, kv_heads=8, max_positions=131072, norm_eps=1e-5, theta=1e6),
                sliding_window=r.get("sliding_window", None, int),
                num_experts=r.get("num_local_experts", 8, int), experts_per_token=r.get("num_experts_per_tok", 2, int))


def _qwen_window(r: _Reader) -> dict[str, Any]:
    """Qwen's ``sliding_window`` (only with ``use_sliding_window``) on the layers ``layer_types`` names, by
    default those from ``max_window_layers`` on."""
    window = r.get("sliding_window", 4096, int) if r.get("use_sliding_window", False, bool) else None
    layer_types = r.get("layer_types", None, list)
    if layer_types is None and window is not None:
        first = r.get("max_window_layers", 28, int, minimum=0)
        layers = r.get("num_hidden_layers", types=int)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if layer_types is not None and not set(layer_types) <= set(LAYER_TYPES):
        raise r.unsupported("layer_types", layer_types, f" (each one of {LAYER_TYPES})")
    return dict(sliding_window=window, layer_types=layer_types)


def _qwen2(r: _Reader) -> dict[str, Any]:
    return dict(_llama(r, kv_heads=32, max_positions=32768), attention_bias=True, attention_out_bias=False,
                **_qwen_window(r))


def _qwen3(r: _Reader) -> dict[str, Any]:
    return dict(_llama(r, kv_heads=32, head_dim=128, max_positions=32768),
                attention_bias=r.get("attention_bias", False, bool), qk_norm=True, **_qwen_window(r))


def _phi3(r: _Reader) -> dict[str, Any]:
    """Old rope types ``su`` and ``yarn`` mean LongRoPE; ``original_max_position_embeddings`` is a top-level field
    (default 4096); the window, when set, is on every layer."""
    fields = _llama(r, max_positions=4096, norm_eps=1e-5, partial=("partial_rotary_factor", 1.0),
                    aliases={"su": "longrope", "yarn": "longrope"},
                    original_max=r.get("original_max_position_embeddings", 4096, int))
    scaling = fields.get("rope_scaling")
    if scaling is not None and scaling.rope_type != "longrope":
        raise r.unsupported("rope_parameters", scaling.rope_type, " (phi3: only 'default' or 'longrope')")
    return dict(fields, sliding_window=r.get("sliding_window", None, int))


def _gemma(r: _Reader, *, max_positions: int, pattern: int) -> dict[str, Any]:
    """The fields Gemma 2 and Gemma 3 text share; absent fields take transformers' defaults (``max_positions``:
    the family's max_position_embeddings; ``pattern``: without ``layer_types``, every pattern-th layer is global)."""
    if r.config.get("use_bidirectional_attention"):
        raise r.unsupported("use_bidirectional_attention", r.config["use_bidirectional_attention"], " (only false)")
    sizes = _read_sizes(r, kv_heads=4, head_dim=256, max_positions=max_positions, norm_eps=1e-6)
    layer_types = r.get("layer_types", None, list)
    if layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(sizes["num_layers"])]
    if not set(layer_types) <= set(LAYER_TYPES):
        raise r.unsupported("layer_types", layer_types, f" (each one of {LAYER_TYPES})")
    return dict(
        arch="gemma",
        **sizes,
        norm="rms_plus_one",
        softmax_scale=_query_pre_attn_scalar(r) ** -0.5,
        mlp="gated",
        activation=r.activation("hidden_activation", "gelu_pytorch_tanh"),
        attention_bias=r.get("attention_bias", False, bool),
        tie_embeddings=r.get("tie_word_embeddings", True, bool),
        sliding_window=r.nullable("sliding_window", 4096, int),
        layer_types=layer_types,
        post_norms=True,
        scale_embeddings=True,
    )


def _query_pre_attn_scalar(r: _Reader) -> float:
    """Gemma's ``query_pre_attn_scalar`` (scores are scaled by its inverse square root): a number > 0."""
    scalar = r.get("query_pre_attn_scalar", 256, float)
    if not scalar > 0:
        raise ModelConfigError(f"{r.source}: field 'query_pre_attn_scalar'={scalar!r}: expected a number > 0")
    return scalar


def _gemma2(r: _Reader) -> dict[str, Any]:
    """One RoPE for all layers; soft-capped attention scores and logits."""
    fields = _gemma(r, max_positions=8192, pattern=2)
    return dict(fields, **_rope(r, fields["head_dim"]),
                attn_logit_softcap=r.nullable("attn_logit_softcapping", 50.0, float),
                final_logit_softcap=r.nullable("final_logit_softcapping", 30.0, float))


def _gemma3_text(r: _Reader) -> dict[str, Any]:
    """q/k norms; global layers rotate with ``rope_theta`` and ``rope_scaling``, sliding layers with their own
    unscaled base, from v5 ``rope_parameters`` per layer type or the v4 fields (``rope_theta``,
    ``rope_scaling``, ``rope_local_base_freq``); transformers' Gemma 3 attention ignores attn_logit_softcapping."""
    params = r.get("rope_parameters", {}, dict)
    full = dict(r.get("full_attention", {}, dict, within=params))
    scaling = r.get("rope_scaling", None, dict)  # v4 layout: the global layers' scaling
    if scaling is not None:
        full = {**scaling, **full}
    field = "rope_parameters.full_attention" if scaling is None or "full_attention" in params else "rope_scaling"
    local = r.get("sliding_attention", {}, dict, within=params)
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise r.unsupported("rope_parameters.sliding_attention", local, " (only rope_type 'default')")
    theta, local_theta = r.get("rope_theta", None, float, within=full), r.get("rope_theta", None, float, within=local)
    return dict(
        _gemma(r, max_positions=131072, pattern=r.get("sliding_window_pattern", 6, int)),
        position="rope",
        rope_theta=r.get("rope_theta", 1_000_000.0, float) if theta is None else theta,
        rope_scaling=_rope_scaling(r, full, field),
        rope_local_theta=r.get("rope_local_base_freq", 10_000.0, float) if local_theta is None else local_theta,
        qk_norm=True,
        final_logit_softcap=r.nullable("final_logit_softcapping", None, float),
    )


def _gpt_neox(r: _Reader) -> dict[str, Any]:
    hidden, heads = r.get("hidden_size", types=int), r.get("num_attention_heads", types=int)
    if hidden % heads:
        raise ModelConfigError(f"{r.source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return dict(
        arch="gpt_neox",
        vocab_size=r.get("vocab_size", types=int),
        hidden_size=hidden,
        intermediate_size=r.get("intermediate_size", types=int),
        num_layers=r.get("num_hidden_layers", types=int),
        num_heads=heads,
        max_position_embeddings=r.get("max_position_embeddings", 2048, int),
        norm="layer",
        norm_eps=r.get("layer_norm_eps", 1e-5, float),
        norm_bias=True,
        **_rope(r, hidden // heads, v4_theta="rotary_emb_base", partial=("rotary_pct", 0.25)),
        parallel_residual=r.get("use_parallel_residual", True, bool),
        mlp="plain",
        activation=r.activation("hidden_act", "gelu"),
        attention_bias=r.get("attention_bias", True, bool),
        mlp_bias=True,
        tie_embeddings=r.get("tie_word_embeddings", False, bool),
    )


# MPT options fusejax does not implement: field -> value that is supported
_MPT_ATTN_DEFAULTS = {
    "attn_type": "multihead_attention",
    "clip_qkv": None,
    "qk_ln": False,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
    "alibi": True,
}
_MPT_ALIBI_BIAS_MAX = 8  # the only value transformers' MPT uses (it never reads attn_config.alibi_bias_max)


def _mpt(r: _Reader) -> dict[str, Any]:
    attn = r.get("attn_config", {}, dict)
    bias_max = r.get("alibi_bias_max", _MPT_ALIBI_BIAS_MAX, int, within=attn)
    if bias_max != _MPT_ALIBI_BIAS_MAX:
        raise r.unsupported("attn_config.alibi_bias_max", bias_max, f" (transformers' MptForCausalLM always uses "
                            f"{_MPT_ALIBI_BIAS_MAX}, whatever the field says)")
    for key, supported in _MPT_ATTN_DEFAULTS.items():
        if attn.get(key, supported) != supported:
            raise r.unsupported(f"attn_config.{key}", attn[key], f" (only {supported!r})")
    for key, supported in (("logit_scale", None), ("no_bias", True), ("embedding_fraction", 1.0)):
        if r.config.get(key, supported) != supported:
            raise r.unsupported(key, r.config[key], f" (only {supported!r})")
    hidden = r.get("d_model", types=int)
    return dict(
        arch="mpt",
        vocab_size=r.get("vocab_size", types=int),
        hidden_size=hidden,
        intermediate_size=r.get("expansion_ratio", 4, int) * hidden,
        num_layers=r.get("n_layers", types=int),
        num_heads=r.get("n_heads", types=int),
        max_position_embeddings=r.get("max_seq_len", 2048, int),
        norm="layer",
        norm_eps=r.get("layer_norm_epsilon", 1e-5, float),
        norm_bias=False,
        position="alibi",
        alibi_bias_max=_MPT_ALIBI_BIAS_MAX,
        softmax_scale=r.get("softmax_scale", None, float, within=attn),
        mlp="plain",
        activation="gelu",
        tie_embeddings=r.get("tie_word_embeddings", True, bool),
    )


def _gpt2(r: _Reader) -> dict[str, Any]:
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if r.config.get(key):
            raise r.unsupported(key, r.config[key], " (only false)")
    hidden = r.get("n_embd", types=int)
    return dict(
        arch="gpt2",
        vocab_size=r.get("vocab_size", types=int),
        hidden_size=hidden,
        intermediate_size=r.get("n_inner", 4 * hidden, int),
        num_layers=r.get("n_layer", types=int),
        num_heads=r.get("n_head", types=int),
        max_position_embeddings=r.get("n_positions", 1024, int),
        norm="layer",
        norm_eps=r.get("layer_norm_epsilon", 1e-5, float),
        norm_bias=True,
        position="learned",
        softmax_scale=None if r.get("scale_attn_weights", True, bool) else 1.0,
        mlp="plain",
        activation=r.activation("activation_function", "gelu_new"),
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=r.get("tie_word_embeddings", True, bool),
    )


_PARSERS = {"llama": _llama_family, "mistral": _mistral, "mixtral": _mixtral, "qwen2": _qwen2, "qwen3": _qwen3,
            "phi3": _phi3, "gemma2": _gemma2, "gemma3_text": _gemma3_text, "gpt_neox": _gpt_neox, "mpt": _mpt,
            "gpt2": _gpt2}


def _rope_parameters(c: ModelConfig) -> dict[str, Any]:
    params = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        params.update(c.rope_scaling.to_hf())
    if c.rotary_dim != c.head_dim:
        params["partial_rotary_factor"] = c.rotary_dim / c.head_dim
    return params


def _require(c: ModelConfig, **implied) -> None:
    """Refuse to write a config its transformers class cannot express: ``implied`` are the values it fixes."""
    for field, value in implied.items():
        if getattr(c, field) != value:
            raise ModelConfigError(f"ModelConfig.{field}={getattr(c, field)!r}: model_type {c.model_type!r} needs "
                                   f"{value!r} (transformers has no option for it)")


# what every transformers class without Gemma options fixes: no post-norms, scaled embeddings, soft-caps, local
# RoPE base or experts (Mixtral's writer overrides the last)
_NO_GEMMA = dict(post_norms=False, scale_embeddings=False, attn_logit_softcap=None, final_logit_softcap=None,
                 rope_local_theta=None, num_experts=None)
# what the Llama-style transformers classes fix
_LLAMA_STYLE = dict(norm="rms", softmax_scale=None, **_NO_GEMMA)


def _write_sizes(c: ModelConfig) -> dict[str, Any]:
    """The size fields every Llama- and Gemma-style config.json names alike."""
    return dict(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
    )


def _write_layer_types(c: ModelConfig) -> list[str]:
    """Hugging Face ``layer_types``: per layer, sliding or full attention."""
    return ["sliding_attention" if s else "full_attention" for s in c.sliding_layers]


def _write_decoder(c: ModelConfig, **implied) -> dict[str, Any]:
    """The config.json fields every Llama-style family shares, for a config with the ``implied`` values (where
    they do not say: those of ``_LLAMA_STYLE``, and every dimension of a head rotated)."""
    _require(c, **{**_LLAMA_STYLE, "rotary_dim": c.head_dim, **implied})
    return dict(_write_sizes(c), rope_parameters=_rope_parameters(c), hidden_act=c.activation)


def _write_llama(c: ModelConfig) -> dict[str, Any]:
    out = _write_decoder(c, qk_norm=False, attention_out_bias=c.attention_bias, sliding_window=None)
    return dict(out, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)


def _write_mistral(c: ModelConfig) -> dict[str, Any]:
    out = _write_decoder(c, qk_norm=False, attention_bias=False, attention_out_bias=False, mlp_bias=False,
                         layer_types=None)
    return dict(out, sliding_window=c.sliding_window)


def _write_mixtral(c: ModelConfig) -> dict[str, Any]:
    if c.num_experts is None:
        raise ModelConfigError("ModelConfig.num_experts=None: model_type 'mixtral' needs experts")
    out = _write_decoder(c, qk_norm=False, attention_bias=False, attention_out_bias=False, layer_types=None,
                         num_experts=c.num_experts)
    return dict(out, sliding_window=c.sliding_window, num_local_experts=c.num_experts,
                num_experts_per_tok=c.experts_per_token)


def _write_qwen_window(c: ModelConfig) -> dict[str, Any]:
    sliding = c.sliding_layers
    return dict(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                max_window_layers=sliding.index(True) if any(sliding) else c.num_layers,
                layer_types=_write_layer_types(c))


def _write_qwen2(c: ModelConfig) -> dict[str, Any]:
    out = _write_decoder(c, qk_norm=False, attention_bias=True, attention_out_bias=False, mlp_bias=False)
    return dict(out, **_write_qwen_window(c))


def _write_qwen3(c: ModelConfig) -> dict[str, Any]:
    out = _write_decoder(c, qk_norm=True, attention_out_bias=c.attention_bias, mlp_bias=False)
    return dict(out, attention_bias=c.attention_bias, **_write_qwen_window(c))


def _write_phi3(c: ModelConfig) -> dict[str, Any]:
    """Phi3Config takes head_dim as hidden_size // num_heads and original_max_position_embeddings at top level."""
    out = _write_decoder(c, qk_norm=False, attention_bias=False, attention_out_bias=False, mlp_bias=False,
                         layer_types=None, head_dim=c.hidden_size // c.num_heads, rotary_dim=c.rotary_dim)
    if c.rope_scaling is not None and c.rope_scaling.rope_type != "longrope":
        raise ModelConfigError(f"ModelConfig.rope_scaling={c.rope_scaling}: model_type 'phi3' has only 'longrope'")
    out["sliding_window"] = c.sliding_window
    del out["head_dim"]
    if c.rope_scaling is not None:
        out["original_max_position_embeddings"] = (c.rope_scaling.original_max_position_embeddings
                                                   or c.max_position_embeddings)
    return out


def _write_gemma(c: ModelConfig, **implied) -> dict[str, Any]:
    """The config.json fields Gemma 2 and Gemma 3 text share, for a config with what both classes fix and the
    ``implied`` values."""
    _require(c, norm="rms_plus_one", post_norms=True, scale_embeddings=True, mlp="gated", mlp_bias=False,
             num_experts=None, position="rope", rotary_dim=c.head_dim, attention_out_bias=c.attention_bias, **implied)
    scalar = c.head_dim if c.softmax_scale is None else round(c.softmax_scale**-2, 6)
    return dict(
        _write_sizes(c),
        hidden_activation=c.activation,
        attention_bias=c.attention_bias,
        query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
        sliding_window=c.sliding_window,
        layer_types=_write_layer_types(c),
        final_logit_softcapping=c.final_logit_softcap,
    )


def _write_gemma2(c: ModelConfig) -> dict[str, Any]:
    out = _write_gemma(c, qk_norm=False, rope_local_theta=None)
    return dict(out, rope_parameters=_rope_parameters(c), attn_logit_softcapping=c.attn_logit_softcap)


def _write_gemma3_text(c: ModelConfig) -> dict[str, Any]:
    """RoPE parameters per layer type: the sliding layers' are unscaled."""
    out = _write_gemma(c, qk_norm=True, attn_logit_softcap=None)
    if c.rope_local_theta is None and c.rope_scaling is not None:
        raise ModelConfigError(f"ModelConfig.rope_local_theta=None with rope_scaling={c.rope_scaling}: model_type "
                               "'gemma3_text' needs the sliding layers' own (unscaled) RoPE base")
    local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
    return dict(out, rope_parameters={"full_attention": _rope_parameters(c),
                                      "sliding_attention": {"rope_type": "default", "rope_theta": local}})


def _require_classic(c: ModelConfig, **implied) -> None:
    """Refuse what the GPT-NeoX, MPT and GPT-2 classes cannot express: besides the ``implied`` values of the
    family, a LayerNorm model with one key/value head per head of hidden_size // num_heads dims, no q/k norms,
    no sliding window, no Gemma options and no experts."""
    _require(c, **_NO_GEMMA, norm="layer", num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads,
             qk_norm=False, sliding_window=None, layer_types=None, mlp="plain", attention_out_bias=c.attention_bias,
             **implied)


def _write_gpt_neox(c: ModelConfig) -> dict[str, Any]:
    _require_classic(c, norm_bias=True, position="rope", mlp_bias=True, softmax_scale=None)
    return dict(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.norm_eps,
        rope_parameters={**_rope_parameters(c), "partial_rotary_factor": c.rotary_dim / c.head_dim},
        use_parallel_residual=c.parallel_residual,
        hidden_act=c.activation,
        attention_bias=c.attention_bias,
    )


def _write_mpt(c: ModelConfig) -> dict[str, Any]:
    _require_classic(c, norm_bias=False, position="alibi", activation="gelu", attention_bias=False, mlp_bias=False,
                     parallel_residual=False, alibi_bias_max=_MPT_ALIBI_BIAS_MAX)
    if c.intermediate_size % c.hidden_size:
        raise ModelConfigError(f"ModelConfig.intermediate_size={c.intermediate_size}: model_type 'mpt' needs a "
                               f"multiple of hidden_size={c.hidden_size} (expansion_ratio)")
    return dict(
        d_model=c.hidden_size,
        n_heads=c.num_heads,
        n_layers=c.num_layers,
        expansion_ratio=c.intermediate_size // c.hidden_size,
        max_seq_len=c.max_position_embeddings,
        layer_norm_epsilon=c.norm_eps,
        no_bias=True,
        attn_config={**_MPT_ATTN_DEFAULTS, "alibi_bias_max": _MPT_ALIBI_BIAS_MAX, "softmax_scale": c.softmax_scale},
    )


def _write_gpt2(c: ModelConfig) -> dict[str, Any]:
    _require_classic(c, norm_bias=True, position="learned", attention_bias=True, mlp_bias=True,
                     parallel_residual=False, softmax_scale=None if c.softmax_scale is None else 1.0)
    return dict(
        n_embd=c.hidden_size,
        n_inner=c.intermediate_size,
        n_layer=c.num_layers,
        n_head=c.num_heads,
        n_positions=c.max_position_embeddings,
        layer_norm_epsilon=c.norm_eps,
        activation_function=c.activation,
        scale_attn_weights=c.softmax_scale is None,
    )


_WRITERS = {"llama": _write_llama, "mistral": _write_mistral, "mixtral": _write_mixtral, "qwen2": _write_qwen2,
            "qwen3": _write_qwen3, "phi3": _write_phi3, "gemma2": _write_gemma2, "gemma3_text": _write_gemma3_text,
            "gpt_neox": _write_gpt_neox, "mpt": _write_mpt, "gpt2": _write_gpt2}
