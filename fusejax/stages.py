"""The one registry of stages: what each runs, where it writes, what it reads. ``fusejax run`` (the
pipeline) and the ``fusejax`` command both read it; neither keeps a list of its own.

:data:`PIPELINE` lists the stages in order; each is a function ``module:function`` taking the resolved
:class:`fusejax.config.Config`. :data:`COMMANDS` adds the commands that are not pipeline stages (``plan``,
``run``). Stage modules are imported only by :func:`resolve`, so listing them costs nothing (no JAX).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

from fusejax.config import Config
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
    return [p for p in (cfg.target.path, cfg.target.tokenizer) if p]


PIPELINE: tuple[Stage, ...] = (
    Stage("prepare", "fusejax.corpus:run", "cut the corpus into blocks of target tokens (writes <output_dir>/corpus)",
          "corpus", ("corpus", "run.seed", "target.tokenizer_path"),
          paths=lambda cfg: [*cfg.corpus.inputs, cfg.target.tokenizer_path]),
    Stage("represent", "fusejax.represent:run", "top-k logits and CE of every source (writes <output_dir>/represent)",
          "represent", ("sources", "represent"), after=("prepare",),
          paths=lambda cfg: [p for s in cfg.sources for p in (s.path, s.tokenizer) if p]),
    Stage("vocab-map", "fusejax.vocab_maps:run", "map each source vocabulary onto the target's (vocab_maps/)",
          "vocab_maps", ("vocab_map", "sources", "target.tokenizer_path"), after=("represent",),
          paths=lambda cfg: [*(s.tokenizer_path for s in cfg.sources), cfg.target.tokenizer_path]),
    Stage("align", "fusejax.align:run", "align every source's top-k to the target tokens (writes aligned/)",
          "aligned", ("align", "represent.k"), after=("represent", "vocab-map")),
    Stage("train", "fusejax.train:run", "fused continual training of the target (writes <output_dir>/train)",
          "train", ("train", "target", "run.seed", "mesh.rules"), after=("align",), paths=_target_paths),
    Stage("eval", "fusejax.evaluation:run", "held-out loss and bits per byte of the target before and after training",
          "eval", ("eval", "target", "train.seq_len"), after=("prepare", "train"), paths=_target_paths),
    Stage("export", "fusejax.export:run", "the latest training checkpoint as a Hugging Face folder (export.path)",
          "export", ("export",), after=("train",)),
)
STAGE_NAMES = tuple(s.name for s in PIPELINE)

# subcommand -> ("module:function", help): every pipeline stage, then the other commands
COMMANDS: dict[str, tuple[str, str]] = {
    **{s.name: (s.fn, s.help) for s in PIPELINE},
    "plan": ("fusejax.plan:run", "per-device memory and shardings of the train step, without allocating the model"),
    "run": ("fusejax.pipeline:run", "every stage in order, skipping finished ones (see docs/pipeline.md)"),
}


def resolve(spec: str) -> Callable:
    """The callable named by ``"package.module:function"`` (imported now)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
