"""One generic decoder-only Transformer in Flax NNX covering Llama/Mistral/Mixtral, Qwen2/3, Phi-3, Gemma 2/3,
GPT-NeoX/Pythia, MPT and GPT-2.

Per-layer parameters are stacked along a leading ``layers`` axis (module :class:`Layers`) and applied with
``jax.lax.scan``, under ``jax.checkpoint`` when ``config.remat`` is not ``"none"``. Layers that differ (sliding
window or global attention, local or global RoPE) scan a per-layer flag alongside their parameters. Every
``nnx.Param`` carries ``logical_axes`` metadata (names from :mod:`fusejax.sharding`); activations are constrained
by logical names under the model's own ``rules`` (given at construction), the same rules that place its parameters.

Decoding (:mod:`fusejax.generation`) runs the same layers through :meth:`Transformer.extend`: new tokens are written
into a preallocated :class:`KVCache` and attend to it by the explicit path, at per-row positions (left-padded rows).

Weight layouts (``L`` layers, ``D`` hidden, ``H``/``K`` query/kv heads, ``E`` head_dim, ``F`` mlp, ``V`` padded vocab,
``X`` experts):
  embed [V, D]; pos_embed [P, D] (learned positions); lm_head [D, V] (absent when tied)
  layers.wq [L, D, H, E]; wk, wv [L, D, K, E]; wo [L, H, E, D]; bq [L, H, E]; bk, bv [L, K, E]; bo [L, D]
  layers.w_gate, w_up [L, D, F]; w_down [L, F, D]; b_gate, b_up [L, F]; b_down [L, D]
  mixture of experts: layers.router [L, D, X]; w_gate, w_up [L, X, D, F]; w_down [L, X, F, D]
  layers.{attn,mlp}_norm_{scale,bias} [L, D]; post-norms layers.{attn,mlp}_out_norm_{scale,bias} [L, D]
  layers.{q,k}_norm_scale [L, E]; final_norm_{scale,bias} [D]
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusejax.models.config import ModelConfig
from fusejax.models.rope import rope_tables
from fusejax.sharding import constrain, frozen_rules

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

INIT_STD = 0.02


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` initialised with N(0, 0.02) / ones / zeros, tagged with ``logical_axes``."""
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Layers(nnx.Module):
    """The parameters of all decoder layers, each stacked with a leading ``layers`` axis."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        L, D, H, K, E, F = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        dt = jnp.dtype(c.param_dtype)
        p = functools.partial(_param, rngs, dtype=dt)
        for norm in ("attn_norm", "mlp_norm", *(("attn_out_norm", "mlp_out_norm") if c.post_norms else ())):
            setattr(self, f"{norm}_scale", p((L, D), ("layers", "norm"), init=_norm_init(c)))
            if c.norm_bias:
                setattr(self, f"{norm}_bias", p((L, D), ("layers", "norm"), init="zeros"))
        if c.qk_norm:
            self.q_norm_scale = p((L, E), ("layers", "norm"), init=_norm_init(c))
            self.k_norm_scale = p((L, E), ("layers", "norm"), init=_norm_init(c))
        self.wq = p((L, D, H, E), ("layers", "embed", "heads", "head_dim"))
        self.wk = p((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = p((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"))
        self.wo = p((L, H, E, D), ("layers", "heads", "head_dim", "embed"))
        if c.attention_bias:
            self.bq = p((L, H, E), ("layers", "heads", "head_dim"), init="zeros")
            self.bk = p((L, K, E), ("layers", "kv_heads", "head_dim"), init="zeros")
            self.bv = p((L, K, E), ("layers", "kv_heads", "head_dim"), init="zeros")
        if c.attention_out_bias:
            self.bo = p((L, D), ("layers", "embed"), init="zeros")
        mlp_in = ("w_gate", "w_up") if c.mlp == "gated" else ("w_up",)
        X = () if c.num_experts is None else (c.num_experts,)  # experts: one MLP each
        x_axis = () if c.num_experts is None else ("experts",)
        if c.num_experts is not None:
            self.router = p((L, D, c.num_experts), ("layers", "embed", None))
        for name in mlp_in:
            setattr(self, name, p((L, *X, D, F), ("layers", *x_axis, "embed", "mlp")))
        self.w_down = p((L, *X, F, D), ("layers", *x_axis, "mlp", "embed"))
        if c.mlp_bias:
            for name in mlp_in:
                setattr(self, "b" + name[1:], p((L, F), ("layers", "mlp"), init="zeros"))
            self.b_down = p((L, D), ("layers", "embed"), init="zeros")

    def arrays(self) -> dict[str, jax.Array]:
        """``{name: stacked array}`` for every parameter (the pytree that ``lax.scan`` slices per layer)."""
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class Transformer(nnx.Module):
    """Decoder-only LM: ``model(input_ids [B,T] int32, attention_mask [B,T] | None) -> logits [B,T,Vp] float32``.

    ``rules``: sharding-rule overrides (merged onto :data:`fusejax.config.DEFAULT_RULES`) that lay out both
    the parameters (:func:`fusejax.models.model_shardings`) and the activations of this model.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, rules=None):
        c = self.config = config
        self.rules = frozen_rules(rules)
        dt = jnp.dtype(c.param_dtype)
        D, V = c.hidden_size, c.padded_vocab_size
        # rows past vocab_size are padding: zero, never looked up, their logits are masked to -inf
        embed = INIT_STD * jax.random.normal(rngs.params(), (V, D), dt)
        embed = jnp.where(jnp.arange(V)[:, None] < c.vocab_size, embed, 0)
        self.embed = nnx.Param(embed, logical_axes=("vocab", "embed"))
        if c.position == "learned":
            self.pos_embed = _param(rngs, (c.max_position_embeddings, D), (None, "embed"), dt)
        self.layers = Layers(c, rngs)
        self.final_norm_scale = _param(None, (D,), ("norm",), dt, init=_norm_init(c))
        if c.norm_bias:
            self.final_norm_bias = _param(None, (D,), ("norm",), dt, init="zeros")
        if not c.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), dt)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits [B,T,Vp] float32: :meth:`logits` of :meth:`hidden_states`."""
        logits = self.logits(self.hidden_states(input_ids, attention_mask))
        return constrain(logits, ("batch", "length", "vocab"), dict(self.rules))

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The decoder's output after the final norm: input_ids [B,T] int32 -> [B,T,D] in ``config.dtype``.
        attention_mask [B,T] (1 = token) is right-padded, as every fusejax batch is (:mod:`fusejax.data`,
        :mod:`fusejax.represent`, :mod:`fusejax.harness`): tokens sit at positions 0..T-1, and the cudnn
        attention path reads only each row's length."""
        c = self.config
        B, T = input_ids.shape
        if c.position == "learned" and T > c.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={c.max_position_embeddings}")
        key_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        # HF default positions 0..T-1 (correct for right-padded rows)
        return self._decoder(input_ids, jnp.arange(T), T, key_valid)[0]

    def extend(self, input_ids: jax.Array, attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The decoder on ``T`` new tokens per row, input_ids and attention_mask [B,T], written into ``cache`` at
        slots ``cache.start .. start + T - 1`` and attending to every valid slot before them:
        ``(hidden [B,T,D] in config.dtype, updated cache)``. Rows are left-padded (padding: mask 0), so that all
        rows write the same slots; a token's position is the number of valid slots before it in its row."""
        T = input_ids.shape[1]
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache.key_valid, attention_mask.astype(bool), cache.start, 1)
        positions = jnp.cumsum(key_valid, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(positions, cache.start, T, axis=1), 0)  # [B, T]
        hidden, (k, v) = self._decoder(input_ids, positions, positions[:, -1] + 1, key_valid,
                                       (cache.k, cache.v, cache.start))
        return hidden, KVCache(k, v, key_valid, cache.start + T)

    def _decoder(self, input_ids, positions, length, key_valid, cache=None):
        """The layers and the final norm on input_ids [B,T] at ``positions`` ([T] or [B,T] int32) of sequences of
        ``length`` tokens (an int, or [B] int32: see :func:`rope_tables`), keys ``key_valid`` [B,S] (S = T, or
        the cache length): ``(hidden [B,T,D], (k, v) [L,B,S,K,E] or None)``. ``cache``: ``(k, v, start)`` of
        :class:`KVCache`, or None (queries attend to these T tokens only)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        rules = dict(self.rules)
        # (global, sliding layers): RoPE tables; the same object when they agree
        ropes = (None, None)
        if c.position == "rope":
            rope = rope_tables(positions, length, c.rotary_dim, c.rope_theta, c.rope_scaling,
                               c.max_position_embeddings)
            local = rope
            if c.rope_local_theta is not None:
                local = rope_tables(positions, length, c.rotary_dim, c.rope_local_theta, None,
                                    c.max_position_embeddings)
            ropes = (rope, local)
        slopes = jnp.asarray(alibi_slopes(c.num_heads, c.alibi_bias_max)) if c.position == "alibi" else None

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.hidden_size**0.5, dt)
        if c.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
        x = constrain(x, ("batch", "length", "embed"), rules)

        def body(h, xs):
            p, sliding, kv = xs

            def pick(both):  # this layer's RoPE tables; a select only where layers differ in them
                if both[0] is both[1] or len(set(c.sliding_layers)) == 1:
                    return both[c.sliding_layers[0]]
                return jax.tree.map(lambda a, b: jnp.where(sliding, b, a), *both)

            layer_cache = None if kv is None else (*kv, cache[2])
            return _layer(c, rules, p, h, Visibility(key_valid, sliding), pick(ropes), slopes, layer_cache)

        policy = REMAT_POLICIES[c.remat]
        if c.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        kv = None if cache is None else cache[:2]
        x, kv = jax.lax.scan(body, x, (self.layers.arrays(), jnp.asarray(c.sliding_layers), kv))
        return _norm(c, x, self.final_norm_scale[...], self.final_norm_bias[...] if c.norm_bias else None), kv

    @property
    def head_weight(self) -> jax.Array:
        """The unembedding :func:`head_logits` reads: ``embed`` [Vp, D] when tied, else ``lm_head`` [D, Vp]."""
        return self.embed[...] if self.config.tie_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head on hidden states [..., D] (any leading axes, e.g. one chunk of positions): [..., Vp] float32."""
        return head_logits(self.config, self.head_weight, hidden)


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # logical axes of KVCache.k and .v


