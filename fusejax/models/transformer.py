"""One generic decoder-only Transformer in Flax NNX covering Llama/Mistral, Qwen2/3, Phi-3, GPT-NeoX/Pythia, MPT
and GPT-2.

Per-layer parameters are stacked along a leading ``layers`` axis (module :class:`Layers`) and applied with
``jax.lax.scan``, under ``jax.checkpoint`` when ``config.remat`` is not ``"none"``; what differs between layers
(whether the sliding window applies) is scanned alongside them as a per-layer array. Every ``nnx.Param`` carries
``logical_axes`` metadata (names from :mod:`fusejax.sharding`); activations are constrained by logical names
under the model's own ``rules`` (given at construction), the same rules that place its parameters.

Weight layouts (``L`` layers, ``D`` hidden, ``H``/``K`` query/kv heads, ``E`` head_dim, ``F`` mlp, ``V`` padded vocab):
  embed [V, D]; pos_embed [P, D] (learned positions); lm_head [D, V] (absent when tied)
  layers.wq [L, D, H, E]; wk, wv [L, D, K, E]; wo [L, H, E, D]; bq [L, H, E]; bk, bv [L, K, E]; bo [L, D]
  layers.q_norm_scale, k_norm_scale [L, E] (qk_norm)
  layers.w_gate, w_up [L, D, F]; w_down [L, F, D]; b_gate, b_up [L, F]; b_down [L, D]
  layers.{attn,mlp}_norm_{scale,bias} [L, D]; final_norm_{scale,bias} [D]
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
        for norm in ("attn_norm", "mlp_norm"):
            setattr(self, f"{norm}_scale", p((L, D), ("layers", "norm"), init="ones"))
            if c.norm_bias:
                setattr(self, f"{norm}_bias", p((L, D), ("layers", "norm"), init="zeros"))
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
        if c.qk_norm:
            self.q_norm_scale = p((L, E), ("layers", "head_dim"), init="ones")
            self.k_norm_scale = p((L, E), ("layers", "head_dim"), init="ones")
        mlp_in = ("w_gate", "w_up") if c.mlp == "gated" else ("w_up",)
        for name in mlp_in:
            setattr(self, name, p((L, D, F), ("layers", "embed", "mlp")))
        self.w_down = p((L, F, D), ("layers", "mlp", "embed"))
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
        self.final_norm_scale = _param(None, (D,), ("norm",), dt, init="ones")
        if c.norm_bias:
            self.final_norm_bias = _param(None, (D,), ("norm",), dt, init="zeros")
        if not c.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), dt)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        B, T = input_ids.shape
        if c.position == "learned" and T > c.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={c.max_position_embeddings}")
        dt = jnp.dtype(c.dtype)
        rules = dict(self.rules)
        key_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        if c.position == "learned":
            x = x + self.pos_embed[...][:T].astype(dt)
        x = constrain(x, ("batch", "length", "embed"), rules)
        # HF default positions 0..T-1; right padding keeps them correct
        rope = None
        if c.position == "rope":
            rope = rope_tables(T, c.rotary_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        slopes = jnp.asarray(alibi_slopes(c.num_heads, c.alibi_bias_max)) if c.position == "alibi" else None

        def body(h, xs):
            p, sliding = xs
            return _layer(c, rules, p, h, Visibility(key_valid, sliding), rope, slopes), None

        policy = REMAT_POLICIES[c.remat]
        if c.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (self.layers.arrays(), jnp.asarray(c.sliding_layers)))

        x = _norm(c, x, self.final_norm_scale[...], self.final_norm_bias[...] if c.norm_bias else None)
        if c.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
        if c.padded_vocab_size > c.vocab_size:  # XLA does not drop an all-true mask, and it costs a pass
            logits = jnp.where(jnp.arange(c.padded_vocab_size) < c.vocab_size, logits, -jnp.inf)
        return constrain(logits, ("batch", "length", "vocab"), rules)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``rotary_dim`` features of x [B, T, heads, E] (rotate-half); the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
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


def _norm(c: ModelConfig, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    if c.norm == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + c.norm_eps)
    if c.norm == "rms":  # HF Llama casts back to the input dtype before the scale
        return scale.astype(x.dtype) * y.astype(x.dtype)
    y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Visibility(NamedTuple):
    """Which keys a query may attend to: key s is a token (``key_valid`` [B, T] bool), s <= q, and, when this
    layer's ``sliding`` flag (a scanned bool scalar) is set, q - s < ``config.sliding_window``."""

    key_valid: jax.Array
    sliding: jax.Array

    def mask(self, c: ModelConfig, q_pos: jax.Array) -> jax.Array:
        """[B, Tq, T] bool for queries at positions ``q_pos`` [Tq] int32."""
        dist = q_pos[:, None] - jnp.arange(self.key_valid.shape[1])[None, :]
        allowed = dist >= 0
        if c.sliding_window is not None:
            allowed &= ~self.sliding | (dist < c.sliding_window)
        return allowed[None] & self.key_valid[:, None, :]


