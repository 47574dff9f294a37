"""Stage ``train``: fused continual training of the target, resumable to the same step.

:class:`Trainer` owns one run: the model's parameters and AdamW state on the mesh, the compiled step of
:mod:`fusejax.step`, the deterministic row stream of :mod:`fusejax.data`, Orbax checkpoints
(:mod:`fusejax.checkpoint`) and metric logging (progress bar, TensorBoard). Baselines need no code of their
own: ``train.lm_weight=1`` (schedule ``hard``) is plain causal-LM training and accepts rows without tables;
tables with S=1 are single-teacher distillation. With several processes, each reads only the rows its own
devices hold (:func:`fusejax.step.local_batch_rows`) and the global batch is assembled with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fusejax import checkpoint
from fusejax.config import Config, TrainConfig, config_to_dict, save_resolved
from fusejax.corpus import corpus_totals
from fusejax.data import AlignedBatches, AlignedOnTheFly, Batches, check_batch_size, stream_rows
from fusejax.distributed import is_main_process
from fusejax.evaluation import evaluate, heldout_batches
from fusejax.files import json_safe, write_json
from fusejax.models import ModelConfig, Transformer, load_pretrained, model_shardings
from fusejax.models.hf_io import read_config
from fusejax.schema import CE_FIELDS, CHECKPOINTS, STEP_AXES, SUMMARY, TABLE_FIELDS, TENSORBOARD, TEXT_FIELDS, RunLayout
from fusejax.sharding import make_mesh
from fusejax.step import (
    StepOptions,
    abstract,
    batch_shardings,
    cast_floating,
    compile_step,
    compiled_memory,
    local_batch_rows,
    make_optimizer,
    model_flops_per_token,
    opt_state_shardings,
    peak_flops_per_device,
    size_problems,
    target_source,
    training_model_config,
)
from fusejax.store import WriterLock

log = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """Training stopped at a step whose loss or gradient norm was not finite (``train.nonfinite: stop``)."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGTERM (preemption) or SIGINT (Ctrl-C) after saving a checkpoint; the CLI prints the
    message and exits 128 + ``signum`` (143, 130), so that neither a scheduler nor ``fusejax run`` takes the
    stage for finished."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def build_target(tc: TrainConfig, mesh, *, path: str | None = None, config: ModelConfig | None = None, rules=None,
                 seed: int = 0) -> Transformer:
    """The target model for training, on ``mesh``: loaded from the Hugging Face folder ``path``, or randomly
    initialized from ``config``; dtypes and remat policy from the ``train`` section ``tc``; ``rules``: the
    sharding-rule overrides the model keeps for its parameters and activations (``mesh.rules``)."""
    if (path is None) == (config is None):
        raise ValueError("build_target: pass exactly one of path= (a Hugging Face folder) or config= (a ModelConfig)")
    if path is not None:
        return load_pretrained(path, dtype=tc.param_dtype, compute_dtype=tc.compute_dtype, remat=tc.remat,
                               mesh=mesh, rules=rules)
    model = Transformer(training_model_config(config, tc), rngs=nnx.Rngs(seed), rules=rules)
    nnx.update(model, jax.device_put(nnx.state(model), model_shardings(model, mesh)))
    return model


