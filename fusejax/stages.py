"""The one registry of stages: what each runs, where it writes, what it reads. ``fusejax run`` (the
pipeline) and the ``fusejax`` command both read it; neither keeps a list of its own.

:data:`PIPELINE` lists the stages in order; each is a function ``module:function`` taking the resolved
:class:`fusejax.config.Config`. :data:`COMMANDS` adds the commands that are not pipeline stages (``plan``,
``run``). Stage modules are imported only by :func:`resolve`, so listing them costs nothing (no JAX).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path

from fusejax.config import Config, ConfigError, config_to_dict, load_config, replace
from fusejax.schema import RunLayout


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``fn`` ("module:function" taking the Config), ``help`` (one line), its output
    ``folder`` (an attribute of :class:`fusejax.schema.RunLayout`), the config ``sections`` it reads (dotted
    keys), the stages it reads from (``after``) and ``paths(cfg)``: the files and folders it reads."""

    name: str
    fn: str
    help: str
    folder: str
    sections: tuple[str, ...]
    after: tuple[str, ...] = ()
    paths: Callable[[Config], list] = lambda cfg: []

    def output(self, cfg: Config) -> Path:
        """The folder this stage writes (the pipeline's ``stage.json`` goes inside)."""
        return getattr(RunLayout.of(cfg), self.folder)


def _target_paths(cfg: Config) -> list[str]:
    return [p for p in (cfg.target.path, cfg.target.tokenizer, cfg.target.chat_template) if p]


PIPELINE: tuple[Stage, ...] = (
    Stage("prepare", "fusejax.corpus:run", "cut the corpus into blocks of target tokens (writes <output_dir>/corpus)",
          "corpus", ("corpus", "run.seed", "target.tokenizer_path", "target.chat_template"),
          paths=lambda cfg: [p for p in (*cfg.corpus.inputs, cfg.target.tokenizer_path, cfg.target.chat_template)
                             if p]),
    Stage("represent", "fusejax.represent:run", "top-k logits and CE of every source (writes <output_dir>/represent)",
          "represent", ("sources", "represent"), after=("prepare",),
          paths=lambda cfg: [p for s in cfg.sources for p in (s.path, s.tokenizer, s.chat_template) if p]),
    Stage("vocab-map", "fusejax.vocab_maps:run", "map each source vocabulary onto the target's (vocab_maps/)",
          "vocab_maps", ("vocab_map", "sources", "target.tokenizer_path"), after=("represent",),
          paths=lambda cfg: [*(s.tokenizer_path for s in cfg.sources), cfg.target.tokenizer_path]),
    Stage("align", "fusejax.align:run", "align every source's top-k to the target tokens (writes aligned/)",
          "aligned", ("align", "represent.k"), after=("represent", "vocab-map")),
    Stage("train", "fusejax.train:run", "fused continual training of the target (writes <output_dir>/train)",
          "train", ("train", "target", "run.seed", "mesh.rules"), after=("align",), paths=_target_paths),
    Stage("eval", "fusejax.evaluation:run", "held-out loss and bits per byte of the target before and after training",
          "eval", ("eval", "target", "train.seq_len"), after=("prepare", "train"),
          paths=lambda cfg: _target_paths(cfg) + [p for p in (cfg.eval.include_path,) if p]),
    Stage("export", "fusejax.export:run", "the latest training checkpoint as a Hugging Face folder (export.path)",
          "export", ("export",), after=("train",)),
)
STAGE_NAMES = tuple(s.name for s in PIPELINE)
RECORD = "stage.json"  # a stage folder's record of its run (fusejax.pipeline)
# `fusejax merge`; with run.pairwise, `fusejax run` runs it after the pairs, skipped while its inputs are unchanged
MERGE = Stage("merge", "fusejax.merging:run", "merge models of one architecture in parameter space (docs/merging.md)",
              "merge", ("merge",), paths=lambda cfg: [p for p in (*cfg.merge.models, cfg.merge.base) if p])

# subcommand -> ("module:function", help): every pipeline stage, then the other commands
COMMANDS: dict[str, tuple[str, str]] = {
    **{s.name: (s.fn, s.help) for s in PIPELINE},
    "plan": ("fusejax.plan:run", "per-device memory and shardings of the train step, without allocating the model"),
    MERGE.name: (MERGE.fn, MERGE.help),
    "generate": ("fusejax.generation:run", "complete prompts with a model (generate.prompts -> generate.output)"),
    "run": ("fusejax.pipeline:run", "every stage in order, skipping finished ones (see docs/pipeline.md)"),
}


def pair_configs(cfg: Config) -> list[tuple[str, Config]]:
    """``run.pairwise``: ``(source name, config)`` of each pair, the whole pipeline for that source alone (and,
    with ``run.pairwise_target``, the target as a source named "target") in ``RunLayout.pair(name)``, with
    its export there; every pair reads the run's corpus store (``run.corpus_dir``: the first pair prepares it,
    the others find it complete with the same fingerprint and skip the stage)."""
    layout = RunLayout.of(cfg)
    if cfg.run.pairwise_target and any(s.name == "target" for s in cfg.sources):
        raise ConfigError("run.pairwise_target adds a source named 'target'; rename the source called 'target'")
    raw = config_to_dict(cfg)
    itself = {"name": "target", **{k: raw["target"][k] for k in ("path", "tokenizer", "chat_template")}}
    out = []
    for source in raw["sources"]:
        pair = copy.deepcopy(raw)
        pair["run"].update(output_dir=str(layout.pair(source["name"])), pairwise=False, pairwise_target=False,
                           corpus_dir=str(layout.corpus))
        pair["sources"] = [source, itself] if cfg.run.pairwise_target else [source]
        pair["export"]["path"] = None
        out.append((source["name"], load_config(data=pair)))
    return out


