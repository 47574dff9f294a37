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

from fusejax.checkpoint import load_trained
from fusejax.config import Config
from fusejax.models import Transformer, save_pretrained
from fusejax.schema import RunLayout
from fusejax.sharding import make_mesh

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def export(path: str | Path, out_path: str | Path, *, step: int | None = None, dtype: str | None = None,
           mesh=None, rules=None) -> Path:
    """Write checkpoint ``step`` (default: the latest, or the step folder given) of ``path`` to ``out_path``
    as a Hugging Face folder; returns ``out_path``.

    ``dtype``: dtype of the written weights (default: the checkpoint's parameter dtype). ``mesh``/``rules``:
    where the parameters are restored (default: one device; pass a mesh for models larger than a device).
    ``path`` is a run, checkpoints or step folder (:func:`fusejax.checkpoint.find_checkpoints`). Weights with
    NaN or inf are refused (ValueError naming the tensors): a non-finite model is never exported.
    """
    model, step, meta = load_trained(path, step=step, mesh=mesh, rules=rules)
    bad = [".".join(map(str, k)) for k, v in nnx.to_flat_state(nnx.state(model))
           if not bool(jnp.isfinite(v.get_value()).all())]
    if bad:
        raise ValueError(f"checkpoint step {step} of {path} has non-finite (NaN/inf) weights in {bad}; "
                         "refusing to export them")
    config = model.config.replace(param_dtype=dtype or model.config.param_dtype, remat="none")
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(config.param_dtype)), nnx.to_pure_dict(nnx.state(model)))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), rules=dict(model.rules))))
    out_path = Path(out_path)
    save_pretrained(nnx.merge(graphdef, params), out_path)
    _copy_tokenizer(meta.get("config") or {}, out_path)
    log.info("exported step %d of %s to %s", step, path, out_path)
    return out_path


def run(cfg: Config) -> Path:
    """The pipeline's export stage: the latest checkpoint of ``<run.output_dir>/train`` to ``export.path``
    (default ``<run.output_dir>/export``) in ``export.dtype``, restored on the configured mesh."""
    layout = RunLayout.of(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return export(layout.train, layout.export, dtype=cfg.export.dtype, mesh=mesh, rules=cfg.mesh.rules)


def _copy_tokenizer(run_config: dict, out_path: Path) -> None:
    """Copy the target tokenizer's files named in the run config (``target.tokenizer`` or ``target.path``)."""
    target = run_config.get("target") or {}
    source = target.get("tokenizer") or target.get("path")
    if not source or not Path(source).is_dir() or jax.process_index() != 0:
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, out_path / name)
