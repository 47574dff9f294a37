"""``fusejax merge``: merge Hugging Face folders of one architecture in parameter space, tensor by tensor.

For each tensor name, the tensor of every model is read (a memory map of its safetensors file), merged in
float32 with numpy on the host and written; only one tensor per model is in memory at a time. ``x_i`` are
the models, ``b`` the base, ``d_i = x_i - b`` the task vectors, ``w_i`` the weights, ``λ`` the scale:

- ``linear``: ``Σ w_i x_i / Σ w_i`` (``normalize: false``: no division). The base is not used.
- ``task_arithmetic``: ``b + λ Σ w_i d_i`` (Ilharco et al. 2023).
- ``ties``: keep the top ``density`` fraction of each ``d_i`` by magnitude; ``e_i = w_i d_i``; the sign of
  ``Σ e_i`` elects a sign per element; ``b + λ Σ e_i [sign e_i = elected] / Σ w_i [sign e_i = elected]``
  (Yadav et al. 2023).
- ``dare_linear``, ``dare_ties``: each element of ``d_i`` is kept with probability ``density`` and rescaled
  by ``1 / density`` (a seeded draw per model and tensor), then task arithmetic or TIES's sign election
  (Yu et al. 2024).
- ``sce``: keep the top ``density`` fraction of elements by variance of ``d_i`` across models; weights
  ``w_i = mean(d_i²) / Σ_j mean(d_j²)`` per tensor; erase elements whose sign differs from the sign of
  ``Σ d_i``; ``b + Σ w_i d_i m_i / Σ w_i m_i`` (FuseChat 2.0, Wan et al. 2024).
- ``varm``: ``Σ W_i x_i`` with ``W_i = mean(d_i²) / Σ_j mean(d_j²)`` per tensor (FuseChat 1.0's variation
  ratio merge).

The weights given are per model (``weights``, default 1 each) for linear, task arithmetic, TIES and DARE;
``normalize`` defaults as in mergekit (true for linear and TIES, false otherwise); mergekit's results are
matched to 1e-6 (tests/test_merge.py), except DARE's random draw and its rescaling (mergekit matches the
L1 norm; DARE's paper, and fusejax, divide by the density). Models must agree on the config fields
:data:`SAME_CONFIG` and on every tensor's name and shape; the output is written to a temporary folder and
renamed into place, so a refused or failed merge leaves nothing behind. Runs on one host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from fusejax.config import Config
from fusejax.files import TEMP_PREFIX, atomic_write
from fusejax.models.hf_io import CONFIG_NAME, INDEX_NAME, CheckpointFiles, write_safetensors
from fusejax.schema import RunLayout

log = logging.getLogger(__name__)

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "sce", "varm")
WEIGHTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")  # the methods taking weights
NORMALIZE = {"linear": True, "ties": True}  # mergekit's default of `normalize` (false for the others)
SAME_CONFIG = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers")
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def merge_tensor(method: str, tensors: list[np.ndarray], base: np.ndarray | None = None, *,
                 weights=None, density: float = 1.0, scale: float = 1.0, normalize: bool | None = None,
                 rngs: list[np.random.Generator] | None = None) -> np.ndarray:
    """Merge one tensor: ``tensors`` (one per model, any float dtype, same shape) and the ``base`` tensor
    (all but linear) -> float32 of the same shape. ``rngs``: one generator per model (DARE only)."""
    x = np.stack([np.asarray(t, np.float32) for t in tensors])
    w = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
    w = w.reshape(-1, *([1] * (x.ndim - 1)))
    normalize = NORMALIZE.get(method, False) if normalize is None else normalize
    if method == "linear":
        total = (w * x).sum(0)
        return total / w.sum() if normalize else total
    b = np.asarray(base, np.float32)
    d = x - b
    if method in ("varm", "sce"):
        if method == "sce" and density < 1:  # k counts the nonzero variances, as in mergekit
            var = d.var(0)
            d = d * _top_k(var, int(np.count_nonzero(var) * density))
        v = np.square(d).reshape(len(d), -1).mean(1)
        v = np.full_like(v, 1 / len(v)) if abs(v.sum()) < 1e-6 else v / v.sum()
        v = v.reshape(w.shape)
        if method == "varm":
            return (v * x).sum(0)
        m = v * _elected(d)
        return b + (d * m).sum(0) / np.maximum(m.sum(0), 1e-6)
    if method == "ties" and density < 1:  # at least one element kept, as in mergekit
        k = max(1, int(density * b.size)) if density > 0 else 0
        d = np.stack([di * _top_k(np.abs(di), k) for di in d])
    elif method in ("dare_linear", "dare_ties") and density < 1:
        keep = np.stack([rng.random(b.shape) < density for rng in rngs])
        d = np.where(keep, d / np.float32(density), np.float32(0)) if density > 0 else np.zeros_like(d)
    e = w * d
    if method in ("ties", "dare_ties"):
        mask = _elected(e)
        mixed, divisor = (e * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = e.sum(0), w.sum()
        divisor = np.float32(1) if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return b + np.float32(scale) * mixed


def _top_k(score: np.ndarray, k: int) -> np.ndarray:
    """float32 0/1 mask (score's shape) of the ``k`` elements with the largest ``score``."""
    mask = np.zeros(score.size, np.float32)
    mask[np.argsort(-score.ravel(), kind="stable")[:k]] = 1
    return mask.reshape(score.shape)


def _elected(e: np.ndarray) -> np.ndarray:
    """float32 mask [n, ...]: where ``e_i``'s sign equals the sign of ``Σ e`` (ties go to +)."""
    return (np.sign(e) == np.where(e.sum(0) >= 0, 1, -1)).astype(np.float32)


def merge(models: list[str | os.PathLike], out: str | os.PathLike, *, method: str = "linear",
          base: str | os.PathLike | None = None, weights=None, density: float = 1.0, scale: float = 1.0,
          normalize: bool | None = None, seed: int = 0, dtype: str = "float32") -> dict:
    """Merge the Hugging Face folders ``models`` (and ``base``) with ``method`` into the folder ``out``,
    weights in ``dtype`` ("float32" or "bfloat16"); config.json and tokenizer files are copied from the
    base (else the first model), the safetensors files keep its layout. Returns a summary. Raises
    ValueError (or CheckpointError) naming the setting, config field or tensor that is wrong, before
    anything is written; an existing ``out`` is replaced only once the new folder is complete."""
    models, out = [Path(p) for p in models], Path(out)
    _check_settings(models, base, out, method, weights, density, dtype)
    folders = ([Path(base)] if base is not None else []) + models
    checkpoints = [CheckpointFiles(f) for f in folders]
    _check_same(folders, checkpoints)
    ref, first = checkpoints[0], folders[0]
    files: dict[Path, list[str]] = {}
    for name, file in ref.where.items():
        files.setdefault(file, []).append(name)

    def produce(name: str) -> np.ndarray:
        shape = ref.shape(name)
        tensors = [c.read((name,), shape, c.source) for c in checkpoints]
        rngs = [np.random.default_rng([seed, zlib.crc32(name.encode()), i]) for i in range(len(models))]
        merged = merge_tensor(method, tensors[-len(models):], tensors[0] if base is not None else None,
                              weights=weights, density=density, scale=scale, normalize=normalize, rngs=rngs)
        return merged.astype(DTYPES[dtype])

    tmp = out.with_name(f"{TEMP_PREFIX}{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for file, names in files.items():
            entries = [(n, ref.shape(n), lambda n=n: produce(n)) for n in names]
            write_safetensors(tmp / file.name, entries, DTYPES[dtype], writer=True)
        if ref.source.name == INDEX_NAME:
            index = json.loads(ref.source.read_text())
            index["metadata"] = {"total_size": sum(int(np.prod(ref.shape(n))) for n in ref.where)
                                 * DTYPES[dtype].itemsize}
            atomic_write(tmp / INDEX_NAME, json.dumps(index, indent=2).encode())
        config = json.loads((first / CONFIG_NAME).read_text())
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
        atomic_write(tmp / CONFIG_NAME, json.dumps(config, indent=2).encode())
        for name in COPIED_FILES:
            if (first / name).is_file():
                shutil.copyfile(first / name, tmp / name)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d models (%s) into %s", len(models), method, out)
    return {"path": str(out), "method": method, "models": [str(p) for p in models],
            "base": None if base is None else str(base), "tensors": len(ref.where), "dtype": dtype}


def run(cfg: Config) -> dict | None:
    """The ``fusejax merge`` command: the ``merge`` section of ``cfg`` (output ``merge.path``, default
    ``<run.output_dir>/merge``). With several processes, process 0 merges and the others return None."""
    m = cfg.merge
    out = RunLayout.of(cfg).merge
    if jax.process_index() != 0:
        return None
    return merge(list(m.models), out, method=m.method, base=m.base, weights=m.weights or None, density=m.density,
                 scale=m.scale, normalize=m.normalize, seed=m.seed, dtype=m.dtype)


def _check_settings(models: list[Path], base, out: Path, method: str, weights, density: float, dtype: str) -> None:
    """One clear ValueError for a setting that cannot work (before any file is read)."""
    if method not in METHODS:
        raise ValueError(f"merge.method {method!r} is not one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise ValueError(f"merge.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not models:
        raise ValueError("merge.models is empty: name the Hugging Face folders to merge")
    if method != "linear" and base is None:
        raise ValueError(f"merge.base is not set: method {method!r} merges the differences to a base model")
    for key, folder in [("merge.base", base)] + [(f"merge.models.{i}", p) for i, p in enumerate(models)]:
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{key}: {folder} is not a folder")
        if folder is not None and (out.resolve().is_relative_to(Path(folder).resolve())
                                   or Path(folder).resolve().is_relative_to(out.resolve())):
            raise ValueError(f"merge.path {out} overlaps {key} {folder}: the output would replace an input")
    if not 0 <= density <= 1:
        raise ValueError(f"merge.density {density} must be in [0, 1]")
    if weights is None:
        return
    if method not in WEIGHTED:
        raise ValueError(f"merge.weights: method {method!r} computes its own weights; leave merge.weights empty")
    if len(weights) != len(models):
        raise ValueError(f"merge.weights has {len(weights)} values for {len(models)} models")
    if method == "linear" and abs(sum(weights)) < 1e-8:
        raise ValueError(f"merge.weights {list(weights)} sum to 0: a linear merge divides by their sum")


def _check_same(folders: list[Path], checkpoints: list[CheckpointFiles]) -> None:
    """Refuse models that differ from the first in a :data:`SAME_CONFIG` field, a tensor name or shape."""
    configs = []
    for folder in folders:
        try:
            configs.append(json.loads((folder / CONFIG_NAME).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder / CONFIG_NAME}: not a readable model config ({e})") from None
    ref = checkpoints[0]
    for folder, config, ckpt in zip(folders[1:], configs[1:], checkpoints[1:]):
        for key in SAME_CONFIG:
            if config.get(key) != configs[0].get(key):
                raise ValueError(f"cannot merge {folder} with {folders[0]}: config field {key!r} is "
                                 f"{config.get(key)!r}, not {configs[0].get(key)!r}")
        for name in sorted(set(ref.where) ^ set(ckpt.where)):
            has, lacks = (folders[0], folder) if name in ref.where else (folder, folders[0])
            raise ValueError(f"cannot merge {folder} with {folders[0]}: tensor {name!r} is in {has} but not "
                             f"in {lacks}")
        for name in ref.where:
            if ckpt.shape(name) != ref.shape(name):
                raise ValueError(f"cannot merge {folder} with {folders[0]}: tensor {name!r} has shape "
                                 f"{ckpt.shape(name)}, not {ref.shape(name)}")


def _replace_folder(new: Path, out: Path) -> None:
    """Rename the complete folder ``new`` to ``out``; an existing ``out`` is moved aside first, then removed."""
    old = out.with_name(f"{TEMP_PREFIX}{out.name}.old.{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
