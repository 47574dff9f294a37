"""The train step, built once and shared by the trainer and ``fusejax plan``: its options, the optimizer, the
loss on the model's logits, the jitted step with explicit shardings and donated state, and its FLOPs.

``step(state, batch) -> (state, metrics)``: state is ``{"params", "opt_state", "step"}``; the batch holds the
fields of :data:`fusejax.schema.STEP_AXES` (see :func:`fusejax.schema.row_layout`) with a leading micro-batch
axis of size ``grad_accum``. The loss is :func:`fusejax.fusion.chunked_fusion_loss` on the model's
hidden states and head (:meth:`Transformer.hidden_states`, :func:`head_logits`), which holds float32 logits for
``train.loss_chunk`` positions of each row at a time, never ``[B,T,V]``; rows without fusion tables
(CLM-only training, ``train.lm_weight=1`` with schedule ``hard``) get one empty table entry per position,
so the fusion term vanishes. Gradient accumulation averages the micro-batches' gradients; each micro-batch's
loss is a mean over its own scored tokens, so the result equals the full-batch gradient when micro-batches
hold equal token counts.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fusejax import sharding
from fusejax.config import Config, TrainConfig
from fusejax.fusion import chunked_fusion_loss, lm_weight_schedule
from fusejax.models import ModelConfig
from fusejax.models.transformer import head_logits
from fusejax.schema import STEP_AXES

INT32_MAX = 2**31 - 1

# dense bf16 peak FLOP/s per device by device_kind substring (for MFU when train.peak_flops is null)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6": 918e12}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step (hashable; part of the compiled function)."""

    total_steps: int
    grad_accum: int = 1
    lm_weight: float = 0.9
    schedule: str = "hard"
    fusion: str = "min_ce"
    loss_type: str = "ce"
    temperature: float = 1.0
    target_source: int | None = None
    compute_dtype: str = "float32"
    loss_chunk: int = 256

    @property
    def clm_only(self) -> bool:
        """Whether the fusion term has weight 0 throughout (plain causal-LM training)."""
        return self.lm_weight == 1.0 and self.schedule == "hard"

    @classmethod
    def from_config(cls, tc: TrainConfig, total_steps: int, target_source: int | None = None) -> StepOptions:
        return cls(total_steps=total_steps, grad_accum=tc.grad_accum, lm_weight=tc.lm_weight, schedule=tc.schedule,
                   fusion=tc.fusion, loss_type=tc.loss_type, temperature=tc.temperature,
                   target_source=target_source, compute_dtype=tc.compute_dtype, loss_chunk=tc.loss_chunk)


def make_optimizer(tc: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with global-norm clipping, its learning-rate schedule: linear warmup from 0 over
    ``round(warmup_ratio * total_steps)`` steps, then cosine decay to 0 at ``total_steps``), from the
    ``train`` config section (lr, b1, b2, weight_decay, warmup_ratio, clip_norm; clip_norm 0: no clipping)."""
    warmup = int(round(tc.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )
    adamw = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)
    return (optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw) if tc.clip_norm > 0 else adamw), schedule


def opt_state_shardings(tx: optax.GradientTransformation, params):
    """Shardings of ``tx``'s state for ``params`` (arrays or ShapeDtypeStructs with NamedShardings): every
    parameter-shaped entry (AdamW's two moments) sharded like its parameter, the rest (step counters)
    replicated. Pass as ``out_shardings`` of ``jax.jit(tx.init)``: left to XLA, the freshly zeroed moments
    come out replicated on every device."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, p: p.sharding, jax.eval_shape(tx.init, params), params,
                                 transform_non_params=lambda _: replicated)


