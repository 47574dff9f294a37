"""Stage ``plan``: per-device memory and shardings of the training step, without allocating the model.

The target's architecture comes from ``<target.path>/config.json`` alone (no weights are read). Parameters
and optimizer state are abstract (``nnx.eval_shape`` / ``jax.eval_shape``); the train step that ``fusejax
train`` would run is compiled ahead of time for the configured mesh, and XLA's memory analysis of that
compiled step gives the temporaries (activations, gradients, fusion tables, collectives' buffers) and the
peak per device, which is checked against ``mesh.device_memory_gib`` (or what the device reports).

No accelerator is needed: when this machine has fewer accelerator devices than the mesh, the step is
compiled for that many CPU devices (created on the fly, or set with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``). XLA's CPU compiler fuses and schedules differently
from the TPU/GPU ones, so the temporaries are then an estimate; parameter and optimizer bytes are exact.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fusejax import sharding
from fusejax.config import Config, MeshConfig, TrainConfig
from fusejax.distributed import is_main_process
from fusejax.models import ModelConfig, Transformer, model_shardings
from fusejax.models.hf_io import read_config
from fusejax.models.transformer import attention_impl
from fusejax.schema import row_layout
from fusejax.step import (
    StepOptions,
    abstract_opt_state,
    batch_shardings,
    compile_step,
    compiled_memory,
    make_optimizer,
    size_problems,
    target_source,
    training_model_config,
)

GIB = 1024**3


class PlanError(ValueError):
    """A plan that cannot be made (too few devices, no target model, sizes no step holds)."""


def nbytes_per_device(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of the abstract array ``x`` (its ``sharding`` must be set)."""
    return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def plan_training(model_config: ModelConfig, tc: TrainConfig, mesh, *, rules=None, num_sources: int = 0,
                  k: int = 10, target_source: int | None = None, loss_impl=None) -> dict:
    """Compile the train step for ``model_config`` (trained with the ``train`` section ``tc``, laid out by the
    sharding-rule overrides ``rules``) on ``mesh`` without allocating anything: the step of
    :func:`fusejax.step.compile_step`, on batches of :func:`fusejax.schema.row_layout` (no tables when
    ``num_sources`` is 0; ``loss_impl``: see :func:`fusejax.step.make_loss_fn`). Returns per-device
    ``params_bytes``, ``opt_state_bytes``, ``batch_bytes``, ``logits_bytes`` (one micro-batch's float32
    ``[B,T,V]`` logits, which the chunked loss never holds) and ``logits_chunk_bytes`` (one chunk of
    ``train.loss_chunk`` positions, what it holds instead, a few times over), the compiled step's ``memory``
    (see :func:`fusejax.step.compiled_memory`), ``num_params`` and ``shardings``: ``[(name, global shape,
    per-device shape, PartitionSpec)]`` of every parameter."""
    mc = training_model_config(model_config, tc)
    model = nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0), rules=rules))
    param_dtype = jnp.dtype(tc.param_dtype)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, param_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(model_shardings(model, mesh)))
    total_steps = tc.steps or 1  # only the loss-weight schedule depends on it
    tx, _ = make_optimizer(tc, total_steps)
    opts = StepOptions.from_config(tc, total_steps, target_source)
    micro = (tc.grad_accum, tc.batch_size // tc.grad_accum)
    rows = row_layout(tc.seq_len, num_sources, k, tc.ce_level, n_bytes=False)
    layouts = batch_shardings(mesh, {n: (*micro, *shape) for n, (shape, _) in rows.items()}, dict(model.rules))
    batch = {n: jax.ShapeDtypeStruct((*micro, *shape), dtype, sharding=layouts[n])
             for n, (shape, dtype) in rows.items()}
    logits_shape = (micro[1], tc.seq_len, mc.padded_vocab_size)
    logits = jax.ShapeDtypeStruct(logits_shape, jnp.float32, sharding=NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", "length", "vocab"), rules=dict(model.rules), mesh=mesh, shape=logits_shape, name="logits")))
    with jax.set_mesh(mesh):
        opt_state = abstract_opt_state(tx, params)
    state = {"params": params, "opt_state": opt_state,
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))}
    compiled = compile_step(nnx.graphdef(model), tx, opts, state, batch, mesh, loss_impl)
    shardings = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        shardings.append((name, x.shape, x.sharding.shard_shape(x.shape), x.sharding.spec))
    return {
        "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        "params_bytes": sum(nbytes_per_device(x) for x in jax.tree.leaves(params)),
        "opt_state_bytes": sum(nbytes_per_device(x) for x in jax.tree.leaves(opt_state)),
        "batch_bytes": sum(nbytes_per_device(x) for x in batch.values()),
        "logits_bytes": nbytes_per_device(logits),
        "logits_chunk_bytes": nbytes_per_device(logits) * min(tc.loss_chunk, tc.seq_len) // tc.seq_len,
        "memory": compiled_memory(compiled),
        "shardings": shardings,
    }