class Trainer:
    """Owns the model, optimizer, compiled step, checkpoints and metric logging for one training run.

    ``model``: a fusejax Transformer; only its parameters and sharding rules are used (parameters, activations
    and batches are laid out on ``mesh`` by the model's rules; parameters are cast to ``train.param_dtype``);
    the compute dtype and remat policy come from ``tc``. Its arrays may
    be donated to the first step: do not use ``model`` afterwards, use :meth:`model`. ``data``:
    :class:`Batches` of training rows; ``tc``: the ``train`` config section; ``out_dir``: checkpoints go to
    ``<out_dir>/checkpoints``, TensorBoard events to ``<out_dir>/tb``. ``config``: the resolved run config
    (stored in checkpoints). If ``<out_dir>/checkpoints`` holds a checkpoint, training resumes from the
    latest one (:class:`CheckpointMismatchError` if it belongs to another model). ``eval_data``: held-out
    rows scored every ``train.eval_every`` steps, ``eval_batch_size`` rows at a time (default: the
    micro-batch size), at most ``eval_max_batches`` batches (default: all).
    """

    def __init__(self, model: Transformer, data: Batches, tc: TrainConfig, out_dir: str | Path, *, mesh,
                 seed: int = 0, target_source: int | None = None, eval_data: Batches | None = None,
                 config: Config | None = None, source_names: list[str] | None = None,
                 eval_batch_size: int | None = None, eval_max_batches: int | None = None):
        problems = size_problems(tc, model.config.max_position_embeddings)
        if problems:
            raise ValueError("; ".join(problems))
        check_batch_size(tc.batch_size, data.num_rows)
        self.tc, self.mesh, self.seed = tc, mesh, seed
        self.eval_batch_size = eval_batch_size or tc.batch_size // tc.grad_accum
        self.eval_max_batches = eval_max_batches
        self.data, self.eval_data, self.source_names = data, eval_data, source_names
        self.out_dir = Path(out_dir)
        self.resolved_config = {} if config is None else config_to_dict(config)
        self.total_steps = tc.steps or max(1, data.num_rows // tc.batch_size)
        self.model_config = training_model_config(model.config, tc)
        rules = dict(model.rules)
        self.graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: Transformer(self.model_config, rngs=nnx.Rngs(0), rules=rules)))
        self.tx, self.lr_schedule = make_optimizer(tc, self.total_steps)
        self.opts = StepOptions.from_config(tc, self.total_steps, target_source)

        param_shardings = nnx.to_pure_dict(model_shardings(model, mesh))
        params = cast_floating(nnx.to_pure_dict(nnx.state(model, nnx.Param)), jnp.dtype(tc.param_dtype))
        params = jax.device_put(params, param_shardings)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        with jax.set_mesh(mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=opt_state_shardings(self.tx, params))(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
        self.state = {"params": params, "opt_state": opt_state, "step": step}
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.data_position = 0  # rows of the stream consumed so far
        self.last_metrics: dict | None = None  # the last logged summary (kept in checkpoints)
        self.skipped_steps = 0  # steps not applied because their loss or gradient norm was not finite
        self._checked = 0  # steps below this index were checked for non-finite updates
        self.ckpt = checkpoint.checkpoint_manager(self.out_dir / CHECKPOINTS, max_to_keep=tc.keep_checkpoints)
        self.restore_latest()

        example = self.data.rows(stream_rows(self.seed, 0, 1, self.data.num_rows))  # one row: fields, shapes
        example = {k: v for k, v in example.items() if k in STEP_AXES}
        missing = [f for f in TEXT_FIELDS if f not in example]
        if not self.opts.clm_only:
            missing += [f for f in TABLE_FIELDS if f not in example]
            if not set(CE_FIELDS.values()) & set(example):
                missing.append(" or ".join(CE_FIELDS.values()))
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
        self.compiled = self._compile()
        # one trainer per output folder: a second concurrent run refuses, naming the holder (process 0 locks)
        self._lock = WriterLock(self.out_dir / "trainer.lock") if jax.process_index() == 0 else None
        if self._lock is not None:
            checkpoint.remove_unfinished(self.out_dir / CHECKPOINTS)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return int(self.state["step"])

    # -- data -------------------------------------------------------------------------------------------
    def _host_batch(self, position: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at stream positions ``position .. position+batch_size``, split into
        micro-batches: ``{field: [grad_accum, len(local_rows), ...]}`` (only these rows are read)."""
        tc = self.tc
        rows = self.data.rows(self._local_indices(position))
        return {k: v.reshape(tc.grad_accum, len(self.local_rows), *v.shape[1:]) for k, v in rows.items()
                if k in STEP_AXES}

    def _local_indices(self, position: int) -> np.ndarray:
        """The data rows [grad_accum * len(local_rows)] int64 of this process in the batch at ``position``."""
        tc = self.tc
        micro = tc.batch_size // tc.grad_accum
        indices = stream_rows(self.seed, position, tc.batch_size, self.data.num_rows).reshape(tc.grad_accum, micro)
        return indices[:, self.local_rows].reshape(-1)

    def _prefetch(self, position: int) -> None:
        """Let data that can (``prefetch(indices)``, e.g. :class:`fusejax.data.AlignedOnTheFly`) start building
        the rows of the batch at ``position`` in the background."""
        prefetch = getattr(self.data, "prefetch", None)
        if prefetch is not None:
            prefetch(self._local_indices(position))

    def _batch(self, position: int) -> dict[str, jax.Array]:
        """The global batch at stream ``position`` (see :meth:`_host_batch`), assembled from every process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], v, self.batch_shapes[k])
                for k, v in self._host_batch(position).items()}

    # -- compile ----------------------------------------------------------------------------------------
    def _compile(self):
        """The train step compiled ahead of time for the state and batch layouts; logs its memory per device."""
        abstract_batch = {k: jax.ShapeDtypeStruct(shape, self.batch_dtypes[k], sharding=self.batch_shardings[k])
                          for k, shape in self.batch_shapes.items()}
        compiled = compile_step(self.graphdef, self.tx, self.opts, abstract(self.state), abstract_batch, self.mesh)
        self.memory = compiled_memory(compiled)
        if self.memory:
            log.info("compiled train step, bytes per device: %s", self.memory)
        return compiled

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, wait: bool = False):
        """Start an (asynchronous) checkpoint of the current state; ``wait``: block until it is complete."""
        meta = {"step": self.step, "data_position": self.data_position, "seed": self.seed,
                "model": dataclasses.asdict(self.model_config), "config": self.resolved_config,
                "metrics": json_safe(self.last_metrics), "skipped_steps": self.skipped_steps}
        checkpoint.save(self.ckpt, self.step, self.state["params"], self.state["opt_state"], meta)
        if wait:
            self.ckpt.wait_until_finished()

    def restore_latest(self) -> int | None:
        """Restore the newest complete checkpoint onto this trainer's shardings; returns its step or None."""
        step = self.ckpt.latest_step()
        if step is None:
            return None
        where = f"{self.ckpt.directory}/{step}"
        meta = checkpoint.read_meta(self.ckpt, step)
        checkpoint.check_architecture(meta, self.model_config, where)
        if meta["seed"] != self.seed:
            log.warning("checkpoint %s used data seed %s, this run uses %s: the data order changes", where,
                        meta["seed"], self.seed)
        restored = checkpoint.restore(self.ckpt, step, abstract(self.state["params"]),
                                      abstract(self.state["opt_state"]))
        self.state = {"params": restored["params"], "opt_state": restored["opt_state"],
                      "step": jax.device_put(jnp.int32(meta["step"]), self.state_shardings["step"])}
        self.data_position = int(meta["data_position"])
        self.last_metrics, self.skipped_steps = meta.get("metrics"), int(meta.get("skipped_steps", 0))
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
        ``data`` (default: ``eval_data``; rows need ``n_bytes``), via :func:`fusejax.evaluation.evaluate` in
        batches of ``eval_batch_size``, at most ``max_batches`` (default: ``eval_max_batches``); {} without
        data. Not the fused loss: that is not a property of the model alone."""
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
        ``train.checkpoint_every`` steps (0: never before the end), at the end, and on SIGTERM or SIGINT / Ctrl-C
        (then raises :class:`Interrupted`, a KeyboardInterrupt). A step whose loss or gradient
        norm is not finite is never applied (see :func:`fusejax.step.make_train_step`); with
        ``train.nonfinite: stop`` the run then raises :class:`NonFiniteError` without saving again, with
        ``skip`` it goes on and counts the step in ``skipped_steps``.
        """
        from tqdm.auto import tqdm

        tc = self.tc
        start = self.step
        if start > self.total_steps:
            raise ValueError(f"train.steps={tc.steps} ({self.total_steps} steps): the latest checkpoint in "
                             f"{self.ckpt.directory} is already at step {start}; raise train.steps, or train in "
                             "another run.output_dir")
        end = self.total_steps if stop_after is None else min(self.total_steps, start + stop_after)
        main = jax.process_index() == 0
        writer = _tb_writer(self.out_dir / TENSORBOARD) if main else None
        tokens_per_step = tc.batch_size * self.seq_len
        peak = peak_flops_per_device(tc)
        flops_per_token = model_flops_per_token(self.model_config, self.num_params, self.seq_len)
        history: list[dict[str, float]] = []
        pending: list[tuple[int, dict]] = []  # device metrics not yet fetched
        stop = {"signal": None}
        previous = _install_handlers(lambda signum, _: stop.__setitem__("signal", signal.Signals(signum)))
        bar = tqdm(total=end, initial=start, desc="train", disable=not main, dynamic_ncols=True)
        t_log = time.perf_counter()
        try:
            for step in range(start, end):
                batch = self._batch(self.data_position)
                if step + 1 < end:
                    self._prefetch(self.data_position + tc.batch_size)
                self.state, metrics = self.compiled(self.state, batch)
                self.data_position += tc.batch_size
                pending.append((step, metrics))
                bar.update(1)
                last = step + 1 == end or stop["signal"] is not None
                if (step + 1) % tc.log_every == 0 or last:
                    fetched = [(s, self._scalars(m)) for s, m in jax.device_get(pending)]
                    self._check_finite([(s, m["skipped"]) for s, m in fetched])
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
                    self.last_metrics = dict(history[-1], skipped_steps=self.skipped_steps)
                t_pause = time.perf_counter()
                if tc.eval_every and self.eval_data is not None and (step + 1) % tc.eval_every == 0:
                    self._log({f"eval/{k}": v for k, v in self.evaluate().items()} | {"step": step + 1},
                              writer, bar, log_fn)
                if (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0) or last or stop["signal"]:
                    if pending:  # steps not logged yet: none that was not applied goes unseen into a checkpoint
                        self._check_finite(jax.device_get([(s, m["skipped"]) for s, m in pending]))
                    self.save()
                t_log += time.perf_counter() - t_pause  # throughput excludes evaluation and checkpointing
                if stop["signal"] is not None:
                    log.warning("%s received: saved a checkpoint at step %d and stopping", stop["signal"].name,
                                step + 1)
                    break
        finally:
            bar.close()
            self.ckpt.wait_until_finished()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if writer is not None:
                writer.close()
        if stop["signal"] is not None:
            raise Interrupted(f"interrupted by {stop['signal'].name}: saved a checkpoint at step {self.step} in "
                              f"{self.ckpt.directory}; rerun the same command to resume", stop["signal"])
        return history

    def _check_finite(self, skipped: list[tuple[int, float]]) -> None:
        """Count the steps ``[(step index, skipped flag)]`` that were not applied; with ``train.nonfinite: stop``
        raise :class:`NonFiniteError` at the first one."""
        bad = [s + 1 for s, flag in skipped if flag and s >= self._checked]
        self._checked = max([self._checked] + [s + 1 for s, _ in skipped])
        if not bad:
            return
        if self.tc.nonfinite == "stop":
            kept = self.ckpt.latest_step()
            raise NonFiniteError(
                f"step {bad[0]}: the loss or the gradient norm is not finite (NaN/inf), so the update was not "
                f"applied and training stopped; the last checkpoint ({'none' if kept is None else f'step {kept}'}) "
                f"in {self.ckpt.directory} is kept. Check the target's weights and train.lr, or set "
                "train.nonfinite=skip to skip such steps")
        self.skipped_steps += len(bad)
        log.warning("steps %s: the loss or gradient norm is not finite; updates skipped (%d so far)", bad,
                    self.skipped_steps)

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