def cast_floating(tree, dtype):
    """``tree`` with every floating-point array cast to ``dtype`` (integer arrays unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _no_tables(mb):
    """Placeholder tables for CLM-only training: one empty (-1) entry of one source per position."""
    b, t = mb["input_ids"].shape
    return dict(mb, table_ids=jnp.full((b, t, 1, 1), -1, jnp.int32), table_logits=jnp.zeros((b, t, 1, 1)),
                source_ce=jnp.zeros((b, 1)))


def make_loss_fn(graphdef, opts: StepOptions, loss_impl=None):
    """``loss_fn(params, micro_batch, lm_weight) -> (loss, metrics)``: :func:`chunked_fusion_loss` in chunks of
    ``opts.loss_chunk`` positions, or ``loss_impl`` (a function with :func:`fusejax.fusion.fusion_loss`'s
    signature) on the model's whole ``[B,T,V]`` logits (the dense references of the benchmarks). Floating
    params are cast to ``opts.compute_dtype`` first (float32 master weights stay outside)."""

    def loss_fn(params, mb, lm_w):
        model = nnx.merge(graphdef, cast_floating(params, jnp.dtype(opts.compute_dtype)))
        if "table_ids" not in mb:
            mb = _no_tables(mb)
        source_ce = mb["source_ce_token"] if "source_ce_token" in mb else mb["source_ce"]
        tables = (mb["labels"], mb["loss_mask"], mb["table_ids"], mb["table_logits"], source_ce)
        options = dict(fusion=opts.fusion, lm_weight=lm_w, loss_type=opts.loss_type, temperature=opts.temperature,
                       target_source=opts.target_source, soft_weighting=opts.schedule == "soft")
        if loss_impl is not None:
            return loss_impl(model(mb["input_ids"], mb["attention_mask"]), *tables, **options)
        hidden = model.hidden_states(mb["input_ids"], mb["attention_mask"])
        head = functools.partial(head_logits, model.config)
        batch = sharding.logical_to_spec(("batch",), rules=dict(model.rules))[0]  # the mesh axes rows split over
        batch_axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
        return chunked_fusion_loss(hidden, model.head_weight, head, *tables, chunk=opts.loss_chunk,
                                   batch_axes=batch_axes, **options)

    return loss_fn


def _lm_weight(opts: StepOptions, step):
    # "soft" weighs each position by the teacher's confidence inside fusion_loss; lm_w is then unused
    if opts.schedule == "soft":
        return jnp.float32(opts.lm_weight)
    return lm_weight_schedule(opts.schedule, opts.lm_weight, step, opts.total_steps)


def make_train_step(graphdef, tx: optax.GradientTransformation, opts: StepOptions, loss_impl=None):
    """``step(state, batch) -> (state, metrics)``; state = {"params", "opt_state", "step"}; batch fields have
    a leading micro-batch axis of size ``opts.grad_accum``; ``loss_impl``: see :func:`make_loss_fn`. Metrics
    are the micro-batch means of :func:`fusejax.fusion.fusion_loss`'s metrics (of the parameters before the
    update) plus ``grad_norm`` (before clipping) and ``skipped`` (1.0 when the loss, the gradient norm or the
    update is not finite: then the parameters and the optimizer state are returned unchanged, so no NaN or inf
    ever reaches them; the step counter advances)."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, opts, loss_impl), has_aux=True)

    def step(state, batch):
        lm_w = _lm_weight(opts, state["step"])

        def micro(mb):
            (loss, metrics), grads = grad_fn(state["params"], mb, lm_w)
            return grads, dict(metrics, loss=loss)

        # the first micro-batch seeds the accumulators; the rest (if any) are added in a scan
        acc = micro(jax.tree.map(lambda x: x[0], batch))
        if opts.grad_accum > 1:
            rest = jax.tree.map(lambda x: x[1:], batch)
            acc, _ = jax.lax.scan(lambda a, mb: (jax.tree.map(jnp.add, a, micro(mb)), None), acc, rest)
        grads, metrics = jax.tree.map(lambda x: x / opts.grad_accum, acc)
        grad_norm = optax.tree.norm(grads)
        # the update is computed twice: once only tested (each leaf reduced to "all finite" in the same pass), then
        # again inside the cond that applies it, in place of the donated state; a select between the old and the
        # new trees (or one update shared by the test and the cond) holds the new parameters, moments and updates
        # beside the old ones: up to twice the parameters' bytes more temporaries where the update is the peak
        updates = tx.update(grads, state["opt_state"], state["params"])[0]
        finite = functools.reduce(jnp.logical_and, [jnp.isfinite(x).all() for x in (
            metrics["loss"], grad_norm, *jax.tree.leaves(updates))])

        def apply(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, apply, lambda *old: old, state["params"], state["opt_state"])
        metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def size_problems(tc: TrainConfig, context: int | None) -> list[str]:
    """Sizes of the ``train`` section no step can hold, as messages naming the settings: ``train.seq_len``
    beyond the target's ``context`` (its max_position_embeddings; None: not known) and a batch of more tokens
    than int32 counts. Checked before anything is allocated (by ``validate``, the trainer and ``plan``)."""
    out = []
    if context is not None and tc.seq_len > context:
        out.append(f"train.seq_len={tc.seq_len}: more than the target's context (max_position_embeddings = "
                   f"{context})")
    tokens = tc.batch_size * tc.seq_len
    if tokens > INT32_MAX:
        out.append(f"train.batch_size={tc.batch_size} x train.seq_len={tc.seq_len} = {tokens} tokens per batch: "
                   f"more than int32 counts ({INT32_MAX})")
    return out


