"""Bad input through the ``fusejax`` command: each case is refused with one clean line naming the file, field
and value, exit code 2 and no traceback. Cases already covered module by module are listed in
docs/reliability.md and not repeated here."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fusejax import cli, pipeline, stages
from fusejax.config import ConfigError, load_config
from fusejax.errors import quiet_background_errors
from fusejax.store import open_store

from test_reliability import ROOT, TEXTS, _copy_outputs, build_pipeline

SHORT = "x"  # a document of one target token: its source sequences are that token + EOS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, config path) of a tiny pipeline whose prepare and represent stages ran (output ``root/ref``)."""
    root = tmp_path_factory.mktemp("bad_input")
    config = build_pipeline(root, texts=[TEXTS[0][:600], SHORT])
    assert cli.main(["prepare", str(config)]) == 0
    assert cli.main(["represent", str(config)]) == 0
    return root, config


def fails(capsys, argv, *fragments) -> str:
    """Run the command; it must exit 2 with one ``fusejax: error:`` line, the last one on stderr (after any
    progress bar), holding every fragment."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert line.startswith("fusejax: error: ") and err.count("fusejax: error") == 1 and err.endswith("\n"), err
    for fragment in fragments:
        assert str(fragment) in line, (fragment, line)
    return line


def fresh(tmp_path, run, *stages) -> Path:
    """A new output folder holding copies of the reference outputs ``stages``."""
    _copy_outputs(run[0] / "ref", tmp_path / "out", stages)
    return tmp_path / "out"


def test_config_mistakes_name_key_and_value(run, capsys, tmp_path):
    _, config = run
    fails(capsys, ["prepare", config, "corpus.block_sise=4"], "unknown key 'corpus.block_sise'", "'corpus.block_size'")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {config}\nrepresent: {{k: many}}\n")
    fails(capsys, ["represent", bad], str(bad), "'represent.k'", "expected an integer", "'many'")
    # a source name becomes a folder under output_dir: it may not climb out of it
    fails(capsys, ["represent", config, "sources.0.name=../evil"], "'sources.0.name'", "'../evil'")


@pytest.mark.parametrize("text, overrides, fragments", [
    ("run: {seed: 1}\n".encode("utf-16"), [], ["is not UTF-8 text"]),
    ("run: {output_dir: caf\u00e9}\n".encode("latin-1"), [], ["is not UTF-8 text"]),
    (b"run: {seed: -3}\n", [], ["'run.seed'", "got -3"]),
    (b"train: {lr: 1e400}\n", [], ["'train.lr'", "expected a finite number"]),
    (b"{}\n", ["train.lr=.inf"], ["'train.lr' in override 'train.lr=.inf'", "expected a finite number"]),
], ids=["utf-16", "latin-1", "negative seed", "1e400", ".inf override"])
def test_unusable_config_is_one_line(capsys, tmp_path, text, overrides, fragments):
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    fails(capsys, ["config", path, *overrides], *fragments)


def test_missing_files_are_named(run, capsys, tmp_path):
    root, config = run
    out = f"run.output_dir={tmp_path / 'out'}"
    fails(capsys, ["prepare", config, out, f"corpus.inputs=[{tmp_path / 'nowhere'}]"],
          f"corpus input {tmp_path / 'nowhere'} does not exist")
    fails(capsys, ["prepare", config, out, f"target.tokenizer={tmp_path / 'no_tok'}"],
          f"tokenizer folder {tmp_path / 'no_tok'} does not exist")
    fails(capsys, ["represent", config, out], f"store {tmp_path / 'out' / 'corpus'} does not exist")
    out = f"run.output_dir={fresh(tmp_path, run, 'corpus')}"
    fails(capsys, ["represent", config, out, f"sources.0.path={tmp_path / 'no_model'}"],
          str(tmp_path / "no_model" / "config.json"), "missing")


def test_tokenizer_larger_than_the_model_vocabulary(run, capsys, tmp_path):
    root, config = run
    out = f"run.output_dir={fresh(tmp_path, run, 'corpus')}"
    fails(capsys, ["represent", config, out, f"sources.0.tokenizer={root / 'tok_neox'}"],
          "source 'llama': tokenizer has 420 tokens but the model's vocabulary is 350")


def test_store_of_another_k_or_tokenizer_is_refused(run, capsys, tmp_path):
    root, config = run
    out = f"run.output_dir={fresh(tmp_path, run, 'corpus', 'represent')}"
    fails(capsys, ["represent", config, out, "represent.k=5"], "represent/llama", "meta['k'] = 4", "asks for 5")
    fails(capsys, ["represent", config, out, f"sources.1.tokenizer={root / 'tok_target'}"],
          "represent/neox", "meta['tokenizer_fingerprint']")


def test_zero_kv_heads_in_a_source_config(run, capsys, tmp_path):
    root, config = run
    model = tmp_path / "model"
    model.mkdir()
    for file in (root / "model_llama").iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "num_key_value_heads": 0}))
    out = f"run.output_dir={fresh(tmp_path, run, 'corpus')}"
    bad = f"sources.0.path={model}"
    fails(capsys, ["represent", config, out, bad], str(model / "config.json"), "'num_key_value_heads'=0")
    problems = pipeline.validate(load_config(config, [out, bad]))
    assert any(p.startswith("sources.0.path: ") and "'num_key_value_heads'=0" in p for p in problems), problems


def test_k_larger_than_the_vocabulary(run, capsys, tmp_path):
    _, config = run
    out = f"run.output_dir={fresh(tmp_path, run, 'corpus')}"
    fails(capsys, ["represent", config, out, "represent.k=100000"],
          "represent.k=100000", "vocabulary size 350 of source 'llama'")


def test_corrupted_shard_is_named(run, capsys, tmp_path):
    _, config = run
    out = fresh(tmp_path, run, "corpus")
    text = out / "corpus" / "shard-p0000-000000" / "text.npy"
    data = bytearray(text.read_bytes())
    data[-1] ^= 0x20  # one flipped bit in the stored text
    text.write_bytes(bytes(data))
    fails(capsys, ["represent", config, f"run.output_dir={out}"], str(text), "sha256", "does not match manifest")


def test_path_traversal_in_a_manifest_is_refused(run, capsys, tmp_path):
    _, config = run
    out = fresh(tmp_path, run, "corpus")
    manifest = out / "corpus" / "manifest-p0000.json"
    man = json.loads(manifest.read_text())
    man["shards"][0]["name"] = "../../escape"
    manifest.write_text(json.dumps(man))
    fails(capsys, ["represent", config, f"run.output_dir={out}"], str(manifest), "invalid shard name '../../escape'")


def test_empty_shard_file_or_malformed_manifest_is_named(run, capsys, tmp_path):
    _, config = run
    for sub in "ab":
        (tmp_path / sub).mkdir()
    out = fresh(tmp_path / "a", run, "corpus")
    npy = out / "corpus" / "shard-p0000-000000" / "id.npy"
    npy.write_bytes(b"")  # e.g. a copy that ran out of space
    fails(capsys, ["represent", config, f"run.output_dir={out}"], f"{npy}: cannot load")
    out = fresh(tmp_path / "b", run, "corpus")
    manifest = out / "corpus" / "manifest-p0000.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fields": 7}))
    fails(capsys, ["represent", config, f"run.output_dir={out}"], str(manifest), "'fields' is 7")


@pytest.mark.parametrize("docs, fragments", [
    ({"blank.txt": b"  \n\t\n"}, ["gave no blocks", "'empty': 1"]),
    ({"latin1.txt": "caf\u00e9 cr\u00e8me".encode("latin-1")}, ["gave no blocks", "'invalid_utf8': 1"]),
    ({"notes.md": b"# not a corpus file\n"}, ["holds no .txt/.jsonl/.parquet files"]),
    ({"cut.parquet": b"PAR1\x15\x04"}, ["cut.parquet: not a readable parquet file"]),
])
def test_empty_or_undecodable_corpus(run, capsys, tmp_path, docs, fragments):
    _, config = run
    (tmp_path / "docs").mkdir()
    for name, data in docs.items():
        (tmp_path / "docs" / name).write_bytes(data)
    fails(capsys, ["prepare", config, f"run.output_dir={tmp_path / 'out'}", f"corpus.inputs=[{tmp_path / 'docs'}]"],
          *fragments)


def test_undecodable_documents_are_skipped_and_counted(run, capsys, tmp_path):
    _, config = run
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\xfe broken")
    (tmp_path / "docs" / "good.txt").write_text("a good document")
    out = tmp_path / "out"
    assert cli.main(["prepare", str(config), f"run.output_dir={out}", f"corpus.inputs=[{tmp_path / 'docs'}]"]) == 0
    summary = json.loads((out / "corpus" / "summary.json").read_text())
    assert summary["skipped"] == {"invalid_utf8": 1} and summary["documents"] == 1
    assert [row["doc_id"] for row in open_store(out / "corpus")] == ["docs/good.txt:0"]


def test_one_token_documents_are_scored_like_any_other(run):
    """A block of one target token: each source sees it + EOS; only the first position is scored."""
    root, _ = run
    corpus = open_store(root / "ref" / "corpus")
    block = next(row for row in corpus if row["text"] == SHORT.encode())
    assert block["n_tokens"] == 1
    for name in ("llama", "neox"):
        row = open_store(root / "ref" / "represent" / name).get(block["id"])
        ce = np.asarray(row["token_ce"])
        assert ce[-1] == 0 and np.all(np.isfinite(ce)) and np.all(ce[:-1] > 0)
        np.testing.assert_allclose(row["seq_ce"], ce[:-1].mean(), rtol=1e-6)


def test_block_longer_than_a_source_context(run, capsys, tmp_path):
    root, config = run
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "long.txt").write_text(TEXTS[0])
    out = [f"run.output_dir={tmp_path / 'out'}", f"corpus.inputs=[{tmp_path / 'docs'}]", "corpus.block_size=600"]
    assert cli.main(["prepare", str(config), *out]) == 0
    fails(capsys, ["represent", config, *out], "source 'llama'", "more than its context of 256",
          "lower corpus.block_size")


def test_sizes_no_step_holds_refused_up_front(run, capsys, tmp_path):
    _, config = run
    out = f"run.output_dir={tmp_path / 'out'}"  # nothing prepared: refused before any store is opened
    fails(capsys, ["train", config, out, "train.batch_size=1000000000000"],
          "train.batch_size=1000000000000 x train.seq_len=2048", "more than int32 counts")
    fails(capsys, ["train", config, out, "train.seq_len=1000000000"], "train.seq_len=1000000000",
          "max_position_embeddings = 256")
    fails(capsys, ["run", config, out, "train.batch_size=1000000000000"], "train.batch_size=1000000000000 x")


def test_mesh_that_does_not_divide_the_devices(run, capsys, tmp_path):
    _, config = run
    out = f"run.output_dir={fresh(tmp_path, run, 'corpus')}"
    fails(capsys, ["represent", config, out, "mesh.data=3"], "multiply to 3",
          "does not divide the 8 devices")


def test_bad_distributed_settings(run, capsys, monkeypatch):
    _, config = run
    monkeypatch.setenv("FUSEJAX_NUM_PROCESSES", "two")
    fails(capsys, ["prepare", config], "FUSEJAX_NUM_PROCESSES='two' is not an integer")


def test_bugs_keep_their_traceback_and_debug_shows_every_traceback(monkeypatch, capsys):
    def divide(cfg):
        return 1 / 0

    def numpy_shape_bug(cfg):
        return np.stack([np.zeros(1), np.zeros(2)])  # a ValueError raised inside numpy, not by our validation

    def user_error(cfg):
        raise ConfigError("target.path is not set")

    module = types.ModuleType("fake_stages")
    module.divide, module.numpy_shape_bug, module.user_error = divide, numpy_shape_bug, user_error
    monkeypatch.setitem(sys.modules, "fake_stages", module)
    for name in ("divide", "numpy_shape_bug", "user_error"):
        monkeypatch.setitem(stages.COMMANDS, name, (f"fake_stages:{name}", name))
    with pytest.raises(ZeroDivisionError):
        cli.main(["divide"])
    with pytest.raises(ValueError, match="same shape"):
        cli.main(["numpy_shape_bug"])
    assert cli.main(["user_error"]) == 2
    monkeypatch.setenv("FUSEJAX_DEBUG", "1")
    with pytest.raises(ConfigError, match="target.path"):
        cli.main(["user_error"])


def test_os_error_reported_by_tensorstore_is_one_line(monkeypatch, capsys):
    """How a full disk surfaces while Orbax writes a checkpoint: a ValueError raised outside fusejax."""
    full = ('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "/run/train/checkpoints/'
            '4.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 752307 bytes to '
            "file 4: No space left on device [os_error_code='28']")

    def save(cfg):
        raise ValueError(full)

    module = types.ModuleType("fake_stages")
    module.save = save
    monkeypatch.setitem(sys.modules, "fake_stages", module)
    monkeypatch.setitem(stages.COMMANDS, "save", ("fake_stages:save", "save"))
    assert fails(capsys, ["save"]) == f"fusejax: error: {full}"


def test_background_tracebacks_of_a_reported_error_are_dropped(monkeypatch):
    """What Orbax and TensorStore print while a checkpoint save fails: an absl record with a traceback, and
    a late callback into a closed asyncio loop. Other records and exceptions are still shown."""
    absl = logging.getLogger("absl")
    monkeypatch.setattr(absl, "filters", [])
    shown = []  # what reaches the hooks that were there before
    monkeypatch.setattr(sys, "excepthook", lambda exc_type, exc, tb: shown.append(exc))
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: shown.append(unraisable.exc_value))
    quiet_background_errors()
    quiet_background_errors()  # idempotent: a second stage in the same process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    absl.addHandler(handler)
    try:
        try:
            raise ValueError("RESOURCE_EXHAUSTED: disk full")
        except ValueError:
            absl.exception("_SignalingThread.run() raised an exception")
        absl.warning("a warning without traceback")
    finally:
        absl.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a warning without traceback"]

    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError) as closed:
        loop.call_soon_threadsafe(print)
    sys.excepthook(RuntimeError, closed.value, closed.value.__traceback__)
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed.value,
                                             exc_traceback=closed.value.__traceback__, err_msg=None, object=None))
    assert shown == []
    with pytest.raises(RuntimeError) as other:
        raise RuntimeError("Event loop is closed")  # same text, not raised by asyncio: a bug to show
    sys.excepthook(RuntimeError, other.value, other.value.__traceback__)
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=other.value,
                                             exc_traceback=other.value.__traceback__, err_msg=None, object=None))
    assert shown == [other.value, other.value]


def test_console_command_prints_no_traceback_unless_debugging(run, tmp_path):
    argv = [sys.executable, "-m", "fusejax.cli", "prepare", str(run[1]), f"corpus.inputs=[{tmp_path / 'nowhere'}]",
            f"run.output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"fusejax: error: corpus input {tmp_path / 'nowhere'} does not exist\n"
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "FUSEJAX_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_old_format_mixed_dtypes_or_another_mesh_refused_before_writing(run, capsys, tmp_path):
    """A top-k store of an older format, top-k stores of another logits dtype than the run's, a represent
    resume on another mesh: one line naming the store and both values, and nothing written."""
    _, config = run
    out = fresh(tmp_path, run, "corpus", "represent")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    at = f"run.output_dir={out}"
    fails(capsys, ["align", config, at, "represent.logits_dtype=bfloat16"], out / "represent" / "llama",
          "'logits_dtype' is 'float32', expected 'bfloat16'")
    fails(capsys, ["represent", config, at, "mesh.data=-1", "mesh.fsdp=2"], out / "represent" / "llama",
          "'fsdp': 8", "'fsdp': 2", "'devices': 8")
    manifest = out / "represent" / "neox" / "manifest-p0000.json"
    old = json.loads(manifest.read_text())
    del old["meta"]["format_version"]
    manifest.write_text(json.dumps(old))
    fails(capsys, ["align", config, at], out / "represent" / "neox", "format version 1 of 'topk' stores", "version 2")
    before[manifest] = manifest.read_bytes()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