def _request_cpu_devices(n: int) -> None:
    """Ask for ``n`` CPU devices (stand-ins for accelerators) if JAX has not started its backends yet and
    ``XLA_FLAGS`` does not fix the count already; otherwise leave things as they are."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised: use what there is
        pass


def plan_devices(data: int, fsdp: int, tensor: int) -> list[jax.Device]:
    """The devices to compile for: the default backend's when it has enough for the mesh, else CPU devices
    (created here when possible). A mesh with a ``-1`` axis takes every default device."""
    sizes = (data, fsdp, tensor)
    if -1 in sizes:
        return jax.devices()
    needed = math.prod(sizes)
    _request_cpu_devices(needed)
    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= needed:
            return devices[:needed]
    raise PlanError(
        f"mesh data={data} fsdp={fsdp} tensor={tensor} needs {needed} devices; this process has "
        f"{len(jax.devices())} {jax.devices()[0].platform} and {len(jax.devices('cpu'))} CPU devices. To plan "
        f"without the hardware, run with XLA_FLAGS=--xla_force_host_platform_device_count={needed}")


def device_memory_bytes(mesh_cfg: MeshConfig, device: jax.Device) -> int | None:
    """``mesh.device_memory_gib`` in bytes, else the device's own limit when it reports one (not on CPU)."""
    if mesh_cfg.device_memory_gib is not None:
        return int(mesh_cfg.device_memory_gib * GIB)
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def _gib(n: int) -> str:
    return f"{n / GIB:9.2f} GiB"


def _remedies(tc: TrainConfig, mesh) -> list[str]:
    """Settings that lower the step's memory and are not in effect yet."""
    out = [] if tc.remat == "full" else ["train.remat=full"]
    rows_per_device = tc.batch_size // tc.grad_accum // (mesh.shape["data"] * mesh.shape["fsdp"])
    if rows_per_device > 1:
        out.append(f"train.grad_accum={2 * tc.grad_accum} (smaller micro-batches)")
    if tc.param_dtype != "bfloat16":
        out.append("train.param_dtype=bfloat16 (halves parameters, gradients and AdamW moments)")
    return out + ["more devices on mesh.fsdp"]


