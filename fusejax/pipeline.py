"""``fusejax run CONFIG``: every stage in order, each cached under a fingerprint of its inputs.

Stages (:data:`fusejax.stages.PIPELINE`): prepare -> represent -> vocab-map -> align -> train -> eval -> export.
Each stage writes one folder under ``run.output_dir`` and, next to its output inside that folder, ``stage.json``:
``{"stage", "fingerprint", "status": "running" | "complete", "started", "finished"}``.

The fingerprint of a stage is a sha256 over the config sections it reads, the fingerprints of the stages it
reads from, and the name, size, modification time and a content hash of every file under the paths it reads
(corpus inputs, model and tokenizer folders; see :func:`_file_stats`). On a rerun a stage is

* **skipped** when its ``stage.json`` is complete with the same fingerprint and no earlier stage ran this time;
* **resumed** (run again; every stage resumes its own partial output) when it is ``running`` with the same
  fingerprint, or when its folder exists without ``stage.json`` (e.g. written by an older fusejax);
* **redone** when the fingerprint differs, or when it is complete but an earlier stage was not skipped (its
  input may have changed): the old folder is *moved aside* to ``<output_dir>/stale/<folder>-<old
  fingerprint[:12]>`` (never deleted; a warning names both paths). Once a stage is not skipped, every later one
  is therefore resumed, run or redone.

A single-stage command (``fusejax train CONFIG``, also ``fusejax merge``; :func:`run_single`) writes the same
records with its stage's fingerprint under its own config, but neither skips nor moves aside: the stage
resumes or refuses by itself. A later ``fusejax run`` with another config so redoes what the command changed.
Over output of another fingerprint the records hold none (null): any later ``fusejax run`` redoes that folder.

Before any stage runs, :func:`validate` checks the whole config and raises one ConfigError listing every
problem found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from fusejax import stages
from fusejax.config import Config, ConfigError, config_to_dict
from fusejax.distributed import barrier
from fusejax.files import write_json
from fusejax.schema import RunLayout
from fusejax.stages import MERGE, PIPELINE, RECORD, STAGE_NAMES, Stage, output_conflicts, read_record

log = logging.getLogger(__name__)

# settings that change how a stage reports or checkpoints, not what it computes: left out of fingerprints,
# so changing them resumes the stage instead of redoing it
BOOKKEEPING = {"train": ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "peak_flops",
                         "nonfinite"),
               "align": ("workers",)}


def _section(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    value = config_to_dict(value)
    for key in BOOKKEEPING.get(dotted, ()):
        value.pop(key)
    return value


def _content(path: Path) -> str | None:
    """The content hash of one file: :func:`fusejax.models.hf_io.safetensors_fingerprint` for weights (header
    and 1 MiB of sampled tensor data), None for pickle checkpoints (never read), else the sha256 of every byte
    (:func:`fusejax.corpus.input_fingerprint`: corpus inputs, tokenizer and config files)."""
    from fusejax.corpus import input_fingerprint
    from fusejax.models.hf_io import PICKLE_SUFFIXES, safetensors_fingerprint

    if path.suffix == ".safetensors":
        return safetensors_fingerprint(path)
    return None if path.suffix in PICKLE_SUFFIXES else input_fingerprint(path)


def _file_stats(paths, seen: dict) -> list:
    """``[path, [[relative file, size, mtime_ns, content hash], ...]]`` for each path (missing paths record
    ``None``); the content hash (:func:`_content`) notices an edit that keeps size and modification time.
    ``seen`` keeps each file's entry across the stages of one :func:`fingerprints` call (several stages read
    the same model and tokenizer folders), so every file is read once."""
    out = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files = [("", path)]
        elif path.is_dir():
            files = [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*")) if p.is_file()]
        else:
            out.append([str(raw), None])
            continue
        for _, p in files:
            if p not in seen:
                st = p.stat()
                seen[p] = [st.st_size, st.st_mtime_ns, _content(p)]
        out.append([str(raw), [[name, *seen[p]] for name, p in files]])
    return out


def fingerprints(cfg: Config, pipeline: tuple[Stage, ...] = PIPELINE) -> dict[str, str]:
    """The fingerprint (sha256 hex) of every stage of ``pipeline`` for ``cfg``, in stage order."""
    out: dict[str, str] = {}
    seen: dict = {}
    for stage in pipeline:
        payload = {
            "stage": stage.name,
            "config": {key: _section(cfg, key) for key in stage.sections},
            "after": {name: out[name] for name in stage.after},
            "files": _file_stats(stage.paths(cfg), seen),
        }
        out[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return out


def _write_record(folder: Path, record: dict) -> None:
    write_json(folder / RECORD, record)


def _move_aside(cfg: Config, folder: Path, old_fingerprint: str) -> Path:
    stale = RunLayout.of(cfg).stale
    stale.mkdir(parents=True, exist_ok=True)
    dest = stale / f"{folder.name}-{old_fingerprint[:12]}"
    if dest.exists():
        dest = stale / f"{folder.name}-{old_fingerprint[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(folder), str(dest))
    return dest


def _run_stage(cfg: Config, stage: Stage, fp: str, main: bool, after_change: bool = False) -> str:
    """Skip, resume or redo one stage (see the module docstring); ``after_change``: an earlier stage was not
    skipped, so a complete output is redone too. Returns what was done."""
    folder = stage.output(cfg)
    record = read_record(folder)
    complete = bool(record) and record.get("fingerprint") == fp and record.get("status") == "complete"
    if complete and not after_change:
        _say(main, f"{stage.name}: complete, skipped ({folder})")
        return "skipped"
    if record and (complete or record.get("fingerprint") != fp):
        if main:
            dest = _move_aside(cfg, folder, str(record.get("fingerprint") or "mixed"))
            why = "an earlier stage ran again" if complete else "inputs changed"
            log.warning("%s: %s since %s was written; moved it aside to %s", stage.name, why, folder, dest)
        barrier(f"pipeline-{stage.name}-moved")
        outcome = "redone"
    else:
        outcome = "resumed" if folder.exists() else "ran"
    _say(main, f"{stage.name}: {outcome.replace('ran', 'running')} -> {folder}")
    _recorded(cfg, stage, fp, main)
    return outcome


def _recorded(cfg: Config, stage: Stage, fp: str, main: bool):
    """Run ``stage`` between its ``stage.json`` records, ``running`` then ``complete`` (process 0 writes them;
    all processes meet at a barrier after the stage); returns the stage's result. Run over output of another
    fingerprint (a single-stage command resumes or refuses there), the records hold none (null): the folder is
    not what ``fp`` produces, so every later ``fusejax run`` moves it aside."""
    folder = stage.output(cfg)
    started, record = time.time(), read_record(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # created by writing the record
    if main:
        before = _listing(folder)
        fp = fp if record is None or record.get("fingerprint") == fp else None
        _write_record(folder, {"stage": stage.name, "fingerprint": fp, "status": "running",
                               "started": started, "finished": None})
    try:
        result = stages.resolve(stage.fn)(cfg)  # (the merge replaces its whole folder, this record included)
    except BaseException:
        if main:
            _undo_record(folder, missing, record, fp, unchanged=_listing(folder) == before)
        raise
    barrier(f"pipeline-{stage.name}")
    if main:
        _write_record(folder, {"stage": stage.name, "fingerprint": fp, "status": "complete",
                               "started": started, "finished": time.time()})
    return result


def _undo_record(folder: Path, missing: list[Path], record: dict | None, fp: str | None, *, unchanged: bool) -> None:
    """After the stage raised (refused, interrupted): put back its record when the stage wrote nothing
    (``unchanged``) or when that was complete with ``fp`` (the stage reruns to the same output), or remove the
    ``missing`` folders writing the record created while they hold nothing else."""
    if record and (unchanged or record.get("fingerprint") == fp and record.get("status") == "complete"):
        _write_record(folder, record)
    elif missing and [p.name for p in folder.glob("*")] == [RECORD]:  # (none when the merge removed it)
        (folder / RECORD).unlink()
        for path in missing:
            with contextlib.suppress(OSError):  # a folder that holds something now stays
                path.rmdir()


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder`` but its record: what a stage wrote."""
    files = (p for p in folder.rglob("*") if p.name != RECORD and p.is_file()) if folder.is_dir() else ()
    return {p.relative_to(folder).as_posix(): (st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]}


