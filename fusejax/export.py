"""Export a training checkpoint as a Hugging Face model folder (config.json + safetensors).

``export(run_dir_or_checkpoints_dir, out_path)`` reads the model description stored with the checkpoint
(no config file needed), restores only the parameters (not the optimizer state) and writes them with
:func:`fusejax.models.save_pretrained`. When the checkpoint's run config names a target tokenizer folder
that exists, its tokenizer files are copied along so that the folder loads as a complete model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from fusejax.models import ModelConfig, Transformer, model_shardings, save_pretrained
from fusejax.sharding import make_mesh
from fusejax.train import checkpoint_manager, read_meta, restore_params

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


def find_checkpoints(path: str | Path) -> tuple[Path, int | None]:
    """``(checkpoints folder, step or None)`` for a run folder (holding ``checkpoints/``), a checkpoints
    folder (holding numbered step folders) or one step folder; raises FileNotFoundError otherwise."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
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
    (default: one device) by their logical axes; ``meta`` is the checkpoint's JSON metadata."""
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
        abstract = nnx.eval_shape(lambda: Transformer(ModelConfig(**meta["model"]), rngs=nnx.Rngs(0)))
        shardings = nnx.to_pure_dict(model_shardings(abstract, mesh, rules))
        abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       nnx.to_pure_dict(nnx.state(abstract)), shardings)
        params = restore_params(manager, step, abstract_params)
    finally:
        manager.close()
    return nnx.merge(nnx.graphdef(abstract), params), step, meta


def export(path: str | Path, out_path: str | Path, *, step: int | None = None, dtype: str | None = None,
           mesh=None, rules=None) -> Path:
    """Write checkpoint ``step`` (default: the latest, or the step folder given) of ``path`` to ``out_path``
    as a Hugging Face folder; returns ``out_path``.

    ``dtype``: dtype of the written weights (default: the checkpoint's parameter dtype). ``mesh``/``rules``:
    where the parameters are restored (default: one device; pass a mesh for models larger than a device).
    """
    model, step, meta = load_trained(path, step=step, mesh=mesh, rules=rules)
    config = model.config.replace(param_dtype=dtype or model.config.param_dtype, remat="none")
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(config.param_dtype)), nnx.to_pure_dict(nnx.state(model)))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    out_path = Path(out_path)
    save_pretrained(nnx.merge(graphdef, params), out_path)
    _copy_tokenizer(meta.get("config") or {}, out_path)
    log.info("exported step %d of %s to %s", step, path, out_path)
    return out_path


def run(cfg) -> Path:
    """The pipeline's export stage: the latest checkpoint of ``<run.output_dir>/train`` to ``export.path``
    (default ``<run.output_dir>/export``) in ``export.dtype``, restored on the configured mesh."""
    out = Path(cfg.export.path) if cfg.export.path else Path(cfg.run.output_dir) / "export"
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return export(Path(cfg.run.output_dir) / "train", out, dtype=cfg.export.dtype, mesh=mesh, rules=cfg.mesh.rules)


def _copy_tokenizer(run_config: dict, out_path: Path) -> None:
    """Copy the target tokenizer's files named in the run config (``target.tokenizer`` or ``target.path``)."""
    target = run_config.get("target") or {}
    source = target.get("tokenizer") or target.get("path")
    if not source or not Path(source).is_dir() or jax.process_index() != 0:
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, out_path / name)
