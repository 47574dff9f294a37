"""Rotary position embeddings: frequencies and attention scaling per ``rope_type``, as transformers'
``modeling_rope_utils`` computes them (float32 tables in the rotate-half layout).

:class:`RopeScaling` is the scaling part of a Hugging Face ``rope_parameters`` dict (all of it but ``rope_type``
``default``, ``rope_theta`` and ``partial_rotary_factor``, which are plain ``ModelConfig`` fields).
:func:`rope_tables` gives the cos/sin tables of one attention kind at given positions; a model whose layers use
several RoPEs (e.g. a local base and a scaled global one) calls it once per kind.

  ``linear``    inverse frequencies divided by ``factor``
  ``dynamic``   NTK-aware: beyond ``max_position_embeddings`` the base grows with the sequence length
  ``yarn``      interpolation ramped between ``beta_fast`` and ``beta_slow`` rotations; cos/sin scaled by the
                attention factor (``attention_factor``, else from ``factor``, ``mscale``, ``mscale_all_dim``)
  ``longrope``  per-frequency ``short_factor``, or ``long_factor`` for sequences longer than
                ``original_max_position_embeddings``; cos/sin scaled by the attention factor
  ``llama3``    low frequencies divided by ``factor``, high ones kept, those between smoothly interpolated

``dynamic`` and ``longrope`` depend on the sequence length, static under ``jit`` for a whole batch: the tables
are those transformers computes for a fresh model and a batch of that length (its ``dynamic`` keeps the
frequencies of the longest sequence seen across calls; ours depend on the current call only). Decoding with a
KV cache passes one traced length per row: each new token is rotated for its own row's length so far, and
cached keys keep the rotation they were written with, as in transformers' ``generate``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# rope_type -> (required keys, optional keys) of rope_parameters besides rope_type, rope_theta, partial_rotary_factor
ROPE_KEYS = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor"), ("factor", "attention_factor", "original_max_position_embeddings")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
}
# rope types whose original_max_position_embeddings defaults to the model's max_position_embeddings
USES_ORIGINAL_MAX = ("yarn", "longrope", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A ``rope_type`` of :data:`ROPE_KEYS` and its parameters (``None``: absent, transformers' default)."""

    rope_type: str
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def to_hf(self) -> dict:
        """The ``rope_parameters`` entries of this scaling (lists for the factor tuples)."""
        out = {"rope_type": self.rope_type}
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


def inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None, max_position_embeddings: int,
             length: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim // 2] float32 and the factor cos/sin are multiplied by, for a sequence of
    ``length`` positions."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    base = 1.0 / theta**exponents
    s = scaling
    if s is None:
        return base.astype(np.float32), 1.0
    factor = s.factor
    if s.rope_type in USES_ORIGINAL_MAX:
        original = s.original_max_position_embeddings or max_position_embeddings
        factor = factor or max_position_embeddings / original
    if s.rope_type == "linear":
        out, attention = base / factor, 1.0
    elif s.rope_type == "dynamic":
        n = max(length, max_position_embeddings)
        grown = theta * (factor * n / max_position_embeddings - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        out, attention = 1.0 / grown**exponents, 1.0
    elif s.rope_type == "llama3":
        wavelen = 2 * math.pi / base
        low, high = s.low_freq_factor, s.high_freq_factor
        scaled = np.where(wavelen > original / low, base / factor, base)
        smooth = (original / wavelen - low) / (high - low)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        out, attention = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    elif s.rope_type == "yarn":
        out, attention = _yarn(s, rotary_dim, theta, base, factor, original)
    elif s.rope_type == "longrope":
        ext = s.long_factor if length > original else s.short_factor
        out = base / np.asarray(ext, np.float64)
        attention = s.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    else:
        raise ValueError(f"rope_type {s.rope_type!r} is not implemented; implemented: {sorted(ROPE_KEYS)}")
    return out.astype(np.float32), float(attention)


def _yarn(s: RopeScaling, dim: int, theta: float, base: np.ndarray, factor: float, original: int):
    """YaRN inverse frequencies and attention factor (arXiv:2309.00071, transformers' ``_compute_yarn_parameters``)."""

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.attention_factor
    if attention is None:
        if s.mscale and s.mscale_all_dim:
            attention = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
        else:
            attention = mscale(factor)

    def correction_dim(rotations):  # the dimension index that makes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return base / factor * ramp + base * (1 - ramp), attention


def rope_tables(positions: jax.Array, length: int | jax.Array, rotary_dim: int, theta: float,
                scaling: RopeScaling | None, max_position_embeddings: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, rotary_dim] float32 at ``positions`` [..., T] int in the rotate-half layout (frequencies
    repeated twice), multiplied by the rope type's attention factor.

    ``length``: the sequence length the length-dependent types (``dynamic``, ``longrope``) scale for: an int, or
    an int32 array [...] with one length per sequence (a batch decoding with a cache, each row at its own
    length, as transformers computes them for that row alone: from ``max(position_ids) + 1`` of each call)."""
    if isinstance(length, int) or scaling is None or scaling.rope_type not in ("dynamic", "longrope"):
        freq, attention = inv_freq(rotary_dim, theta, scaling, max_position_embeddings,
                                   length if isinstance(length, int) else max_position_embeddings)
        freq = jnp.asarray(freq)
    elif scaling.rope_type == "longrope":  # the long factors beyond the original length, per row
        original = scaling.original_max_position_embeddings or max_position_embeddings
        short, attention = inv_freq(rotary_dim, theta, scaling, max_position_embeddings, original)
        long, _ = inv_freq(rotary_dim, theta, scaling, max_position_embeddings, original + 1)
        freq = jnp.where((length > original)[..., None, None], long, short)
    else:  # dynamic: inv_freq's NTK-grown base, computed per row (float32)
        n = jnp.maximum(length, max_position_embeddings).astype(jnp.float32)[..., None, None]
        exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
        grown = theta * (scaling.factor * n / max_position_embeddings - (scaling.factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        freq, attention = 1.0 / grown**exponents, 1.0
    angles = jnp.asarray(positions, jnp.float32)[..., None] * freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb) * attention, jnp.sin(emb) * attention