def format_report(plan: dict, *, model_config: ModelConfig, tc: TrainConfig, mesh, platform: str, num_sources: int,
                  k: int, device_memory: int | None) -> str:
    """The plan as the text ``fusejax plan`` prints (see :func:`run`)."""
    mem = plan["memory"]
    lines = [
        f"model: {model_config.model_type}, {plan['num_params'] / 1e9:.2f}B parameters ({tc.param_dtype}), "
        f"{model_config.num_layers} layers, hidden {model_config.hidden_size}, vocab {model_config.vocab_size}",
        f"step: batch {tc.batch_size} = {tc.grad_accum} x {tc.batch_size // tc.grad_accum} sequences x "
        f"{tc.seq_len} tokens, {num_sources} sources (top-{k}), compute {tc.compute_dtype}, remat {tc.remat}, "
        f"attention {attention_impl(training_model_config(model_config, tc), tc.seq_len)}",
        f"mesh: {', '.join(f'{a}={n}' for a, n in mesh.shape.items())} ({mesh.devices.size} devices)",
    ]
    if platform == "cpu":
        lines.append(f"note: compiled for {mesh.devices.size} CPU devices; parameter, optimizer and batch bytes are "
                     "exact, the step's temporaries are an estimate (XLA compiles TPU/GPU steps differently)")
    lines += ["", "memory per device"]
    chunk = min(tc.loss_chunk, tc.seq_len)
    rows = [("parameters", plan["params_bytes"]), ("optimizer state (AdamW moments)", plan["opt_state_bytes"]),
            ("batch", plan["batch_bytes"]),
            (f"loss logits, one chunk of {chunk} positions (train.loss_chunk)", plan["logits_chunk_bytes"]),
            ("  (the micro-batch's whole [B,T,V] logits, never held)", plan["logits_bytes"])]
    if mem:
        rows += [("step temporaries (activations, gradients, ...)", mem["temp_bytes"]),
                 ("peak (arguments + outputs + temporaries - donated)", mem["peak_bytes"])]
    if device_memory is not None:
        rows.append(("device memory", device_memory))
    lines += [f"  {label:<52}{_gib(n)}" for label, n in rows]
    if not mem:
        lines.append("  (this backend reports no memory analysis of the compiled step)")
    lines += ["", "parameter shardings (global shape -> per-device shape, partition spec)"]
    lines += [f"  {name:<24}{str(list(shape)):>22} -> {str(list(local)):<22}{spec}"
              for name, shape, local, spec in plan["shardings"]]
    lines.append("")
    peak = mem.get("peak_bytes")
    if device_memory is None:
        lines.append("fit: unknown; set mesh.device_memory_gib (e.g. 32 for TPU v4, 16 for v5e, 80 for H100)")
    elif peak is None:
        lines.append("fit: unknown (no memory analysis)")
    elif peak > device_memory:
        lines.append(f"WARNING: the step needs {peak / GIB:.2f} GiB per device but a device has "
                     f"{device_memory / GIB:.2f} GiB: it will not fit. Try {', '.join(_remedies(tc, mesh))}.")
    else:
        lines.append(f"fit: ok, {peak / GIB:.2f} of {device_memory / GIB:.2f} GiB per device "
                     f"({100 * peak / device_memory:.0f}%)")
    return "\n".join(lines)


def host_line(cfg: Config) -> str:
    """What the host does for ``align.on_the_fly`` (a line of the report)."""
    workers = "one per host core" if cfg.align.workers is None else cfg.align.workers
    return (f"host: align.on_the_fly: each step's {cfg.train.batch_size} rows are aligned from the top-k stores by "
            f"worker processes (align.workers: {workers}) while the device trains; "
            "benchmarks/bench_onfly.py measures the rows per second one core aligns")


def run(cfg: Config) -> dict:
    """Stage ``plan``: print the per-device memory and parameter shardings of ``fusejax train``'s step for
    this config (target architecture from ``target.path``/config.json, mesh, ``train`` section, number of
    sources, ``represent.k``; with ``align.on_the_fly`` also :func:`host_line`) and warn when it does not fit
    ``mesh.device_memory_gib``. Returns the byte counts of :func:`plan_training` (without the shardings) plus
    ``device_memory`` and ``fits`` (None: unknown)."""
    if cfg.target.path is None:
        raise PlanError("target.path is not set: name the Hugging Face folder of the model to plan for "
                        "(its config.json is enough)")
    model_config = read_config(Path(cfg.target.path))
    problems = size_problems(cfg.train, model_config.max_position_embeddings)
    if problems:
        raise PlanError("; ".join(problems))
    devices = plan_devices(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    num_sources, k = len(cfg.sources), cfg.represent.k
    plan = plan_training(model_config, cfg.train, mesh, rules=cfg.mesh.rules, num_sources=num_sources, k=k,
                         target_source=target_source(cfg))
    device_memory = device_memory_bytes(cfg.mesh, devices[0])
    if is_main_process():
        print(format_report(plan, model_config=model_config, tc=cfg.train, mesh=mesh, platform=devices[0].platform,
                            num_sources=num_sources, k=k, device_memory=device_memory))
        if cfg.align.on_the_fly:
            print(host_line(cfg))
    peak = plan["memory"].get("peak_bytes")
    summary = {key: value for key, value in plan.items() if key != "shardings"}
    return dict(summary, device_memory=device_memory,
                fits=None if device_memory is None or peak is None else peak <= device_memory)