def pair_merge_config(cfg: Config) -> Config:
    """``run.pairwise``: ``cfg`` with ``merge.models`` the pairs' exports (in source order) and ``merge.base``
    the target unless set; ``merge.models`` must be empty in the config (the pairs fill it)."""
    if cfg.merge.models:
        raise ConfigError("merge.models: run.pairwise merges the fused pairs; leave merge.models empty")
    models = [str(RunLayout.of(pair).export) for _, pair in pair_configs(cfg)]
    return replace(cfg, "merge", {"models": models, "base": cfg.merge.base or cfg.target.path})


def _inputs(cfg: Config) -> list[tuple[str, str]]:
    """``(setting, path)`` of every file or folder a run reads."""
    refs = [("target", cfg.target)] + [(f"sources.{i}", s) for i, s in enumerate(cfg.sources)]
    out = [(f"{key}.{attr}", getattr(ref, attr)) for key, ref in refs for attr in ("path", "tokenizer")]
    out += [(f"corpus.inputs.{i}", p) for i, p in enumerate(cfg.corpus.inputs)]
    return [(key, p) for key, p in out if p]


def _overlap(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same path or one lies inside the other."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def output_conflicts(cfg: Config, command: str | None = None) -> list[str]:
    """One line for each way the outputs of ``cfg`` would overwrite or move one of its inputs, or each other:
    a folder a stage writes (or ``stale/``, where ``fusejax run`` moves outdated ones) that is, contains or
    lies inside an input (model, tokenizer, corpus input); an ``export.path`` that is or contains
    ``run.output_dir`` or another stage's folder, or that already holds files no export wrote. Inputs
    elsewhere under ``run.output_dir`` are fine. ``command`` adds the output of that command: ``merge``
    (``merge.path``, checked as ``export.path``, against ``merge.models`` and ``merge.base`` too) or
    ``generate`` (``generate.output``, against ``generate.prompts``, ``.model`` and ``.tokenizer`` too)."""
    layout = RunLayout.of(cfg)
    written = [(s.folder if s.name != "export" else "export.path", getattr(layout, s.folder)) for s in PIPELINE]
    written = [(name, path.resolve()) for name, path in written + [("stale", layout.stale)]]
    inputs = _inputs(cfg)
    if command == "merge":
        written.append(("merge.path", layout.merge.resolve()))
        inputs += [(f"merge.models.{i}", p) for i, p in enumerate(cfg.merge.models)]
        inputs += [("merge.base", cfg.merge.base)] if cfg.merge.base else []
    elif command == "generate":
        written.append(("generate.output", Path(cfg.generate.output or layout.root / "generate.jsonl").resolve()))
        g = cfg.generate
        named = (("prompts", g.prompts), ("model", g.model), ("tokenizer", g.tokenizer))
        inputs += [(f"generate.{key}", p) for key, p in named if p]
    problems = [f"{name} ({path}) would overwrite or move the input {key}={raw}; choose another "
                f"{name if '.' in name else 'run.output_dir'} or move the input"
                for key, raw in inputs for name, path in written if _overlap(Path(raw).resolve(), path)]
    stage_folders = [(name, path) for name, path in written if "." not in name]
    model_folders = [("export.path", "export")] + ([("merge.path", "merge")] if command == "merge" else [])
    for key, stage in model_folders:
        folder = getattr(layout, stage)
        if layout.root.resolve().is_relative_to(folder.resolve()):
            problems.append(f"{key} ({folder}) is or contains run.output_dir ({layout.root}); write it to a "
                            "folder of its own")
            continue
        problems += [f"{key} ({folder}) overlaps the {name} folder ({path}) of the run"
                     for name, path in stage_folders if _overlap(folder.resolve(), path)]
        problems += [f"{key} ({folder}) {why}" for why in [_not_replaceable(folder, stage)] if why]
    return problems


def _not_replaceable(folder: Path, stage: str) -> str | None:
    """Why stage ``stage`` may not write its model folder over ``folder``, or None: it may when ``folder`` is
    absent, empty or an earlier output of that stage (its ``stage.json`` names the stage)."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "is a file; name a folder"
    entries = sorted(p.name for p in folder.iterdir())
    if not entries or (read_record(folder) or {}).get("stage") == stage:
        return None
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    return (f"already holds {len(entries)} entries that no fusejax {stage} wrote ({shown}); choose a new or "
            "empty folder, or remove them")


def read_record(folder: Path) -> dict | None:
    """The ``stage.json`` record of a stage folder (:mod:`fusejax.pipeline`), or None when absent or unreadable."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def resolve(spec: str) -> Callable:
    """The callable named by ``"package.module:function"`` (imported now)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