def run_single(cfg: Config, name: str):
    """A single-stage command (``fusejax train CONFIG``): the stage resumes or refuses by itself (never skipped
    or moved aside) and records itself in ``stage.json`` (:func:`_recorded`) with its fingerprint under ``cfg``,
    so that ``fusejax run`` redoes it for another config. Returns the stage's result."""
    from fusejax.distributed import is_main_process

    upto = (MERGE,) if name == MERGE.name else PIPELINE[:STAGE_NAMES.index(name) + 1]  # they chain backwards
    return _recorded(cfg, upto[-1], fingerprints(cfg, upto)[name], is_main_process())


def run(cfg: Config, *, validate_first: bool = True, stop_after: str | None = None) -> dict[str, str]:
    """Run every stage of :data:`fusejax.stages.PIPELINE` in order for ``cfg`` (up to ``stop_after`` when given),
    skipping, resuming or redoing each as the module docstring says. Returns ``{stage name: "skipped" | "resumed" |
    "ran" | "redone"}``."""
    from fusejax.distributed import is_main_process

    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ValueError(f"stop_after={stop_after!r}: expected one of {STAGE_NAMES}")
    if cfg.run.pairwise:
        return run_pairwise(cfg, validate_first=validate_first, stop_after=stop_after)
    if validate_first:
        validate(cfg, raise_error=True)
    prints = fingerprints(cfg)
    main = is_main_process()
    outcome: dict[str, str] = {}
    for stage in PIPELINE:
        changed = any(done != "skipped" for done in outcome.values())
        outcome[stage.name] = _run_stage(cfg, stage, prints[stage.name], main, changed)
        if stage.name == stop_after:
            break
    return outcome


