"""Fused continual training: one jitted, sharded, donated train step; deterministic data; Orbax checkpoints.

Inputs per step are batches of aligned rows (see :class:`Batches`): ``input_ids``/``attention_mask``
``[B, T]``, next-token ``labels``/``loss_mask`` ``[B, T]``, fusion tables ``table_ids``/``table_logits``
``[B, T, S, k]`` and ``source_ce`` ``[B, S]`` or ``source_ce_token`` ``[B, T, S]``. The loss is
:func:`fusejax.fusion.fusion_loss`. Baselines need no code of their own: ``train.lm_weight=1`` (schedule
``hard``) is plain causal-LM training and accepts rows without tables; tables with S=1 are single-teacher
distillation.

Determinism: the training rows are read in epoch-wise permutations seeded by ``(seed, epoch)``; a step
reads the next ``batch_size`` positions of that endless stream. Checkpoints store the stream position, so a
resumed run sees exactly the rows an uninterrupted one would (even with another batch size). With several
processes, each reads only the rows its own devices hold (:func:`local_batch_rows`) and the global batch is
assembled with ``jax.make_array_from_process_local_data``.

Gradient accumulation averages the micro-batches' gradients; each micro-batch's loss is a mean over its own
scored tokens, so the result equals the full-batch gradient when micro-batches hold equal token counts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fusejax import sharding
from fusejax.fusion import fusion_loss, lm_weight_schedule
from fusejax.store import WriterLock
from fusejax.models import ModelConfig, Transformer, load_pretrained, model_shardings

log = logging.getLogger(__name__)

# logical axes of every batch field; a leading micro-batch axis is added for gradient accumulation
BATCH_AXES = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "labels": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "table_ids": ("batch", "length", "sources", "topk"),
    "table_logits": ("batch", "length", "sources", "topk"),
    "source_ce": ("batch", "sources"),
    "source_ce_token": ("batch", "length", "sources"),
}
TEXT_FIELDS = ("input_ids", "attention_mask", "labels", "loss_mask")
TABLE_FIELDS = ("table_ids", "table_logits")

# ModelConfig fields that a checkpoint may differ in (how the model runs, not what it is)
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat")

# dense bf16 peak FLOP/s per device by device_kind substring (for MFU when train.peak_flops is null)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6": 918e12}

ITEMS = ("params", "opt_state", "meta")  # Orbax items of one checkpoint


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this model (different architecture or shapes)."""


class Batches(Protocol):
    """Random-access rows of training data: ``rows(indices) -> {field: np.ndarray [len(indices), ...]}``."""

    num_rows: int

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


def stream_rows(seed: int, start: int, count: int, num_rows: int) -> np.ndarray:
    """Row indices [count] int64 at positions ``start .. start+count`` of the endless row stream: epoch e
    is the permutation of ``range(num_rows)`` drawn with ``np.random.default_rng([seed, e])``."""
    if num_rows < 1:
        raise ValueError(f"training data has {num_rows} rows; need at least one")
    flat = start + np.arange(count, dtype=np.int64)
    epochs, positions = np.divmod(flat, num_rows)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        sel = epochs == epoch
        out[sel] = perm[positions[sel]]
    return out