def _install_handlers(handler) -> dict:
    """Install ``handler`` for SIGTERM and SIGINT (main thread only; a signal the process was started to
    ignore, as under ``nohup``, stays ignored); returns the previous handlers."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread
            break
    return previous


def _tb_writer(folder: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(folder))


def run(cfg: Config) -> dict:
    """Stage ``train``: fused continual training of the target on ``<run.output_dir>/aligned``, or with
    ``align.on_the_fly`` on rows aligned while training from the top-k stores and vocabulary maps
    (:class:`fusejax.data.AlignedOnTheFly`, in ``align.workers`` background processes; the same rows).

    Writes checkpoints and TensorBoard events under ``<run.output_dir>/train`` and resumes from the latest
    checkpoint there. Every ``train.eval_every`` steps it scores the held-out corpus blocks exactly as the
    ``eval`` stage does (same rows, ``eval.batch_size``, ``eval.max_batches``). Returns a summary
    (steps, final metrics, compiled memory) also written to ``train/summary.json`` by process 0.
    """
    tc, layout = cfg.train, RunLayout.of(cfg)
    if cfg.target.path is None:
        raise ValueError("target.path is not set: name the Hugging Face folder of the model to train")
    problems = size_problems(tc, read_config(Path(cfg.target.path)).max_position_embeddings)
    if problems:  # before any store, model or mesh is touched (the trainer checks again for library callers)
        raise ValueError("; ".join(problems))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if cfg.align.on_the_fly:
        data = AlignedOnTheFly(cfg, split="train")
    else:
        data = AlignedBatches(layout.aligned, split="train", seq_len=tc.seq_len, ce_level=tc.ce_level,
                              ce_unit=tc.ce_unit)
    names = data.sources
    if names != [s.name for s in cfg.sources]:
        raise ValueError(f"{layout.aligned} was aligned for sources {names}, the config lists "
                         f"{[s.name for s in cfg.sources]}; rerun `fusejax align`")
    # no evaluation without held-out blocks (corpus.holdout_fraction = 0)
    evaluating = tc.eval_every and corpus_totals(layout.corpus)["heldout_blocks"] > 0
    eval_data = heldout_batches(cfg) if evaluating else None
    try:
        model = build_target(tc, mesh, path=cfg.target.path, rules=cfg.mesh.rules, seed=cfg.run.seed)
        trainer = Trainer(model, data, tc, layout.train, mesh=mesh, seed=cfg.run.seed,
                          target_source=target_source(cfg), eval_data=eval_data, config=cfg, source_names=names,
                          eval_batch_size=cfg.eval.batch_size, eval_max_batches=cfg.eval.max_batches)
        try:
            history = trainer.fit()
        finally:
            trainer.close()
    finally:
        if cfg.align.on_the_fly:
            data.close()
    # a rerun of a finished run (or one killed after its last checkpoint) takes the final metrics from there
    summary = {"steps": trainer.step, "final": history[-1] if history else trainer.last_metrics,
               "skipped_steps": trainer.skipped_steps, "memory": trainer.memory}
    if is_main_process():
        write_json(layout.train / SUMMARY, summary)
        save_resolved(cfg, layout.train)
    return summary
