"""The ``fusejax`` console command: one subcommand per pipeline stage, each driven by one config.

    fusejax config [CONFIG] [key=value ...]   print the resolved config as YAML
    fusejax config --fields                   every setting with its type, default and help
    fusejax demo [--output DIR]               the embedded default: FuseLLM vs CLM-only on tiny models
    fusejax STAGE [CONFIG] [key=value ...]    run a pipeline stage (see STAGES)

Stage modules are imported only when their subcommand runs, so the command starts without loading JAX.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from fusejax import __version__
from fusejax.config import iter_fields, load_config, to_yaml
from fusejax.distributed import initialize
from fusejax.errors import debug, user_error_message

# stage subcommand -> ("module:function", help). The function takes the resolved Config and returns None or an
# exit code. Add one entry when a stage's module lands (none are listed before their module exists).
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("fusejax.corpus:run", "cut the corpus into blocks of target tokens (writes <output_dir>/corpus)"),
    "represent": ("fusejax.represent:run", "top-k logits and CE of every source (writes <output_dir>/represent)"),
    "vocab-map": ("fusejax.align:run_vocab_maps", "map each source vocabulary onto the target's (vocab_maps/)"),
    "align": ("fusejax.align:run_align", "align every source's top-k to the target tokens (writes aligned/)"),
    "train": ("fusejax.train:run", "fused continual training of the target (writes <output_dir>/train)"),
    "eval": ("fusejax.evaluate:run", "held-out loss and bits per byte of the target before and after training"),
    "export": ("fusejax.export:run", "the latest training checkpoint as a Hugging Face folder (export.path)"),
    "plan": ("fusejax.plan:run", "per-device memory and shardings of the train step, without allocating the model"),
    "run": ("fusejax.pipeline:run", "every stage in order, skipping finished ones (see docs/pipeline.md)"),
}

DEMO = "fusejax.embedded:demo"

_CONFIG_HELP = "YAML config file (optional: the defaults of configs/default.yaml otherwise)"
_OVERRIDES_HELP = "dotted overrides applied last, values in YAML syntax: train.lr=2e-5 sources.0.path=models/x"


def resolve(spec: str):
    """The callable named by ``"package.module:function"`` (imported now)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG", help=_CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)


def _config_from(args: argparse.Namespace):
    """Load the config from CONFIG and the overrides; a first argument with '=' is an override, not a file."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:
        path, overrides = None, [path, *overrides]
    return load_config(path, overrides)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``config`` and ``demo`` subcommands and one per entry of ``STAGES``."""
    parser = argparse.ArgumentParser(
        prog="fusejax",
        description="FuseLLM knowledge fusion in JAX: fuse source LLMs into a target LLM by continual training.",
        epilog="Every stage reads one YAML config plus key=value overrides; `fusejax config --fields` lists them.",
    )
    parser.add_argument("--version", action="version", version=f"fusejax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="print the resolved config (or, with --fields, every setting)")
    _add_config_args(config)
    config.add_argument("--fields", action="store_true", help="list every setting with type, default and help")

    demo = sub.add_parser("demo", help="the embedded default: three tiny sources fused into a tiny target on "
                                       "Python's own docs and source, vs CLM-only training (~10 min on 2 CPUs)")
    demo.add_argument("--output", default="runs/embedded", metavar="DIR", help="output folder (default: %(default)s)")

    for name, (_, help_text) in STAGES.items():
        _add_config_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _print_fields() -> None:
    for key, type_name, default, help_text in iter_fields():
        print(f"{key}: {type_name} = {json.dumps(default)}\n    {help_text}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fusejax`` command on ``argv`` (default: ``sys.argv[1:]``); returns the exit code
    (2 with a one-line message on stderr for a user error, see :mod:`fusejax.errors`)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            if args.fields:
                _print_fields()
            else:
                print(to_yaml(_config_from(args)), end="")
            return 0
        if args.command == "demo":
            result = resolve(DEMO)(args.output)
        else:
            cfg = _config_from(args)
            initialize()  # join the other processes of a pod / cluster before any JAX use
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
            logging.getLogger("fusejax").setLevel(logging.INFO)  # our progress notes; libraries: warnings only
            result = resolve(STAGES[args.command][0])(cfg)
            if isinstance(result, dict):  # every stage returns its summary: show it
                print(json.dumps(result, indent=2, sort_keys=True, default=str))
    except Exception as e:  # a user error is one line and exit code 2; a bug keeps its traceback
        message = None if debug() else user_error_message(e)
        if message is None:
            raise
        print(f"fusejax: error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
