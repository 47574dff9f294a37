"""The ``fusejax`` console command: one subcommand per pipeline stage, each driven by one config.

    fusejax config [CONFIG] [key=value ...]   print the resolved config as YAML
    fusejax config --fields                   every setting with its type, default and help
    fusejax demo [--output DIR]               the embedded default: FuseLLM vs CLM-only on tiny models
    fusejax STAGE [CONFIG] [key=value ...]    run a pipeline stage or command (see fusejax.stages.COMMANDS)

Stage modules are imported only when their subcommand runs, so the command starts without loading JAX.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fusejax import __version__, pipeline, stages
from fusejax.config import ConfigError, iter_fields, load_config, to_yaml
from fusejax.distributed import initialize
from fusejax.errors import debug, quiet_background_errors, user_error_message

DEMO = "fusejax.embedded:demo"

_CONFIG_HELP = "YAML config file (optional: the defaults of configs/default.yaml otherwise)"
_OVERRIDES_HELP = "dotted overrides applied last, values in YAML syntax: train.lr=2e-5 sources.0.path=models/x"


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
    """The argument parser with the ``config`` and ``demo`` subcommands and one per entry of
    :data:`fusejax.stages.COMMANDS`."""
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
    demo.add_argument("--output", default="runs/embedded", metavar="DIR",
                      help="output folder of the runs and the report (default: %(default)s; the tiny models and "
                           "corpora stay in runs/embedded/assets, where configs/embedded.yaml reads them)")

    for name, (_, help_text) in stages.COMMANDS.items():
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
            if Path(args.output).exists() and not Path(args.output).is_dir():
                raise ConfigError(f"--output {args.output}: is a file; name a folder")
            result = stages.resolve(DEMO)(args.output)
        else:
            cfg = _config_from(args)
            recorded = args.command in (*stages.STAGE_NAMES, stages.MERGE.name)  # in stage.json, as by `run`
            if (recorded or args.command == "generate") and (conflicts := stages.output_conflicts(cfg, args.command)):
                raise ConfigError("; ".join(conflicts))
            initialize()  # join the other processes of a pod / cluster before any JAX use
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
            logging.getLogger("fusejax").setLevel(logging.INFO)  # our progress notes; libraries: warnings only
            if not debug():
                quiet_background_errors()
            if recorded:
                result = pipeline.run_single(cfg, args.command)
            else:
                result = stages.resolve(stages.COMMANDS[args.command][0])(cfg)
            if isinstance(result, dict):  # every stage returns its summary: show it
                print(json.dumps(result, indent=2, sort_keys=True, default=str))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM in training: one line, the shell's exit code for the signal
        print(f"fusejax: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # a user error is one line and exit code 2; a bug keeps its traceback
        message = None if debug() else user_error_message(e)
        if message is None:
            raise
        print(f"fusejax: error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
