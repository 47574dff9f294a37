"""fusejax.cli: subcommands, overrides, --fields, stage registry, clean errors with exit code 2."""

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from fusejax import cli, stages
from fusejax.config import ConfigError, iter_fields

ROOT = Path(__file__).resolve().parents[1]


def fake_module(monkeypatch, name, **functions):
    module = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(module, key, fn)
    monkeypatch.setitem(sys.modules, name, module)


def test_config_prints_resolved_yaml(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("base: " + str(ROOT / "configs/example.yaml") + "\ntrain: {steps: 12}\n")
    assert cli.main(["config", str(path), "train.lr=3e-5", "sources.2.name=mpt7b"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["lr"] == 3e-5 and out["train"]["steps"] == 12 and out["train"]["batch_size"] == 128
    assert [s["name"] for s in out["sources"]] == ["llama2", "openllama", "mpt7b"]


def test_config_without_file_takes_overrides_only(capsys):
    assert cli.main(["config", "run.seed=4", "train.fusion=avg_ce"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["run"]["seed"] == 4 and out["train"]["fusion"] == "avg_ce" and out["corpus"]["block_size"] == 2048


def test_fields_lists_every_field(capsys):
    assert cli.main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    keys = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    # every leaf setting (iter_fields is checked against the dataclasses themselves in test_config.py)
    expected = {key: help_text for key, _, _, help_text in iter_fields()}
    assert sorted(keys) == sorted(expected)
    for help_text in expected.values():
        assert f"\n    {help_text}\n" in out
    assert "train.lr: float = 1e-05\n" in out
    assert "train.fusion: 'min_ce' | 'avg_ce' | 'avg_ce_norm' = \"min_ce\"\n" in out
    assert "corpus.holdout_fraction: float = 0.0\n" in out


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["config", "train.lrr=1"], ["unknown key 'train.lrr'", "did you mean 'train.lr'?"]),
        (["config", "MISSING.yaml"], ["MISSING.yaml not found"]),
        (["config", "train.lr=abc"], ["'train.lr'", "expected a number", "'abc'"]),
    ],
)
def test_config_errors_are_one_clean_line_with_exit_code_2(capsys, argv, fragments):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusejax: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_error_in_a_file_names_it(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 1\n")
    assert cli.main(["config", str(path)]) == 2
    assert capsys.readouterr().err == f"fusejax: error: unknown key 'train.lrr' in {path}; did you mean 'train.lr'?\n"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "usage: fusejax" in capsys.readouterr().err


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "config" in out and "demo" in out
    with pytest.raises(SystemExit):
        cli.main(["config", "--help"])
    out = capsys.readouterr().out
    assert "CONFIG" in out and "key=value" in out and "--fields" in out


def test_demo_calls_demo_main_with_the_output_dir(monkeypatch, tmp_path):
    calls = []
    fake_module(monkeypatch, "fusejax.embedded", demo=lambda output_dir: calls.append(output_dir))
    assert cli.main(["demo", "--output", str(tmp_path / "d")]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [str(tmp_path / "d"), "runs/embedded"]


def test_demo_output_that_is_a_file_is_refused_before_anything_runs(monkeypatch, tmp_path, capsys):
    calls = []
    fake_module(monkeypatch, "fusejax.embedded", demo=lambda output_dir: calls.append(output_dir))
    (tmp_path / "afile").write_text("mine")
    assert cli.main(["demo", "--output", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == f"fusejax: error: --output {tmp_path / 'afile'}: is a file; name a folder\n"
    assert calls == [] and (tmp_path / "afile").read_text() == "mine"


def test_registered_stage_gets_the_resolved_config(monkeypatch, tmp_path, capsys):
    seen = []

    def run(cfg):
        seen.append(cfg)
        return 3

    def broken(cfg):
        raise ConfigError("target.path is not set")

    fake_module(monkeypatch, "fake_stage_module", run=run, broken=broken)
    monkeypatch.setitem(stages.COMMANDS, "fake", ("fake_stage_module:run", "fake stage help"))
    monkeypatch.setitem(stages.COMMANDS, "broken", ("fake_stage_module:broken", "always fails"))
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 5}\n")
    assert cli.main(["fake", str(path), "train.lr=2e-5"]) == 3  # the stage's return value is the exit code
    assert cli.main(["fake", "run.seed=7"]) == 3
    assert (seen[0].train.steps, seen[0].train.lr) == (5, 2e-5) and seen[1].run.seed == 7
    assert cli.main(["broken"]) == 2
    assert capsys.readouterr().err == "fusejax: error: target.path is not set\n"
    with pytest.raises(SystemExit):
        cli.main(["fake", "--help"])
    assert "fake stage help" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt("interrupted: saved a checkpoint at step 3")

    fake_module(monkeypatch, "fake_stage_module", interrupted=interrupted)
    monkeypatch.setitem(stages.COMMANDS, "slow", ("fake_stage_module:interrupted", "a stage that gets Ctrl-C"))
    assert cli.main(["slow"]) == 130
    assert capsys.readouterr().err == "fusejax: interrupted: saved a checkpoint at step 3\n"


def test_training_stopped_by_sigterm_exits_143(monkeypatch, capsys):
    """A preempted training saved its checkpoint but did not finish: the shell's exit code for SIGTERM."""
    import signal

    from fusejax.train import Interrupted

    def preempted(cfg):
        raise Interrupted("interrupted by SIGTERM: saved a checkpoint at step 3", signal.SIGTERM)

    fake_module(monkeypatch, "fake_stage_module", preempted=preempted)
    monkeypatch.setitem(stages.COMMANDS, "slow", ("fake_stage_module:preempted", "a stage that gets SIGTERM"))
    assert cli.main(["slow"]) == 143
    assert capsys.readouterr().err == "fusejax: interrupted by SIGTERM: saved a checkpoint at step 3\n"


def test_listed_stages_exist():
    for name, (spec, help_text) in stages.COMMANDS.items():
        module, _, function = spec.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert help_text, name


def test_console_command_starts_without_jax_and_fails_cleanly():
    code = "import sys, fusejax.cli; sys.exit(1 if 'jax' in sys.modules else fusejax.cli.main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "config", "train.steps=x"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fusejax: error: bad value for 'train.steps'") and "Traceback" not in proc.stderr