class SyntheticTables:
    """Deterministic random training rows (for tests and benchmarks); implements :class:`Batches`.

    Row ``i`` depends only on ``(seed, i)``: a random token sequence of ``seq_len + 1`` tokens (inputs are
    the first ``seq_len``, labels the next token), right padding of up to half the row when ``padding``,
    and per position and source a top-k table of distinct ids that holds the true next token with
    probability ``hit_rate``; a fraction ``empty_fraction`` of (position, source) rows is empty (all -1).
    ``source_ce`` is uniform in [1, 4) per row and source (``[S]``, or ``[T, S]`` with ``token_level_ce``);
    ``n_bytes`` counts 4 bytes per real token.
    """

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int, *, num_sources: int = 3, k: int = 10,
                 seed: int = 0, padding: bool = True, empty_fraction: float = 0.1, hit_rate: float = 0.7,
                 token_level_ce: bool = False, with_tables: bool = True):
        if vocab_size < 2 * (k + 1):
            raise ValueError(f"SyntheticTables: vocab_size={vocab_size} must be at least 2*(k+1)={2 * (k + 1)}")
        self.num_rows, self.seq_len, self.vocab_size = num_rows, seq_len, vocab_size
        self.num_sources, self.k, self.seed = num_sources, k, seed
        self.padding, self.empty_fraction, self.hit_rate = padding, empty_fraction, hit_rate
        self.token_level_ce, self.with_tables = token_level_ce, with_tables

    def row(self, i: int) -> dict[str, np.ndarray]:
        """The fields of row ``i`` (no leading batch axis)."""
        rng = np.random.default_rng([self.seed, int(i)])
        T, S, k, V = self.seq_len, self.num_sources, self.k, self.vocab_size
        tokens = rng.integers(0, V, T + 1)
        length = int(rng.integers(T // 2, T + 1)) if self.padding else T
        real = np.arange(T) < length
        out = {
            "input_ids": np.where(real, tokens[:T], 0).astype(np.int32),
            "attention_mask": real.astype(np.int32),
            "labels": np.where(real, tokens[1:], -100).astype(np.int32),
            "loss_mask": real.astype(np.int32),
            "n_bytes": np.int32(4 * length),  # as if every token spelled 4 bytes (for bits per byte)
        }
        if not self.with_tables:
            return out
        # distinct ids per (t, s): a start id plus strictly increasing offsets below V
        gaps = rng.integers(1, V // (k + 1), (T, S, k))
        offsets = np.cumsum(gaps, axis=-1) - gaps[..., :1]
        hit = rng.random((T, S)) < self.hit_rate
        start = np.where(hit, tokens[1:, None], rng.integers(0, V, (T, S)))
        ids = (start[..., None] + offsets) % V
        logits = -np.sort(rng.exponential(2.0, (T, S, k)), axis=-1)  # descending, top entry first
        empty = (rng.random((T, S)) < self.empty_fraction) | ~real[:, None]
        out["table_ids"] = np.where(empty[..., None], -1, ids).astype(np.int32)
        out["table_logits"] = logits.astype(np.float32)
        ce_shape = (T, S) if self.token_level_ce else (S,)
        out["source_ce_token" if self.token_level_ce else "source_ce"] = rng.uniform(1, 4, ce_shape).astype(np.float32)
        return out

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows stacked along a new leading axis: ``{field: [len(indices), ...]}``."""
        rows = [self.row(i) for i in np.asarray(indices)]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


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

    @property
    def clm_only(self) -> bool:
        """Whether the fusion term has weight 0 throughout (plain causal-LM training)."""
        return self.lm_weight == 1.0 and self.schedule == "hard"

    @classmethod
    def from_config(cls, tc, total_steps: int, target_source: int | None = None) -> StepOptions:
        return cls(total_steps=total_steps, grad_accum=tc.grad_accum, lm_weight=tc.lm_weight, schedule=tc.schedule,
                   fusion=tc.fusion, loss_type=tc.loss_type, temperature=tc.temperature,
                   target_source=target_source, compute_dtype=tc.compute_dtype)


def make_optimizer(tc, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
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


def _cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _no_tables(mb):
    """Placeholder tables for CLM-only training: one empty (-1) entry of one source per position."""
    b, t = mb["input_ids"].shape
    return dict(mb, table_ids=jnp.full((b, t, 1, 1), -1, jnp.int32), table_logits=jnp.zeros((b, t, 1, 1)),
                source_ce=jnp.zeros((b, 1)))


def make_loss_fn(graphdef, opts: StepOptions, loss_impl=fusion_loss):
    """``loss_fn(params, micro_batch, lm_weight) -> (loss, metrics)`` of ``loss_impl`` (a function with
    :func:`fusion_loss`'s signature) on the model's logits; floating params are cast to
    ``opts.compute_dtype`` first (float32 master weights stay outside)."""

    def loss_fn(params, mb, lm_w):
        model = nnx.merge(graphdef, _cast_floating(params, jnp.dtype(opts.compute_dtype)))
        if "table_ids" not in mb:
            mb = _no_tables(mb)
        logits = model(mb["input_ids"], mb["attention_mask"])
        source_ce = mb["source_ce_token"] if "source_ce_token" in mb else mb["source_ce"]
        return loss_impl(
            logits, mb["labels"], mb["loss_mask"], mb["table_ids"], mb["table_logits"], source_ce,
            fusion=opts.fusion, lm_weight=lm_w, loss_type=opts.loss_type, temperature=opts.temperature,
            target_source=opts.target_source, soft_weighting=opts.schedule == "soft",
        )

    return loss_fn


def _lm_weight(opts: StepOptions, step):
    # "soft" weighs each position by the teacher's confidence inside fusion_loss; lm_w is then unused
    if opts.schedule == "soft":
        return jnp.float32(opts.lm_weight)
    return lm_weight_schedule(opts.schedule, opts.lm_weight, step, opts.total_steps)


def make_train_step(graphdef, tx: optax.GradientTransformation, opts: StepOptions, loss_impl=fusion_loss):
    """``step(state, batch) -> (state, metrics)``; state = {"params", "opt_state", "step"}; batch fields have
    a leading micro-batch axis of size ``opts.grad_accum``. Metrics are the micro-batch means of
    :func:`fusion_loss`'s metrics (of the parameters before the update) plus ``grad_norm`` (before clipping)."""
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
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def batch_shardings(mesh, batch_shapes: dict[str, tuple[int, ...]], rules=None) -> dict[str, NamedSharding]:
    """NamedShardings for a batch whose fields have a leading micro-batch axis (never sharded)."""
    rules = sharding.merge_rules(rules)
    return {
        name: NamedSharding(mesh, PartitionSpec(
            None, *sharding.logical_to_spec(BATCH_AXES[name], rules=rules, mesh=mesh, shape=shape[1:], name=name)))
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


def peak_flops_per_device(tc) -> float | None:
    """``train.peak_flops``, else the dense bf16 peak of the first device's kind; None when unknown (CPU)."""
    if tc.peak_flops is not None:
        return tc.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def training_model_config(config: ModelConfig, tc) -> ModelConfig:
    """``config`` with the ``train`` section's compute dtype, parameter dtype and remat policy."""
    return config.replace(dtype=tc.compute_dtype, param_dtype=tc.param_dtype, remat=tc.remat)


def build_target(tc, mesh, *, path: str | None = None, config: ModelConfig | None = None, rules=None,
                 seed: int = 0) -> Transformer:
    """The target model for training, on ``mesh``: loaded from the Hugging Face folder ``path``, or randomly
    initialized from ``config``; dtypes and remat policy from the ``train`` section ``tc``."""
    if (path is None) == (config is None):
        raise ValueError("build_target: pass exactly one of path= (a Hugging Face folder) or config= (a ModelConfig)")
    if path is not None:
        return load_pretrained(path, dtype=tc.param_dtype, compute_dtype=tc.compute_dtype, remat=tc.remat,
                               mesh=mesh, rules=rules)
    model = Transformer(training_model_config(config, tc), rngs=nnx.Rngs(seed))
    nnx.update(model, jax.device_put(nnx.state(model), model_shardings(model, mesh, rules)))
    return model


def _arch(config: ModelConfig | dict) -> dict:
    d = dataclasses.asdict(config) if isinstance(config, ModelConfig) else dict(config)
    d = {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}
    if isinstance(d.get("eos_token_id"), (list, tuple)):
        d["eos_token_id"] = list(d["eos_token_id"])
    return d


def checkpoint_manager(directory: str | Path, *, max_to_keep: int | None = None, read_only: bool = False):
    """The Orbax CheckpointManager of a ``checkpoints`` folder (items: params, opt_state, meta)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


def read_meta(manager, step: int) -> dict:
    """The JSON metadata of checkpoint ``step``: step, data_position, seed, model (ModelConfig fields), config."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(manager, step: int, abstract_params):
    """Parameters of checkpoint ``step`` restored onto ``abstract_params`` (ShapeDtypeStructs with shardings)."""
    return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Trainer:
    """Owns the model, optimizer, compiled step, checkpoints and metric logging for one training run.

    ``model``: a fusejax Transformer; only its parameters are used (moved to ``mesh`` by their logical axes
    and cast to ``train.param_dtype``); the compute dtype and remat policy come from ``tc``. Its arrays may
    be donated to the first step: do not use ``model`` afterwards, use :meth:`model`. ``data``:
    :class:`Batches` of training rows; ``tc``: the ``train`` config section; ``out_dir``: checkpoints go to
    ``<out_dir>/checkpoints``, TensorBoard events to ``<out_dir>/tb``. ``config``: the resolved run config
    (stored in checkpoints). If ``<out_dir>/checkpoints`` holds a checkpoint, training resumes from the
    latest one (:class:`CheckpointMismatchError` if it belongs to another model). ``eval_data``: held-out
    rows scored every ``train.eval_every`` steps, ``eval_batch_size`` rows at a time (default: the
    micro-batch size), at most ``eval_max_batches`` batches (default: all).
    """

    def __init__(self, model, data: Batches, tc, out_dir: str | Path, *, mesh, rules=None, seed: int = 0,
                 target_source: int | None = None, eval_data: Batches | None = None, config=None,
                 source_names: list[str] | None = None, eval_batch_size: int | None = None,
                 eval_max_batches: int | None = None):
        self.tc, self.mesh, self.rules, self.seed = tc, mesh, rules, seed
        self.eval_batch_size = eval_batch_size or tc.batch_size // tc.grad_accum
        self.eval_max_batches = eval_max_batches
        self.data, self.eval_data, self.source_names = data, eval_data, source_names
        self.out_dir = Path(out_dir)
        self.resolved_config = _plain(config)
        if tc.batch_size % tc.grad_accum:
            raise ValueError(f"train.batch_size={tc.batch_size} is not a multiple of train.grad_accum={tc.grad_accum}")
        self.total_steps = tc.steps or max(1, data.num_rows // tc.batch_size)
        self.model_config = training_model_config(model.config, tc)
        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(self.model_config, rngs=nnx.Rngs(0))))
        self.tx, self.lr_schedule = make_optimizer(tc, self.total_steps)
        self.opts = StepOptions.from_config(tc, self.total_steps, target_source)

        param_shardings = nnx.to_pure_dict(model_shardings(model, mesh, rules))
        params = _cast_floating(nnx.to_pure_dict(nnx.state(model, nnx.Param)), jnp.dtype(tc.param_dtype))
        params = jax.device_put(params, param_shardings)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        with jax.set_mesh(mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=opt_state_shardings(self.tx, params))(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
        self.state = {"params": params, "opt_state": opt_state, "step": step}
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.data_position = 0  # rows of the stream consumed so far
        self.ckpt = checkpoint_manager(self.out_dir / "checkpoints", max_to_keep=tc.keep_checkpoints)
        self.restore_latest()

        example = self.data.rows(stream_rows(self.seed, 0, 1, self.data.num_rows))  # one row: fields, shapes
        example = {k: v for k, v in example.items() if k in BATCH_AXES}
        missing = [f for f in TEXT_FIELDS if f not in example]
        if not self.opts.clm_only:
            missing += [f for f in TABLE_FIELDS if f not in example]
            if "source_ce" not in example and "source_ce_token" not in example:
                missing.append("source_ce or source_ce_token")
        if missing:
            raise ValueError(f"training rows lack fields {missing} (train.lm_weight={tc.lm_weight}, "
                             f"schedule={tc.schedule!r}; tables may be left out only for lm_weight=1 and 'hard')")
        self.seq_len = example["input_ids"].shape[-1]
        if self.seq_len != tc.seq_len:
            raise ValueError(f"training rows hold {self.seq_len} tokens but train.seq_len={tc.seq_len}")
        micro = (tc.grad_accum, tc.batch_size // tc.grad_accum)
        self.batch_shapes = {k: (*micro, *v.shape[1:]) for k, v in example.items()}
        self.batch_dtypes = {k: v.dtype for k, v in example.items()}
        self.batch_shardings = batch_shardings(mesh, self.batch_shapes, rules)
        # this process's rows of each micro-batch (all of them on a single process)
        self.local_rows = local_batch_rows(self.batch_shardings["input_ids"], self.batch_shapes["input_ids"])
        self.compiled = self._compile(make_train_step(self.graphdef, self.tx, self.opts))
        # one trainer per output folder: a second concurrent run refuses, naming the holder (process 0 locks)
        self._lock = WriterLock(self.out_dir / "trainer.lock") if jax.process_index() == 0 else None
        if self._lock is not None:  # a killed save's unfinished folder: never restored from, so removed
            for unfinished in (self.out_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(unfinished)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return int(self.state["step"])

    # -- data -------------------------------------------------------------------------------------------
    def _host_batch(self, position: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at stream positions ``position .. position+batch_size``, split into
        micro-batches: ``{field: [grad_accum, len(local_rows), ...]}`` (only these rows are read)."""
        tc = self.tc
        micro = tc.batch_size // tc.grad_accum
        indices = stream_rows(self.seed, position, tc.batch_size, self.data.num_rows).reshape(tc.grad_accum, micro)
        rows = self.data.rows(indices[:, self.local_rows].reshape(-1))
        return {k: v.reshape(tc.grad_accum, len(self.local_rows), *v.shape[1:]) for k, v in rows.items()
                if k in BATCH_AXES}

    def _batch(self, position: int) -> dict[str, jax.Array]:
        """The global batch at stream ``position`` (see :meth:`_host_batch`), assembled from every process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v, self.batch_shapes[k])
                for k, v in self._host_batch(position).items()}

    # -- compile ----------------------------------------------------------------------------------------
    def _compile(self, step_fn):
        """Compile ``step_fn`` ahead of time for the state and batch layouts; logs its memory per device."""
        jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_shardings),
                         out_shardings=(self.state_shardings, None), donate_argnums=0)
        abstract_batch = {k: jax.ShapeDtypeStruct(shape, self.batch_dtypes[k], sharding=self.batch_shardings[k])
                          for k, shape in self.batch_shapes.items()}
        with jax.set_mesh(self.mesh):
            compiled = jitted.lower(_abstract(self.state), abstract_batch).compile()
        self.memory = compiled_memory(compiled)
        if self.memory:
            log.info("compiled train step, bytes per device: %s", self.memory)
        return compiled

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, wait: bool = False):
        """Start an (asynchronous) checkpoint of the current state; ``wait``: block until it is complete."""
        step = self.step
        meta = {"step": step, "data_position": self.data_position, "seed": self.seed,
                "model": dataclasses.asdict(self.model_config), "config": self.resolved_config}
        self.ckpt.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.state["params"]),
            opt_state=ocp.args.StandardSave(self.state["opt_state"]),
            meta=ocp.args.JsonSave(meta)))
        if wait:
            self.ckpt.wait_until_finished()

    def restore_latest(self) -> int | None:
        """Restore the newest complete checkpoint onto this trainer's shardings; returns its step or None."""
        step = self.ckpt.latest_step()
        if step is None:
            return None
        where = f"{self.ckpt.directory}/{step}"
        meta = read_meta(self.ckpt, step)
        saved, ours = _arch(meta["model"]), _arch(self.model_config)
        if saved != ours:
            keys = sorted(set(saved) | set(ours))
            diff = {k: (saved.get(k), ours.get(k)) for k in keys if saved.get(k) != ours.get(k)}
            raise CheckpointMismatchError(
                f"checkpoint {where} was written for another model; differing fields (checkpoint, this model): {diff}")
        if meta["seed"] != self.seed:
            log.warning("checkpoint %s used data seed %s, this run uses %s: the data order changes", where,
                        meta["seed"], self.seed)
        restored = self.ckpt.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(self.state["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(self.state["opt_state"]))))
        self.state = {"params": restored["params"], "opt_state": restored["opt_state"],
                      "step": jax.device_put(jnp.int32(meta["step"]), self.state_shardings["step"])}
        self.data_position = int(meta["data_position"])
        log.info("resumed from %s (data position %d)", where, self.data_position)
        return step

    def close(self):
        """Wait for pending checkpoint writes, release the checkpoint manager and the output folder's lock."""
        self.ckpt.wait_until_finished()
        self.ckpt.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- model access -----------------------------------------------------------------------------------
    def model(self) -> Transformer:
        """The current model (the train state's parameters merged into the module)."""
        return nnx.merge(self.graphdef, self.state["params"])

    def evaluate(self, data: Batches | None = None, max_batches: int | None = None) -> dict[str, float]:
        """Held-out causal-LM ``loss`` (nats per token) and ``bits_per_byte`` of the current model over
        ``data`` (default: ``eval_data``; rows need ``n_bytes``), via :func:`fusejax.evaluate.evaluate` in
        batches of ``eval_batch_size``, at most ``max_batches`` (default: ``eval_max_batches``); {} without
        data. Not the fused loss: that is not a property of the model alone."""
        from fusejax.evaluate import evaluate

        data = self.eval_data if data is None else data
        if data is None or data.num_rows == 0:
            return {}
        with jax.set_mesh(self.mesh):
            result = evaluate(self.model(), data, batch_size=self.eval_batch_size,
                              max_batches=self.eval_max_batches if max_batches is None else max_batches, domains=[])
        return {"loss": result["loss"], "bits_per_byte": result["bits_per_byte"]}

    # -- metrics ----------------------------------------------------------------------------------------
    def _scalars(self, metrics: dict) -> dict[str, float]:
        """Metric arrays as flat scalars; ``source_weight [S]`` becomes ``source_frac/<name>``."""
        out = {}
        for k, v in metrics.items():
            v = np.asarray(v)
            if k == "source_weight" and not self.opts.clm_only:
                names = self.source_names or [str(i) for i in range(v.shape[0])]
                out.update({f"source_frac/{n}": float(x) for n, x in zip(names, v)})
            elif v.ndim == 0:
                out[k] = float(v)
        return out

    # -- loop -------------------------------------------------------------------------------------------
    def fit(self, *, stop_after: int | None = None, log_fn=None) -> list[dict[str, float]]:
        """Train from the current step to the last (``train.steps``, or one pass over the data), or for
        ``stop_after`` steps; returns each step's metrics (``step``, ``lr``, losses, source fractions, ...).

        Every ``train.log_every`` steps (and at the end) the means since the last log, with ``tokens_per_s``
        and ``mfu`` (both count every position of the padded ``[batch_size, seq_len]`` batch: the work the
        device does), go to the progress bar, TensorBoard (``<out_dir>/tb``) and ``log_fn(dict)``. Saves every
        ``train.checkpoint_every`` steps (0: never before the end), at the end, and on SIGTERM (then stops).
        """
        from tqdm.auto import tqdm

        tc = self.tc
        start = self.step
        end = self.total_steps if stop_after is None else min(self.total_steps, start + stop_after)
        main = jax.process_index() == 0
        writer = _tb_writer(self.out_dir / "tb") if main else None
        tokens_per_step = tc.batch_size * self.seq_len
        peak = peak_flops_per_device(tc)
        flops_per_token = model_flops_per_token(self.model_config, self.num_params, self.seq_len)
        history: list[dict[str, float]] = []
        pending: list[tuple[int, dict]] = []  # device metrics not yet fetched
        stop = {"flag": False}
        previous = _install_sigterm(lambda *_: stop.__setitem__("flag", True))
        bar = tqdm(total=end, initial=start, desc="train", disable=not main, dynamic_ncols=True)
        t_log = time.perf_counter()
        try:
            for step in range(start, end):
                batch = self._batch(self.data_position)
                self.state, metrics = self.compiled(self.state, batch)
                self.data_position += tc.batch_size
                pending.append((step, metrics))
                bar.update(1)
                last = step + 1 == end or stop["flag"]
                if (step + 1) % tc.log_every == 0 or last:
                    fetched = [(s, self._scalars(m)) for s, m in jax.device_get(pending)]
                    elapsed = time.perf_counter() - t_log
                    t_log = time.perf_counter()
                    for s, m in fetched:
                        history.append(dict(m, step=s + 1, lr=float(self.lr_schedule(s))))
                    summary = {k: float(np.mean([h[k] for h in history[-len(fetched):]])) for k in history[-1]}
                    summary["step"] = step + 1
                    summary["tokens_per_s"] = tokens_per_step * len(fetched) / elapsed
                    if peak:
                        summary["mfu"] = summary["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
                    pending.clear()
                    self._log(summary, writer, bar, log_fn)
                t_pause = time.perf_counter()
                if tc.eval_every and self.eval_data is not None and (step + 1) % tc.eval_every == 0:
                    self._log({f"eval/{k}": v for k, v in self.evaluate().items()} | {"step": step + 1},
                              writer, bar, log_fn)
                if (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0) or last or stop["flag"]:
                    self.save()
                t_log += time.perf_counter() - t_pause  # throughput excludes evaluation and checkpointing
                if stop["flag"]:
                    log.warning("SIGTERM received: saved a checkpoint at step %d and stopping", step + 1)
                    break
        finally:
            bar.close()
            self.ckpt.wait_until_finished()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if writer is not None:
                writer.close()
        return history

    def _log(self, summary: dict, writer, bar, log_fn):
        step = int(summary["step"])
        if writer is not None:
            for k, v in summary.items():
                if k != "step" and math.isfinite(v):
                    writer.add_scalar(k, v, step)
            writer.flush()
        shown = {k: v for k, v in summary.items() if not k.startswith("source_present")}
        bar.write(" ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        if "loss" in summary:
            bar.set_postfix(loss=f"{summary['loss']:.4f}")
        if log_fn is not None:
            log_fn(summary)


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


def _plain(config) -> dict:
    """The resolved run config as plain JSON-ready data (a Config, a dict, or None)."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        from fusejax.config import config_to_dict

        return config_to_dict(config)
    return dict(config)


def _install_sigterm(handler):
    """Install a SIGTERM handler (main thread only); returns the previous one, or None if not installed."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _tb_writer(folder: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(folder))


def _target_source(cfg) -> int | None:
    """Index of the source that is the target model itself (same model folder), or None."""
    target = Path(cfg.target.path).resolve()
    matches = [i for i, s in enumerate(cfg.sources) if s.path and Path(s.path).resolve() == target]
    return matches[0] if matches else None


def run(cfg) -> dict:
    """Stage ``train``: fused continual training of the target on ``<run.output_dir>/aligned``.

    Writes checkpoints and TensorBoard events under ``<run.output_dir>/train`` and resumes from the latest
    checkpoint there. Every ``train.eval_every`` steps it scores the held-out corpus blocks exactly as the
    ``eval`` stage does (same rows, ``eval.batch_size``, ``eval.max_batches``). Returns a summary
    (steps, final metrics, compiled memory) also written to ``train/summary.json`` by process 0.
    """
    from fusejax.config import save_resolved
    from fusejax.corpus import corpus_totals
    from fusejax.data import AlignedBatches
    from fusejax.distributed import is_main_process
    from fusejax.evaluate import heldout_batches
    from fusejax.store import write_json

    tc, out = cfg.train, Path(cfg.run.output_dir)
    if cfg.target.path is None:
        raise ValueError("target.path is not set: name the Hugging Face folder of the model to train")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = sharding.merge_rules(cfg.mesh.rules)
    rows = dict(seq_len=tc.seq_len, ce_level=tc.ce_level, ce_unit=tc.ce_unit)
    data = AlignedBatches(out / "aligned", split="train", **rows)
    # no evaluation without held-out blocks (corpus.holdout_fraction = 0)
    evaluating = tc.eval_every and corpus_totals(out / "corpus")["heldout_blocks"] > 0
    eval_data = heldout_batches(cfg) if evaluating else None
    names = list(data.store.meta["sources"])
    if names != [s.name for s in cfg.sources]:
        raise ValueError(f"{out / 'aligned'} was aligned for sources {names}, the config lists "
                         f"{[s.name for s in cfg.sources]}; rerun `fusejax align`")
    with sharding.use_rules(rules):
        model = build_target(tc, mesh, path=cfg.target.path, rules=rules, seed=cfg.run.seed)
        trainer = Trainer(model, data, tc, out / "train", mesh=mesh, rules=rules, seed=cfg.run.seed,
                          target_source=_target_source(cfg), eval_data=eval_data, config=cfg, source_names=names,
                          eval_batch_size=cfg.eval.batch_size, eval_max_batches=cfg.eval.max_batches)
        try:
            history = trainer.fit()
        finally:
            trainer.close()
    summary = {"steps": trainer.step, "final": history[-1] if history else None, "memory": trainer.memory}
    if is_main_process():
        write_json(out / "train" / "summary.json", summary)
        save_resolved(cfg, out / "train")
    return summary