def attention_impl(c: ModelConfig, T: int) -> str:
    """The attention path ``_attention`` takes for sequences of ``T`` tokens: ``config.attention_impl``, or for
    ``auto`` chunked when ``T > attention_chunk`` and ``xla`` otherwise (see :mod:`fusejax.models.config`)."""
    if c.attention_impl != "auto":
        return c.attention_impl
    return "chunked" if T > c.attention_chunk else "xla"


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
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) * scale
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


def _xla_attention(c: ModelConfig, q, k, v, vis: Visibility, slopes) -> jax.Array:
    """``jax.nn.dot_product_attention`` (XLA's implementation) of q [B, T, K, G, E] -> [B, T, K, G, E]: causal,
    padding as a [B, 1, 1, T] key mask, the sliding window as its ``local_window_size`` (both variants under
    ``lax.cond`` when the flag varies by layer), ALiBi as its bias."""
    B, T, K, G, E = q.shape
    scale = c.head_dim**-0.5 if c.softmax_scale is None else c.softmax_scale
    pos = jnp.arange(T)
    bias = None if slopes is None else _alibi_bias(slopes, pos, pos)[None]

    def run(window: int | None):
        return jax.nn.dot_product_attention(
            q.reshape(B, T, K * G, E), k, v, bias, vis.key_valid[:, None, None, :], scale=scale, is_causal=True,
            local_window_size=None if window is None else (window - 1, 0)).reshape(B, T, K, G, E)

    sliding = set(c.sliding_layers)
    if sliding == {False}:
        return run(None)
    if sliding == {True}:
        return run(c.sliding_window)
    return jax.lax.cond(vis.sliding, lambda: run(c.sliding_window), lambda: run(None))


def _attention(c: ModelConfig, rules: dict, p: dict, h: jax.Array, vis: Visibility, rope, slopes) -> jax.Array:
    """Grouped-query self-attention of h [B, T, D] -> [B, T, D]; softmax in float32 on every path
    (:func:`attention_impl`); ``slopes`` [H] float32: ALiBi, or None."""
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
    if impl == "xla":
        out = _xla_attention(c, q, k, v, vis, slopes)
    elif impl == "chunked":
        out = _chunked_attention(c, q, k, v, vis, slopes)
    else:
        out = _softmax_attention(c, q, k, v, jnp.arange(T), vis, slopes)
    out = jnp.einsum("bthe,hed->btd", out.reshape(B, T, c.num_heads, c.head_dim), p["wo"].astype(dt))
    if c.attention_out_bias:
        out = out + p["bo"].astype(dt)
    return out


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


def _layer(c: ModelConfig, rules: dict, p: dict, x: jax.Array, vis: Visibility, rope, slopes) -> jax.Array:
    """One pre-norm decoder layer on x [B, T, D] with this layer's parameters ``p`` (sliced by scan)."""
    attn_in = _norm(c, x, p["attn_norm_scale"], p.get("attn_norm_bias"))
    attn = _attention(c, rules, p, attn_in, vis, rope, slopes)
    if c.parallel_residual:
        x = x + attn + _mlp(c, rules, p, _norm(c, x, p["mlp_norm_scale"], p.get("mlp_norm_bias")))
    else:
        x = x + attn
        x = x + _mlp(c, rules, p, _norm(c, x, p["mlp_norm_scale"], p.get("mlp_norm_bias")))
    return constrain(x, ("batch", "length", "embed"), rules)