def batch_shardings(mesh, batch_shapes: dict[str, tuple[int, ...]], rules) -> dict[str, NamedSharding]:
    """NamedShardings for a batch whose fields (:data:`fusejax.schema.STEP_AXES`) have a leading micro-batch
    axis (never sharded), under the model's sharding ``rules`` (a mapping, see :attr:`Transformer.rules`)."""
    return {
        name: NamedSharding(mesh, PartitionSpec(
            None, *sharding.logical_to_spec(STEP_AXES[name], rules=rules, mesh=mesh, shape=shape[1:], name=name)))
        for name, shape in batch_shapes.items()
    }


def local_batch_rows(batch_sharding: NamedSharding, shape: tuple[int, ...], axis: int = 1) -> np.ndarray:
    """Sorted indices along ``axis`` (the batch axis, after the micro-batch axis) of a global array of ``shape``
    with ``batch_sharding`` that this process's devices hold: the rows it must read, in the order
    ``jax.make_array_from_process_local_data`` expects. Every row on a single process; right for any mesh."""
    rows: set[int] = set()
    for index in batch_sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.array(sorted(rows), dtype=np.int64)


def model_flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (N: parameters in matmuls, i.e. without the embedding lookup table
    unless tied) plus 12·L·T·H·E for attention scores and values (PaLM, appendix B)."""
    n = num_params - (0 if cfg.tie_embeddings else cfg.padded_vocab_size * cfg.hidden_size)
    return 6.0 * n + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def peak_flops_per_device(tc: TrainConfig) -> float | None:
    """``train.peak_flops``, else the dense bf16 peak of the first device's kind; None when unknown (CPU)."""
    if tc.peak_flops is not None:
        return tc.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def training_model_config(config: ModelConfig, tc: TrainConfig) -> ModelConfig:
    """``config`` with the ``train`` section's compute dtype, parameter dtype, remat policy and attention path."""
    return config.replace(dtype=tc.compute_dtype, param_dtype=tc.param_dtype, remat=tc.remat,
                          attention_impl=tc.attention_impl, attention_chunk=tc.attention_chunk)


def compiled_memory(compiled) -> dict[str, int]:
    """Bytes per device of a compiled function: arguments, outputs, temporaries, aliased (donated) and
    ``peak`` (= arguments + outputs + temporaries - aliased); {} where the backend does not report them."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
           "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def target_source(cfg: Config) -> int | None:
    """Index of the source that is the target model itself (same model folder), or None."""
    target = Path(cfg.target.path).resolve()
    matches = [i for i, s in enumerate(cfg.sources) if s.path and Path(s.path).resolve() == target]
    return matches[0] if matches else None


def abstract(tree):
    """``tree`` of arrays as ShapeDtypeStructs with the same shardings (what ``lower`` and Orbax restore take)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_opt_state(tx: optax.GradientTransformation, params):
    """``tx``'s state for abstract ``params`` as ShapeDtypeStructs placed by :func:`opt_state_shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(tx.init, params), opt_state_shardings(tx, params))


def compile_step(graphdef, tx: optax.GradientTransformation, opts: StepOptions, state, batch, mesh,
                 loss_impl=None):
    """:func:`make_train_step` jitted with the shardings of the abstract ``state`` and ``batch``
    (ShapeDtypeStructs with shardings, see :func:`abstract`), state donated, and compiled ahead of time on
    ``mesh``. The trainer runs the result; ``fusejax plan`` reads its :func:`compiled_memory`."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(make_train_step(graphdef, tx, opts, loss_impl),
                     in_shardings=(state_shardings, jax.tree.map(lambda x: x.sharding, batch)),
                     out_shardings=(state_shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh):
        return jitted.lower(state, batch).compile()
