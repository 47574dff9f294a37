"""Training checkpoints (Orbax): what one holds, how it is saved and restored, and loading a trained model.

A checkpoint is the step folder ``<run>/checkpoints/<step>/`` with three Orbax items: ``params`` and
``opt_state`` (arrays, restored straight onto the caller's shardings) and ``meta`` (JSON: ``step``,
``data_position`` (rows of the training stream consumed), ``seed``, ``model`` (the ModelConfig fields) and
``config`` (the resolved run config)). A checkpoint restores only into a model of the same architecture
(:class:`CheckpointMismatchError` otherwise); how the model runs (dtypes, remat, attention path) may differ.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from fusejax.models import ModelConfig, Transformer, model_shardings
from fusejax.schema import CHECKPOINTS

ITEMS = ("params", "opt_state", "meta")  # Orbax items of one checkpoint

# ModelConfig fields that a checkpoint may differ in (how the model runs, not what it is)
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "attention_chunk")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this model (different architecture or shapes)."""


class CheckpointDamagedError(ValueError):
    """A complete checkpoint whose files cannot be read back (truncated, deleted or corrupted)."""


def _restore(manager, step: int, items: dict) -> dict:
    """``manager.restore`` of the ``items`` of checkpoint ``step``; a file Orbax cannot read is a
    :class:`CheckpointDamagedError` naming the step folder, with the way out."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and TensorStore raise ValueError, KeyError, OSError or a bare Exception
        first = (str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines() or [""])[0][:300]
        raise CheckpointDamagedError(
            f"checkpoint {Path(manager.directory) / str(step)} cannot be read ({type(e).__name__}: {first}); if "
            "its files were damaged (truncated, deleted), move that step folder aside to resume from the previous "
            "checkpoint") from e


def checkpoint_manager(directory: str | Path, *, max_to_keep: int | None = None, read_only: bool = False):
    """The Orbax CheckpointManager of a ``checkpoints`` folder (items: params, opt_state, meta)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


def remove_unfinished(directory: str | Path) -> None:
    """Remove the temporary folders of saves that were killed before Orbax renamed them into place (never
    restored from). Call only while holding the training folder's lock."""
    for unfinished in Path(directory).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(unfinished)


def save(manager, step: int, params, opt_state, meta: dict) -> None:
    """Start an asynchronous save of checkpoint ``step`` (``manager.wait_until_finished()`` completes it)."""
    manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)))


def read_meta(manager, step: int) -> dict:
    """The JSON metadata of checkpoint ``step``: step, data_position, seed, model (ModelConfig fields), config."""
    return _restore(manager, step, {"meta": ocp.args.JsonRestore()})["meta"]


def architecture(config: ModelConfig | dict) -> dict:
    """The fields of a model config (or its stored dict) that a checkpoint must match: all but RUNTIME_FIELDS."""
    d = dataclasses.asdict(config) if isinstance(config, ModelConfig) else dict(config)
    # as the JSON metadata holds them: tuples (eos_token_id, layer_types, RoPE factors) as lists
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in RUNTIME_FIELDS}))


def check_architecture(meta: dict, config: ModelConfig, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing the differing fields unless the checkpoint ``meta``
    (at ``where``) was written for a model of ``config``'s architecture."""
    saved, ours = architecture(meta["model"]), architecture(config)
    if saved != ours:
        keys = sorted(set(saved) | set(ours))
        diff = {k: (saved.get(k), ours.get(k)) for k in keys if saved.get(k) != ours.get(k)}
        raise CheckpointMismatchError(
            f"checkpoint {where} was written for another model; differing fields (checkpoint, this model): {diff}")


def restore(manager, step: int, abstract_params, abstract_opt_state=None) -> dict:
    """``{"params"[, "opt_state"]}`` of checkpoint ``step``, restored onto the shardings of the abstract trees
    (ShapeDtypeStructs with shardings); the optimizer state only when ``abstract_opt_state`` is given."""
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    restored = _restore(manager, step, items)
    return {name: restored[name] for name in items}


def find_checkpoints(path: str | Path) -> tuple[Path, int | None]:
    """``(checkpoints folder, step or None)`` for a run folder (holding ``checkpoints/``), a checkpoints
    folder (holding numbered step folders) or one step folder; raises FileNotFoundError otherwise."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if path.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        return path, None
    if path.is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    raise FileNotFoundError(
        f"{path}: no training checkpoints found (expected a run folder with checkpoints/, a checkpoints folder "
        f"with numbered step folders, or one step folder)")


def load_trained(path: str | Path, *, step: int | None = None, mesh=None, rules=None) -> tuple[Transformer, int, dict]:
    """``(model, step, meta)`` of checkpoint ``step`` (default: the latest, or the step folder given) of a run,
    checkpoints or step folder (see :func:`find_checkpoints`): only the parameters are restored, onto ``mesh``
    (default: one device) by their logical axes under ``rules``; ``meta`` is the checkpoint's JSON metadata.
    The model takes the attention path of the machine it runs on (``attention_impl="auto"``), not the training
    machine's (e.g. ``cudnn``, which needs an NVIDIA GPU)."""
    folder, folder_step = find_checkpoints(path)
    if step is not None and folder_step is not None and step != folder_step:
        raise ValueError(f"step={step} given for the step folder {path}")
    step = folder_step if step is None else step
    manager = checkpoint_manager(folder, read_only=True)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{folder}: no complete checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{folder}: no checkpoint for step {step}; available steps: {steps}")
        meta = read_meta(manager, step)
        config = ModelConfig(**{**meta["model"], "attention_impl": "auto"})
        model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), rules=rules))
        abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       nnx.to_pure_dict(nnx.state(model)),
                                       nnx.to_pure_dict(model_shardings(model, mesh)))
        params = restore(manager, step, abstract_params)["params"]
    finally:
        manager.close()
    return nnx.merge(nnx.graphdef(model), params), step, meta