def run_pairwise(cfg: Config, *, validate_first: bool = True, stop_after: str | None = None) -> dict:
    """``run.pairwise``: the whole pipeline once per source (:func:`fusejax.stages.pair_configs`; each pair
    skips or resumes its stages as :func:`run` does, so an interrupted run resumes per source), then, unless
    ``stop_after``, the stage :data:`fusejax.stages.MERGE` of the pairs' exports
    (:func:`fusejax.stages.pair_merge_config`), skipped or redone like any stage (its fingerprint: the ``merge``
    section and the files of the exports and the base). Every pair's config is validated before any runs.
    Returns ``{source name: run's outcome, "merge": "skipped" | "resumed" | "ran" | "redone"}``."""
    from fusejax.distributed import is_main_process

    pairs = stages.pair_configs(cfg)
    merge_cfg = stages.pair_merge_config(cfg) if stop_after is None else None
    if validate_first:
        for _, pair in pairs:
            validate(pair, raise_error=True)
        if merge_cfg is not None and (conflicts := output_conflicts(merge_cfg, MERGE.name)):
            raise ConfigError("; ".join(conflicts))
    main = is_main_process()
    outcome: dict = {}
    for name, pair in pairs:
        _say(main, f"pair {name}: {pair.run.output_dir}")
        outcome[name] = run(pair, validate_first=False, stop_after=stop_after)
    if merge_cfg is not None:
        _say(main, f"merge ({cfg.merge.method}) of {len(pairs)} pairs")
        fp = fingerprints(merge_cfg, (MERGE,))[MERGE.name]
        changed = any(done != "skipped" for name, _ in pairs for done in outcome[name].values())
        outcome["merge"] = _run_stage(merge_cfg, MERGE, fp, main, changed)
    return outcome


def _say(main: bool, text: str) -> None:
    if main:
        print(f"[fusejax run] {text}", flush=True)


# ----------------------------------------------------------------------------------------------- validation


