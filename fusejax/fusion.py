"""The FuseLLM training loss, sparse and jit-friendly: ``λ·CLM + (1−λ)·L_fusion``.

Inputs of one batch (B examples, T positions, V padded target vocabulary, S sources, k entries per source):

- ``student_logits [B,T,V]``: the target model's logits, any float dtype (bf16 is fine); padded vocabulary
  ids may hold -inf.
- ``labels [B,T]`` int: next-token targets, already shifted (position t predicts ``labels[:, t]``).
- ``loss_mask [B,T]``: nonzero where position t is scored. Labels elsewhere may be anything (-100); they are
  never used as gather indices there.
- ``table_ids [B,T,S,k]`` int: each source's top-k at position t, mapped to target-vocabulary ids, -1 padded.
- ``table_logits [B,T,S,k]`` float: their logits (whatever sits at -1 ids, NaN included, is ignored).
- ``source_ce``: each source's cross-entropy on the text, ``[B,S]`` (sequence level) or ``[B,T,S]``
  (token level), per token or per byte: finite, or +inf for "never prefer this source".

Teacher of one source at one position: ``softmax(logits / temperature)`` over its valid (id >= 0) entries,
as the reference collator does (the student's logits are not divided by the temperature). A row with no
valid entry is *empty* (the reference alignment can produce them). With ``target_source=s0`` (the target
model's own top-k is source s0, the reference's "ref model") an empty row of another source is replaced by
s0's row at that position, keeping the source's own CE, as the reference does; otherwise the source is
*absent* there. Repeated ids are added up (a scatter-add into the dense teacher; the reference's
``scatter_`` kept one of them, but aligned tables should not repeat ids within a row).

Fusion over the sources present at a position, with rewards ``r_s = exp(-CE_s)`` in (0, 1]:

- ``min_ce``: the present source with the lowest CE (ties: the lowest source index) gives the teacher.
- ``avg_ce`` (the reference's weights): ``w_s = softmax_s(r_s)``. Because the rewards lie in (0, 1], the
  weights stay within a factor ``e`` of each other: even a much worse source keeps a sizeable share.
- ``avg_ce_norm``: ``w_s = r_s / sum(r) = softmax_s(-CE_s)``: weights follow the CE gap, so a clearly
  better source dominates (what "weights proportional to exp(-CE)" literally says).

The fused teacher ``P = sum_s w_s p_s`` lives on the ``S·k`` table ids only: the student's log-probabilities
are gathered at those ids (``log q(v) = z_v − logsumexp(z)``) and no dense ``[B,T,V]`` teacher is ever built.
``loss_type="ce"``: ``−sum_v P(v) log q(v)``; ``"kl"``: ``sum_v P(v) (log P(v) − log q(v))``, where ``P(v)``
adds up every entry carrying id v (the same token from several sources).

Masking and means: both terms are masked by the *shifted labels' mask* ``loss_mask`` (the reference masked
the fusion term by the attention mask, which also scored the last real position, whose label is padding).
CLM is the mean over scored positions. The fusion term is the mean over scored positions where at least one
source is present: a position with no source present leaves both its numerator and its denominator, so it
only carries CLM. With no such position at all the fusion term is 0; with no scored position both are 0.
The total is ``sum_t λ_t·clm_t / N + sum_t (1−λ_t)·fusion_t / N_fused``, which is ``λ·CLM + (1−λ)·L_fusion``
for a constant λ.

Weighting schedules (the reference's ``distill_*_as_gt_type``), λ being the weight of the CLM term:
``hard``: fixed λ; ``hard_and_decay``: λ rises linearly from ``lm_weight`` to 1 over training
(:func:`lm_weight_schedule`, whose result is passed as ``lm_weight``); ``soft`` (``soft_weighting=True``):
λ per position is ``1 − max_s r_s`` for ``min_ce`` and ``1 − mean_s r_s`` for the ``avg_ce`` variants, over
the sources present there (λ = 1 where none is). This is the reference's rule (``loss = (1 − r)·CLM +
r·L_fusion``), which there ran with batch size 1 and sequence-level CE only; here it applies per example, or
per token with token-level CE. ``lm_weight`` is ignored then.

The student enters through its logits (:func:`fusion_loss`, dense ``[B,T,V]``) or through its hidden states
and head (:func:`chunked_fusion_loss`, what the train step uses): the loss is ``sum coef·(logsumexp(z) −
z[id])`` over the label and the table ids, linear in fixed coefficients, so the chunked form computes the
logits of a chunk of positions, its loss and its gradients at once and keeps none of them
(:func:`sparse_cross_entropy`). Both give the same loss, metrics and gradients.

All loss math is float32 (tables of any dtype are upcast); empty rows, -1 ids, -100 labels, -inf logits and
fully masked batches give no NaN, neither in the loss nor in its gradient. The teacher side is held constant
(``stop_gradient``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FUSIONS = ("min_ce", "avg_ce", "avg_ce_norm")
LOSS_TYPES = ("ce", "kl")
SCHEDULES = ("hard", "hard_and_decay", "soft")


def lm_weight_schedule(schedule: str, lm_weight, step, total_steps: int) -> jax.Array:
    """λ, the weight of the CLM term, at ``step`` (int or traced scalar) of ``total_steps``: float32 scalar.

    ``hard``: ``lm_weight``; ``hard_and_decay``: ``lm_weight + (1 − lm_weight)·step/total_steps`` (step/total
    clipped to [0, 1]). ``soft`` is per position and depends on the sources' CE: it raises here; pass
    ``soft_weighting=True`` to :func:`fusion_loss` instead.
    """
    lam = jnp.asarray(lm_weight, jnp.float32)
    if schedule == "hard":
        return lam
    if schedule == "hard_and_decay":
        if not isinstance(total_steps, (int, np.integer)) or total_steps <= 0:
            raise ValueError(f"lm_weight_schedule: total_steps must be a positive int, got {total_steps!r}")
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        return lam + (1.0 - lam) * progress
    if schedule == "soft":
        raise ValueError(
            "lm_weight_schedule: the 'soft' schedule sets λ per position from the sources' CE; "
            "call fusion_loss(..., soft_weighting=True) instead"
        )
    raise ValueError(f"lm_weight_schedule: unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def _masked_softmax(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax of ``x`` over its last axis restricted to ``valid`` entries; 0 elsewhere and on empty rows."""
    x = jnp.where(valid, x, -jnp.inf)
    top = jnp.max(x, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(valid, jnp.exp(x - top), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def _check_inputs(shape, labels, loss_mask, table_ids, table_logits, source_ce, fusion, loss_type, temperature,
                  target_source) -> int:
    """Static checks of shapes, dtypes and options against the student's ``shape`` (B, T, ...); returns S."""

    def fail(msg):
        raise ValueError(f"fusion_loss: {msg}")

    b, t = shape[:2]
    for name, x in (("labels", labels), ("loss_mask", loss_mask)):
        if x.shape != (b, t):
            fail(f"{name} must be [B,T]={(b, t)} like the student, got shape {x.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        fail(f"labels must be integer, got dtype {labels.dtype}")
    if table_ids.ndim != 4 or table_ids.shape[:2] != (b, t):
        fail(f"table_ids must be [B,T,S,k] with B,T={(b, t)}, got shape {table_ids.shape}")
    if not jnp.issubdtype(table_ids.dtype, jnp.integer):
        fail(f"table_ids must be integer (-1 padded), got dtype {table_ids.dtype}")
    if table_logits.shape != table_ids.shape:
        fail(f"table_logits shape {table_logits.shape} differs from table_ids shape {table_ids.shape}")
    s = table_ids.shape[2]
    if source_ce.shape not in ((b, s), (b, t, s)):
        fail(f"source_ce must be [B,S]={(b, s)} or [B,T,S]={(b, t, s)}, got shape {source_ce.shape}")
    if fusion not in FUSIONS:
        fail(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    if loss_type not in LOSS_TYPES:
        fail(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        fail(f"temperature must be > 0, got {temperature!r}")
    if target_source is not None and not (isinstance(target_source, (int, np.integer)) and 0 <= target_source < s):
        fail(f"target_source must be None or a source index in [0, {s}), got {target_source!r}")
    return s


def fusion_loss(student_logits, labels, loss_mask, table_ids, table_logits, source_ce, **options
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``λ·CLM + (1−λ)·L_fusion`` of one batch from the student's logits (shapes in the module docstring):
    ``(loss, metrics)``. The options and metrics are :func:`fused_loss`'s."""
    if student_logits.ndim != 3:
        raise ValueError(f"fusion_loss: student_logits must be [B,T,V], got shape {student_logits.shape}")

    def student(ids, coef):
        z = student_logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.take_along_axis(z, ids, axis=-1)
        return _weighted_ce(coef, lse, picked), jax.lax.stop_gradient(lse), jax.lax.stop_gradient(picked)

    return fused_loss(student, student_logits.shape, labels, loss_mask, table_ids, table_logits, source_ce,
                      **options)


def chunked_fusion_loss(hidden, head_weight, head, labels, loss_mask, table_ids, table_logits, source_ce, *,
                        chunk: int, batch_axes: tuple[str, ...] = (),
                        **options) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`fusion_loss` of the logits ``head(head_weight, hidden)`` without ever holding them for more than
    ``chunk`` positions of every row (see :func:`sparse_cross_entropy`); equal to it, gradients included.

    hidden [B,T,D] (any float dtype), ``head(head_weight, hidden_chunk [B,C,D]) -> [B,C,V]`` float32 logits,
    a pure function (e.g. :func:`fusejax.models.transformer.head_logits` with its config bound). ``chunk``
    must divide T (a larger one is T). ``batch_axes``: the mesh axes the rows are split over (see
    :func:`sparse_cross_entropy`). The options and metrics are :func:`fused_loss`'s.
    """
    if hidden.ndim != 3:
        raise ValueError(f"fusion_loss: hidden must be [B,T,D], got shape {hidden.shape}")

    def student(ids, coef):
        return sparse_cross_entropy(head, head_weight, hidden, ids, coef, chunk, batch_axes)

    return fused_loss(student, hidden.shape, labels, loss_mask, table_ids, table_logits, source_ce, **options)


def fused_loss(
    student,
    shape,
    labels,
    loss_mask,
    table_ids,
    table_logits,
    source_ce,
    *,
    fusion: str = "min_ce",
    lm_weight=0.9,
    loss_type: str = "ce",
    temperature=1.0,
    target_source: int | None = None,
    soft_weighting: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``λ·CLM + (1−λ)·L_fusion`` of one batch (shapes in the module docstring): ``(loss, metrics)``.

    ``student(ids [B,T,M] int32, coef [B,T,M] float32) -> (sum(coef · (lse − z[ids])) where coef > 0,
    lse [B,T], z[ids] [B,T,M])`` computes the student's side: ``z`` are its logits (``shape`` = (B, T, ...)),
    ``lse`` their logsumexp over the vocabulary; only the first output is differentiated. Entry 0 of the M =
    1 + S·k ids is the label, the rest the table entries; ``coef`` holds each entry's weight in the loss.

    ``lm_weight``: λ, a float or traced float32 scalar (see :func:`lm_weight_schedule`); ignored with
    ``soft_weighting``. Options other than ``lm_weight`` and ``temperature`` are static.

    metrics (float32 arrays): ``loss``, ``clm_loss``, ``fusion_loss`` (the two means), ``lm_weight`` (mean λ
    over scored positions), ``source_weight [S]`` (each source's mean fusion weight over scored positions; for
    ``min_ce`` the fraction of them where it was chosen), ``no_source`` (fraction of scored positions with no
    source present; ``sum(source_weight) + no_source == 1`` when any position is scored), ``source_present
    [S]`` (fraction of scored positions where the source's own row is non-empty), ``scored_tokens``,
    ``fused_tokens``.
    """
    num_sources = _check_inputs(shape, labels, loss_mask, table_ids, table_logits, source_ce, fusion, loss_type,
                                temperature, target_source)
    b, t = labels.shape
    f32 = jnp.float32
    mask = jnp.asarray(loss_mask) != 0

    # teacher rows, empty rows filled from the target model's own row
    ids = jnp.asarray(table_ids).astype(jnp.int32)
    row_logits = jnp.asarray(table_logits).astype(f32)
    own_present = jnp.any(ids >= 0, axis=-1)  # [B,T,S]
    if target_source is not None:
        fill = ~own_present[..., None]
        ids = jnp.where(fill, ids[:, :, target_source : target_source + 1], ids)
        row_logits = jnp.where(fill, row_logits[:, :, target_source : target_source + 1], row_logits)
    valid = ids >= 0
    present = jnp.any(valid, axis=-1)  # [B,T,S]
    any_present = jnp.any(present, axis=-1)  # [B,T]
    fused = mask & any_present
    ce = jnp.asarray(source_ce).astype(f32)
    if ce.ndim == 2:
        ce = ce[:, None, :]
    ce = jnp.broadcast_to(ce, (b, t, num_sources))
    reward = jnp.exp(-ce)
    probs, weights = source_teachers(ids, row_logits, ce, fusion=fusion, temperature=temperature)

    # λ per position
    if soft_weighting:
        present_reward = jnp.where(present, reward, 0.0)
        if fusion == "min_ce":
            score = jnp.max(present_reward, axis=-1)
        else:
            score = jnp.sum(present_reward, axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1)
        lam = jax.lax.stop_gradient(jnp.where(any_present, 1.0 - score, 1.0))
    else:
        lam = jnp.broadcast_to(jnp.asarray(lm_weight, f32), (b, t))

    scored = mask.astype(f32)
    n = jnp.sum(scored)
    n_fused = jnp.sum(fused.astype(f32))
    n_safe = jnp.maximum(n, 1.0)
    n_fused_safe = jnp.maximum(n_fused, 1.0)

    # the fused sparse teacher over the S*k table entries; the label and the entries' ids and loss weights
    m = num_sources * ids.shape[-1]
    teacher = jax.lax.stop_gradient((weights[..., None] * probs).reshape(b, t, m))
    flat_ids = ids.reshape(b, t, m)
    flat_valid = valid.reshape(b, t, m)
    used = fused[..., None] & (teacher > 0)
    all_ids = jnp.concatenate([jnp.where(mask, labels, 0)[..., None], jnp.where(flat_valid, flat_ids, 0)], -1)
    coef = jnp.concatenate([jnp.where(mask, lam / n_safe, 0.0)[..., None],
                            jnp.where(used, ((1.0 - lam) / n_fused_safe)[..., None] * teacher, 0.0)], -1)
    loss, lse, picked = student(all_ids.astype(jnp.int32), jax.lax.stop_gradient(coef))

    # per-position terms (values only) for the metrics; KL adds the teacher's entropy term, a constant
    clm_tok = jnp.where(mask, lse - picked[..., 0], 0.0)
    fusion_tok = jnp.sum(jnp.where(used, teacher * (lse[..., None] - picked[..., 1:]), 0.0), axis=-1)
    if loss_type == "kl":
        # P(v) for each entry: the teacher mass of every entry carrying the same id
        same = (flat_ids[..., :, None] == flat_ids[..., None, :]) & flat_valid[..., None, :]
        mass = jnp.sum(jnp.where(same, teacher[..., None, :], 0.0), axis=-1)
        neg_entropy = jnp.sum(jnp.where(used, teacher * jnp.log(jnp.where(used, mass, 1.0)), 0.0), -1)
        fusion_tok = fusion_tok + neg_entropy
        loss = loss + jnp.sum((1.0 - lam) * neg_entropy) / n_fused_safe
    metrics = {
        "loss": loss,
        "clm_loss": jnp.sum(clm_tok) / n_safe,
        "fusion_loss": jnp.sum(fusion_tok) / n_fused_safe,
        "lm_weight": jnp.sum(lam * scored) / n_safe,
        "source_weight": jnp.sum(weights * scored[..., None], axis=(0, 1)) / n_safe,
        "no_source": jnp.sum(scored * ~any_present) / n_safe,
        "source_present": jnp.sum(own_present * scored[..., None], axis=(0, 1)) / n_safe,
        "scored_tokens": n,
        "fused_tokens": n_fused,
    }
    return loss, metrics


def source_teachers(table_ids, table_logits, source_ce, *, fusion: str = "min_ce",
                    temperature=1.0) -> tuple[jax.Array, jax.Array]:
    """Each source's teacher row and its fusion weight (module docstring): ``(probs [..., S, k], weights [..., S])``
    float32 from ``table_ids`` / ``table_logits [..., S, k]`` (-1 padded ids) and ``source_ce [..., S]``. The
    fused teacher is ``sum_s weights[s] · probs[s]``; a source whose row is empty has weight 0."""
    valid = jnp.asarray(table_ids) >= 0
    present = jnp.any(valid, axis=-1)
    ce = jnp.asarray(source_ce, jnp.float32)
    probs = _masked_softmax(jnp.asarray(table_logits, jnp.float32) / temperature, valid)
    if fusion == "min_ce":
        key = jnp.where(present, ce, jnp.inf)
        best = present & (key == jnp.min(key, axis=-1, keepdims=True))
        weights = (best & (jnp.cumsum(best, axis=-1) == 1)).astype(jnp.float32)  # first best: lowest index
    elif fusion == "avg_ce":
        weights = _masked_softmax(jnp.exp(-ce), present)
    else:
        weights = _masked_softmax(-ce, present)
    return probs, weights


def fused_topk(table_ids, table_logits, source_ce, *, top: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` most probable tokens of the fused teacher (:func:`source_teachers`; ``options``: ``fusion``,
    ``temperature``), an id that several sources give counted once with their probabilities added: ``(ids
    [..., top] int32 -1 padded, probs [..., top] float32)``, most probable first."""
    probs, weights = source_teachers(table_ids, table_logits, source_ce, **options)
    ids = np.asarray(table_ids).reshape(*np.shape(table_ids)[:-2], -1)  # [..., S·k]
    mass = np.asarray(weights[..., None] * probs).reshape(ids.shape)
    same = ids[..., :, None] == ids[..., None, :]
    total = np.where(same, mass[..., None, :], 0).sum(-1)  # each entry: the mass of every entry with its id
    first = (ids >= 0) & ~(same & np.tri(ids.shape[-1], k=-1, dtype=bool)).any(-1)
    score = np.where(first & (total > 0), total, -1.0)
    order = np.argsort(-score, axis=-1, kind="stable")[..., :top]
    keep = np.take_along_axis(score, order, -1) > 0
    pad = [(0, 0)] * (ids.ndim - 1) + [(0, top - order.shape[-1])]  # fewer than top entries (S·k < top)
    return (np.pad(np.where(keep, np.take_along_axis(ids, order, -1), -1), pad, constant_values=-1).astype(np.int32),
            np.pad(np.where(keep, np.take_along_axis(score, order, -1), 0), pad).astype(np.float32))


def _weighted_ce(coef, lse, picked):
    """``sum(coef · (lse − picked))`` over the entries with coef > 0 (others may hold -inf or garbage)."""
    return jnp.sum(jnp.where(coef > 0, coef * (lse[..., None] - picked), 0.0))


def sparse_cross_entropy(head, weight, hidden, ids, coef, chunk: int, batch_axes: tuple[str, ...] = ()):
    """``(sum(coef · (lse − z[ids])), lse [B,T], z[ids] [B,T,M])`` of the logits ``z = head(weight, hidden)``,
    never holding more than ``chunk`` positions of them (float32 ``[B,chunk,V]``), in the spirit of fused
    linear cross-entropy (Liger) and Cut Cross-Entropy.

    hidden [B,T,D]; ids [B,T,M] int; coef [B,T,M] float32, held constant (the loss is linear in it). Positions
    are processed in a scan over T/chunk chunks. Under differentiation each chunk's gradients with respect to
    ``weight`` and ``hidden`` are taken right there, in the forward pass (the cotangent of a loss is a scalar
    factor), so the logits are computed once and never stored: 3 vocabulary-sized matmuls per step, as for
    dense logits. ``lse`` and ``z[ids]`` are values only (stop_gradient): use them for metrics.

    ``batch_axes``: the mesh axes (of the mesh set by ``jax.set_mesh``) the rows of ``hidden`` are split over.
    The loss and the ``weight`` gradient are then summed over the chunks separately for each of the G row
    groups those axes hold (float32 ``[G]`` and ``[G, *weight.shape]``, one group per device along them), and
    the groups are added once after the last chunk: one reduction over those devices per call, not per chunk.
    """
    b, t = hidden.shape[:2]
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"sparse_cross_entropy: the chunk of {chunk} positions does not divide the {t} positions")
    loss, lse, picked = _sparse_ce(head, chunk, tuple(batch_axes), weight, hidden, ids, coef.astype(jnp.float32))
    return loss, jax.lax.stop_gradient(lse), jax.lax.stop_gradient(picked)


def _chunks(x, chunk):
    """[B,T,...] -> [T/chunk, B, chunk, ...] (chunks of positions first, for a scan)."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x):
    """The inverse of :func:`_chunks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunk_ce(head, weight, hidden, ids, coef):
    """:func:`sparse_cross_entropy` of one chunk: (loss, (lse, picked))."""
    z = head(weight, hidden)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, ids, axis=-1)
    return _weighted_ce(coef, lse, picked), (lse, picked)


def _scan_chunks(head, chunk, batch_axes, weight, hidden, ids, coef, with_grads: bool):
    """The scan of :func:`sparse_cross_entropy`: ((loss, lse, picked), (d weight, d hidden) or None)."""
    xs = (_chunks(hidden, chunk), _chunks(ids, chunk), _chunks(coef, chunk))
    f32 = jnp.float32
    if with_grads:
        mesh = jax.sharding.get_abstract_mesh()
        groups = 1 if mesh.empty else int(np.prod([mesh.shape[a] for a in batch_axes]))
        grad_fn = jax.vmap(jax.value_and_grad(functools.partial(_chunk_ce, head), argnums=(0, 1), has_aux=True),
                           in_axes=(None, 0, 0, 0))  # per row group: [G, B/G, ...]

        def per_group(x):  # a sum of each row group [G, ...], G split over batch_axes
            spec = jax.P(batch_axes, *[jax.P.UNCONSTRAINED] * (x.ndim - 1))
            return x if groups == 1 else jax.lax.with_sharding_constraint(x, spec)

        def body(carry, x):
            (loss, stats), (d_weight, d_hidden) = grad_fn(weight, *(a.reshape(groups, -1, *a.shape[1:]) for a in x))
            merged = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), (stats, d_hidden))
            return (carry[0] + loss, carry[1] + per_group(d_weight.astype(f32))), merged

        init = (jnp.zeros(groups, f32), per_group(jnp.zeros((groups, *weight.shape), f32)))
        (loss, d_weight), ((lse, picked), d_hidden) = jax.lax.scan(body, init, xs)
        loss, grads = loss.sum(), (d_weight.sum(0).astype(weight.dtype), _unchunk(d_hidden))
    else:
        def body(total, x):
            loss, stats = _chunk_ce(head, weight, *x)
            return total + loss, stats

        loss, (lse, picked) = jax.lax.scan(body, jnp.zeros((), f32), xs)
        grads = None
    return (loss, _unchunk(lse), _unchunk(picked)), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sparse_ce(head, chunk, batch_axes, weight, hidden, ids, coef):
    return _scan_chunks(head, chunk, batch_axes, weight, hidden, ids, coef, with_grads=False)[0]


def _sparse_ce_fwd(head, chunk, batch_axes, weight, hidden, ids, coef):
    return _scan_chunks(head, chunk, batch_axes, weight, hidden, ids, coef, with_grads=True)


def _sparse_ce_bwd(head, chunk, batch_axes, grads, cotangents):
    g = cotangents[0]  # lse and picked leave sparse_cross_entropy through stop_gradient: zero cotangents
    d_weight, d_hidden = grads
    return (g * d_weight).astype(d_weight.dtype), (g * d_hidden).astype(d_hidden.dtype), None, None


_sparse_ce.defvjp(_sparse_ce_fwd, _sparse_ce_bwd)