class KVCache(NamedTuple):
    """Keys and values of every layer ``k``, ``v`` [L, B, S, K, E] in ``config.dtype`` (logical axes
    :data:`CACHE_AXES`), which of the S slots hold a token ``key_valid`` [B, S] bool, and ``start`` (int32
    scalar): the slot the next tokens are written at. :meth:`Transformer.extend` reads and updates it."""

    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    start: jax.Array

    @classmethod
    def empty(cls, c: ModelConfig, batch: int, length: int, rules) -> KVCache:
        """A cache of ``length`` slots for ``batch`` rows, all empty, laid out by its logical axes under ``rules``."""
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        zeros = constrain(jnp.zeros(shape, jnp.dtype(c.dtype)), CACHE_AXES, dict(rules))
        return cls(zeros, zeros, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def head_logits(c: ModelConfig, weight: jax.Array, hidden: jax.Array) -> jax.Array:
    """Logits [..., Vp] float32 of hidden [..., D] and the unembedding ``weight`` (:attr:`Transformer.head_weight`),
    projected in ``hidden``'s dtype with float32 accumulation, soft-capped (``final_logit_softcap``); padded
    vocabulary ids are -inf. A pure function of its arrays, so that a chunked loss can apply it (and
    differentiate it) one chunk at a time."""
    equation = "...d,vd->...v" if c.tie_embeddings else "...d,dv->...v"
    logits = jnp.einsum(equation, hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)
    logits = softcap(logits, c.final_logit_softcap)
    if c.padded_vocab_size > c.vocab_size:  # XLA does not drop an all-true mask, and it costs a pass
        logits = jnp.where(jnp.arange(c.padded_vocab_size) < c.vocab_size, logits, -jnp.inf)
    return logits


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Soft-capping (Gemma 2): ``cap * tanh(x / cap)`` elementwise, or x itself when ``cap`` is None. Applied
    to attention scores and in :func:`head_logits` (so per chunk where a loss computes logits in chunks)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``rotary_dim`` features of x [B, T, heads, E] (rotate-half) by cos, sin [T, rotary_dim]
    or [B, T, rotary_dim]; the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def alibi_slopes(num_heads: int, alibi_bias_max: float) -> np.ndarray:
    """Per-head ALiBi slopes [H] float32 in MPT's ordering (non-power-of-two head counts interleaved)."""
    n2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / np.power(2.0, np.arange(1, n2 + 1) * (alibi_bias_max / n2))
    if n2 != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.astype(np.float32)


def _alibi_bias(slopes: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[H, Tq, Tk] float32: slope_h * (k - q); it differs from MPT's slope_h * (k - T + 1) by a per-row constant."""
    dist = (k_pos[None, :] - q_pos[:, None]).astype(jnp.float32)
    return slopes[:, None, None] * dist[None]


def _norm_init(c: ModelConfig) -> str:
    """Initial norm scales: ones, or zeros where the norm multiplies by ``1 + scale``."""
    return "zeros" if c.norm == "rms_plus_one" else "ones"


def _norm(c: ModelConfig, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """RMSNorm, (1 + w) RMSNorm or LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    if c.norm == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + c.norm_eps)
    if c.norm == "rms":  # HF Llama casts back to the input dtype before the scale
        return scale.astype(x.dtype) * y.astype(x.dtype)
    if c.norm == "rms_plus_one":  # HF Gemma scales in float32, then casts
        return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Visibility(NamedTuple):
    """Which keys a query may attend to: key s is a token (``key_valid`` [B, T] bool), s <= q, and, when this
    layer's ``sliding`` flag (a scanned bool scalar) is set, q - s < ``config.sliding_window``. ``key_valid``
    is right-padded (a prefix of each row) in :meth:`Transformer.hidden_states`; in :meth:`Transformer.extend`
    (left-padded rows in a KV cache) it is not, and attention there always takes the explicit path."""

    key_valid: jax.Array
    sliding: jax.Array

    def mask(self, c: ModelConfig, q_pos: jax.Array) -> jax.Array:
        """[B, Tq, T] bool for queries at positions ``q_pos`` [Tq] int32."""
        dist = q_pos[:, None] - jnp.arange(self.key_valid.shape[1])[None, :]
        allowed = dist >= 0
        if c.sliding_window is not None:
            allowed &= ~self.sliding | (dist < c.sliding_window)
        return allowed[None] & self.key_valid[:, None, :]


def platform() -> str:
    """``jax.default_backend()``, with a GPU named by its stack: ``cuda`` (NVIDIA, where cuDNN runs) or ``rocm``."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"


def attention_impl(c: ModelConfig, T: int) -> str:
    """The attention path ``_attention`` takes for sequences of ``T`` tokens (see :mod:`fusejax.models.config`):
    ``config.attention_impl``, or for ``auto`` cudnn on an NVIDIA GPU when :meth:`ModelConfig.cudnn_refusal` has
    no objection, else chunked when ``T > attention_chunk``, else ``xla``, or ``explicit`` for soft-capped scores
    (Gemma 2), which ``jax.nn.dot_product_attention`` cannot compute. ``cudnn`` asked elsewhere is a ValueError."""
    where = platform()
    if c.attention_impl == "cudnn" and where != "cuda":
        raise ValueError(f"ModelConfig.attention_impl='cudnn' needs an NVIDIA GPU; this platform is {where!r}")
    if c.attention_impl != "auto":
        return c.attention_impl
    if where == "cuda" and c.cudnn_refusal() is None:
        return "cudnn"
    if T > c.attention_chunk:
        return "chunked"
    return "xla" if c.attn_logit_softcap is None else "explicit"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bias_and_mask(c: ModelConfig, scores, slopes, q_pos, vis: Visibility) -> jax.Array:
    """scores [B, K, G, Tq, T] float32 of queries at ``q_pos`` [Tq] plus ALiBi (``slopes`` [H] float32, or None),
    at a finite floor where ``vis`` hides the key (not -inf: rows without any visible key, i.e. fully padded
    rows, stay free of NaN). Its gradient recomputes the mask from ``q_pos`` and ``vis``: a mask (or bias)
    computed outside would be saved for the backward pass of every chunk, [B, H, T, T] again."""
    B, K, G, Tq, T = scores.shape
    if slopes is not None:
        scores = scores + _alibi_bias(slopes, q_pos, jnp.arange(T)).reshape(K, G, Tq, T)
    return jnp.where(vis.mask(c, q_pos)[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _bias_and_mask_fwd(c, scores, slopes, q_pos, vis):
    return _bias_and_mask(c, scores, slopes, q_pos, vis), (q_pos, vis)


def _bias_and_mask_bwd(c, residuals, g):
    q_pos, vis = residuals
    return jnp.where(vis.mask(c, q_pos)[:, None, None], g, 0), None, None, None


_bias_and_mask.defvjp(_bias_and_mask_fwd, _bias_and_mask_bwd)


def _softmax_attention(c: ModelConfig, q, k, v, q_pos, vis: Visibility, slopes) -> jax.Array:
    """Attention of queries q [B, Tq, K, G, E] at positions ``q_pos`` [Tq] over keys and values k, v
    [B, T, K, E] -> [B, Tq, K, G, E] in q's dtype, through the explicit scores [B, K, G, Tq, T] float32."""
    scale = c.head_dim**-0.5 if c.softmax_scale is None else c.softmax_scale
    scores = softcap(jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) * scale,
                     c.attn_logit_softcap)
    probs = jax.nn.softmax(_bias_and_mask(c, scores, slopes, q_pos, vis), axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v)


def _chunked_attention(c: ModelConfig, q, k, v, vis: Visibility, slopes) -> jax.Array:
    """:func:`_softmax_attention` one block of ``attention_chunk`` queries at a time (q padded to whole
    blocks), each block recomputed in the backward pass: scores [B, K, G, chunk, T] instead of [.., T, T]."""
    B, T, K, G, E = q.shape
    chunk = min(c.attention_chunk, T)
    n = -(-T // chunk)
    blocks = jnp.pad(q, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(blocks.reshape(B, n, chunk, K, G, E), 1, 0)

    @jax.checkpoint
    def block(args):
        q_block, start = args
        return _softmax_attention(c, q_block, k, v, start + jnp.arange(chunk), vis, slopes)

    out = jax.lax.map(block, (blocks, jnp.arange(n) * chunk))  # [n, B, chunk, K, G, E]
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, K, G, E)[:, :T]


def _fused_attention(c: ModelConfig, q, k, v, vis: Visibility, slopes, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` of q [B, T, K, G, E] -> [B, T, K, G, E] with ``implementation`` ``xla``
    or ``cudnn``: causal, the sliding window as its ``local_window_size`` (both variants under ``lax.cond`` when
    the flag varies by layer), ALiBi as its bias (xla only). Padding: xla takes ``vis.key_valid`` as a
    [B, 1, 1, T] key mask; cudnn takes no mask but per-row lengths (queries and keys), exact for right-padded
    rows, the only ones :meth:`Transformer.hidden_states` takes (queries past a row's length give zeros)."""
    B, T, K, G, E = q.shape
    scale = c.head_dim**-0.5 if c.softmax_scale is None else c.softmax_scale
    pos = jnp.arange(T)
    bias = None if slopes is None else _alibi_bias(slopes, pos, pos)[None]
    if implementation == "cudnn":
        lengths = vis.key_valid.sum(-1, dtype=jnp.int32)
        padding = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    else:
        padding = dict(mask=vis.key_valid[:, None, None, :])

    def run(window: int | None):
        return jax.nn.dot_product_attention(
            q.reshape(B, T, K * G, E), k, v, bias, scale=scale, is_causal=True,
            local_window_size=None if window is None else (window - 1, 0), implementation=implementation,
            **padding).reshape(B, T, K, G, E)

    sliding = set(c.sliding_layers)
    if sliding == {False}:
        return run(None)
    if sliding == {True}:
        return run(c.sliding_window)
    return jax.lax.cond(vis.sliding, lambda: run(c.sliding_window), lambda: run(None))


def _attention(c: ModelConfig, rules: dict, p: dict, h: jax.Array, vis: Visibility, rope, slopes, cache=None):
    """Grouped-query self-attention of h [B, T, D] -> ``(out [B, T, D], (k, v) or None)``; softmax in float32 on
    every path (:func:`attention_impl`); ``slopes`` [H] float32: ALiBi, or None. ``cache``: this layer's
    ``(k, v [B, S, K, E], start)`` of a :class:`KVCache`: the new keys and values are written at slots start..,
    the queries (slots start + t) attend over all S slots by the explicit path, and (k, v) are returned."""
    dt = h.dtype
    B, T, _ = h.shape
    q = jnp.einsum("btd,dhe->bthe", h, p["wq"].astype(dt))
    k = jnp.einsum("btd,dke->btke", h, p["wk"].astype(dt))
    v = jnp.einsum("btd,dke->btke", h, p["wv"].astype(dt))
    if c.attention_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if c.qk_norm:
        q, k = _norm(c, q, p["q_norm_scale"], None), _norm(c, k, p["k_norm_scale"], None)
    if rope is not None:
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    q = constrain(q, ("batch", "length", "heads", "head_dim"), rules)
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"), rules)
    q = q.reshape(B, T, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
    impl = attention_impl(c, T)
    if cache is not None:
        k_cache, v_cache, start = cache
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"), rules)
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"), rules)
        cache = k, v
        out = _softmax_attention(c, q, k, v, start + jnp.arange(T), vis, slopes)
    elif impl in ("xla", "cudnn"):
        out = _fused_attention(c, q, k, v, vis, slopes, impl)
    elif impl == "chunked":
        out = _chunked_attention(c, q, k, v, vis, slopes)
    else:
        out = _softmax_attention(c, q, k, v, jnp.arange(T), vis, slopes)
    out = jnp.einsum("bthe,hed->btd", out.reshape(B, T, c.num_heads, c.head_dim), p["wo"].astype(dt))
    if c.attention_out_bias:
        out = out + p["bo"].astype(dt)
    return out, cache


def _mlp(c: ModelConfig, rules: dict, p: dict, h: jax.Array) -> jax.Array:
    """act(h W_up) W_down, or act(h W_gate) * (h W_up) W_down for gated MLPs; h [B, T, D] -> [B, T, D]."""
    dt = h.dtype
    act = ACTIVATIONS[c.activation]

    def proj(name):
        y = jnp.einsum("btd,df->btf", h, p["w" + name].astype(dt))
        return y + p["b" + name].astype(dt) if c.mlp_bias else y

    u = act(proj("_gate")) * proj("_up") if c.mlp == "gated" else act(proj("_up"))
    u = constrain(u, ("batch", "length", "mlp"), rules)
    out = jnp.einsum("btf,fd->btd", u, p["w_down"].astype(dt))
    return out + p["b_down"].astype(dt) if c.mlp_bias else out


def _moe(c: ModelConfig, rules: dict, p: dict, h: jax.Array) -> jax.Array:
    """Sparse mixture of experts (Mixtral) on h [B, T, D] -> [B, T, D]: each token's ``experts_per_token``
    experts with the highest router softmax (float32), their outputs weighted by those probabilities
    renormalised to sum to 1. Dispatch is dense: every expert (an :func:`_mlp`) runs on every token and the
    others get weight 0, exact in value and gradient, at num_experts / experts_per_token times the MLP FLOPs."""
    dt, X = h.dtype, c.num_experts
    probs = jax.nn.softmax(jnp.einsum("btd,dx->btx", h, p["router"].astype(dt)).astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, c.experts_per_token)  # [B, T, k]
    weights = jnp.einsum("btk,btkx->btx", top / top.sum(-1, keepdims=True), jax.nn.one_hot(chosen, X))
    experts = {name: p[name] for name in ("w_gate", "w_up", "w_down")}
    out = jax.vmap(lambda e: _mlp(c, rules, e, h))(experts)  # [X, B, T, D]
    return jnp.einsum("xbtd,btx->btd", out, weights.astype(dt))


def _layer(c: ModelConfig, rules: dict, p: dict, x: jax.Array, vis: Visibility, rope, slopes, cache=None):
    """One pre-norm decoder layer on x [B, T, D] with this layer's parameters ``p`` (sliced by scan): ``(x,
    (k, v) or None)`` (see :func:`_attention` for ``cache``); with ``post_norms`` the attention and MLP outputs
    are normed too before they are added."""

    def pre(name, h):
        return _norm(c, h, p[f"{name}_norm_scale"], p.get(f"{name}_norm_bias"))

    def post(name, out):
        return _norm(c, out, p[f"{name}_out_norm_scale"], p.get(f"{name}_out_norm_bias")) if c.post_norms else out

    mlp = _mlp if c.num_experts is None else _moe
    attn, cache = _attention(c, rules, p, pre("attn", x), vis, rope, slopes, cache)
    if c.parallel_residual:
        x = x + post("attn", attn) + post("mlp", mlp(c, rules, p, pre("mlp", x)))
    else:
        x = x + post("attn", attn)
        x = x + post("mlp", mlp(c, rules, p, pre("mlp", x)))
    return constrain(x, ("batch", "length", "embed"), rules), cache