def validate(cfg: Config, *, raise_error: bool = False, n_devices: int | None = None) -> list[str]:
    """Every problem of ``cfg`` that would make a stage fail, as messages naming the setting and value.

    Checks: no output overwrites or moves an input (:func:`fusejax.stages.output_conflicts`); at least one
    source; corpus inputs, model and tokenizer folders exist; tokenizers load and fit their model's
    vocabulary; the mesh fits ``n_devices`` (default: all devices) and every model's weights
    and the training batch divide it; ``represent.k`` <= every vocabulary; ``corpus.block_size + 1`` (the
    block plus EOS) <= ``train.seq_len`` and <= every model's context; ``train.seq_len`` <= the target's
    context and a batch's tokens within int32 (:func:`fusejax.step.size_problems`). ``raise_error``: raise one
    ConfigError listing all of them instead of returning them.
    """
    from fusejax.step import size_problems

    problems: list[str] = list(output_conflicts(cfg))
    if not cfg.sources:
        problems.append("sources: the config lists no sources (add at least one under 'sources:')")
    if not cfg.corpus.inputs:
        problems.append("corpus.inputs: empty; list the corpus files or folders")
    for i, path in enumerate(cfg.corpus.inputs):
        if not Path(path).exists():
            problems.append(f"corpus.inputs.{i}: {path} does not exist")
    mesh = _check_mesh(cfg, problems, n_devices)
    need = cfg.corpus.block_size + 1
    if need > cfg.train.seq_len:
        problems.append(f"train.seq_len={cfg.train.seq_len}: must be >= corpus.block_size + 1 = {need} "
                        f"(a block plus EOS)")
    models = [("target", cfg.target)] + [(f"sources.{i}", s) for i, s in enumerate(cfg.sources)]
    for key, ref in models:
        config = _check_model(key, ref, problems)
        _check_tokenizer(key, ref, config, problems)
        if key == "target":
            problems += size_problems(cfg.train, None if config is None else config.max_position_embeddings)
        if config is None:
            continue
        if config.max_position_embeddings < need:
            problems.append(f"{key}.path={ref.path}: context {config.max_position_embeddings} < corpus.block_size "
                            f"+ 1 = {need}; lower corpus.block_size")
        if key != "target" and cfg.represent.k > config.vocab_size:
            problems.append(f"represent.k={cfg.represent.k}: more than the vocabulary ({config.vocab_size}) of "
                            f"{key} ({ref.path})")
        if mesh is not None:
            _check_shardable(key, ref, config, mesh, cfg.mesh.rules or None, problems)
    if raise_error and problems:
        raise ConfigError(f"{len(problems)} problem(s) in the config:\n  - " + "\n  - ".join(problems))
    return problems


def _check_mesh(cfg: Config, problems: list[str], n_devices: int | None):
    """The mesh of ``cfg`` (abstract: shape only), or None after recording why it cannot be built."""
    import jax

    from fusejax.sharding import ShardingError, resolve_mesh_shape

    m = cfg.mesh
    try:
        sizes = resolve_mesh_shape(m.data, m.fsdp, m.tensor, n_devices)
    except ShardingError as e:
        problems.append(f"mesh: {e}")
        return None
    per_batch = cfg.train.batch_size // cfg.train.grad_accum
    parts = sizes["data"] * sizes["fsdp"]
    if per_batch % parts:
        problems.append(f"train.batch_size={cfg.train.batch_size}: the micro-batch of {per_batch} sequences "
                        f"(batch_size / grad_accum) must divide by mesh data*fsdp = {parts}")
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))


def _check_model(key: str, ref, problems: list[str]):
    from fusejax.models.hf_io import read_config

    if ref.path is None:
        problems.append(f"{key}.path: not set (a Hugging Face model folder)")
        return None
    if not Path(ref.path).is_dir():
        problems.append(f"{key}.path: {ref.path} does not exist or is not a folder")
        return None
    try:
        return read_config(ref.path)
    except ValueError as e:
        problems.append(f"{key}.path: {e}")
        return None


def _check_tokenizer(key: str, ref, config, problems: list[str]) -> None:
    """The tokenizer loads and fits the model's vocabulary."""
    from fusejax.tokenizer import load_tokenizer

    try:
        path = ref.tokenizer_path
    except ConfigError:
        return  # no path at all: reported by _check_model
    try:
        n = len(load_tokenizer(path))
    except (OSError, ValueError, TypeError) as e:
        problems.append(f"{key}.tokenizer ({path}): does not load: {e}")
        return
    if config is not None and n > config.vocab_size:
        problems.append(f"{key}: tokenizer {path} has {n} tokens, more than the model's vocab_size {config.vocab_size}")


def _check_shardable(key: str, ref, config, mesh, rules, problems: list[str]) -> None:
    from flax import nnx

    from fusejax.models import Transformer
    from fusejax.sharding import ShardingError, logical_to_spec, merge_rules

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    try:
        rules = merge_rules(rules)
        for path, var in nnx.to_flat_state(nnx.state(abstract)):
            shape = var.get_value().shape
            axes = var.get_metadata().get("logical_axes", (None,) * len(shape))
            logical_to_spec(axes, rules=rules, mesh=mesh, shape=shape, name=".".join(map(str, path)))
    except ShardingError as e:
        problems.append(f"{key}.path={ref.path}: weights do not fit the mesh {dict(mesh.shape)}: {e}")
