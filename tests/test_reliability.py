"""Fault injection through the ``fusejax`` command: SIGKILL at random points, full disk, concurrent writers.

Every stage run here is the real CLI in a subprocess (one CPU device). A kill is a real SIGKILL of that
process, sent either by the process itself at a seeded random store event of each kind (see ``DRIVER``: a
shard file or a manifest cut half way, a directory fsync before/after a rename) or from outside after a
random delay. After each kill the store must open with every checksum verified, hold only shards
byte-identical to the uninterrupted run's, and the restarted stage must finish with byte-identical files.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import fusejax.corpus
import fusejax.store
from fusejax import cli
from fusejax.store import open_store

from test_represent import TEXTS, _hf_tokenizer, _tiny_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS_ROWS_PER_SHARD = 8  # the prepare stage writes 4096 blocks per shard: too few shards for a tiny corpus

# Runs `fusejax <stage> CONFIG` for each stage named after CONFIG, in one process, with the corpus shard size
# lowered, and counts store events of three kinds: "shard" (a file written into a shard's temporary folder),
# "manifest" (a manifest written to its temporary name) and "fsync" (a directory fsync: after a shard's files,
# after its rename, after the manifest's rename). FUSEJAX_TEST_KILL_AT=KIND:N SIGKILLs the process at the N-th
# event of KIND; a file is cut half way first. The last stdout line holds the counts as JSON.
DRIVER = f"""
import json, os, signal, sys
import fusejax.corpus, fusejax.store as store
from fusejax.cli import main

fusejax.corpus.prepare_corpus.__kwdefaults__["rows_per_shard"] = {CORPUS_ROWS_PER_SHARD}
kill_kind, _, kill_at = os.environ.get("FUSEJAX_TEST_KILL_AT", ":0").partition(":")
events = {{"shard": 0, "manifest": 0, "fsync": 0}}

def event(kind):
    events[kind] += 1
    return kind == kill_kind and events[kind] == int(kill_at)

def write_file(path, data, real=store._write_file):
    if event("manifest" if "manifest" in path.name else "shard"):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

def fsync_dir(path, real=store._fsync_dir):
    if event("fsync"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)

store._write_file, store._fsync_dir = write_file, fsync_dir
config, *stages = sys.argv[1:]
for stage in stages:
    code = main([stage, config])
    if code:
        sys.exit(code)
print(json.dumps(events))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: cheaper to start
    return {**env, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1", **extra}


def _drive(config, *stages, kill_at=":0") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(config), *stages], capture_output=True, text=True,
                          cwd=ROOT, env=_env(FUSEJAX_TEST_KILL_AT=kill_at), timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _store_files(folder: Path) -> dict[str, bytes]:
    """Every file of a store folder except the stage's informational outputs (summary, resolved config)."""
    return {k: v for k, v in _files(folder).items() if "summary" not in k and "config.resolved" not in k}


def write_config(path: Path, root: Path, output_dir: Path) -> Path:
    """A config for the tiny pipeline of :func:`build_pipeline` writing to ``output_dir``."""
    cfg = {
        "run": {"output_dir": str(output_dir)},
        "corpus": {"inputs": [str(root / "docs")], "block_size": 48},
        "target": {"path": str(root / "model_llama"), "tokenizer": str(root / "tok_target")},
        "sources": [
            {"name": "llama", "path": str(root / "model_llama"), "tokenizer": str(root / "tok_llama")},
            {"name": "neox", "path": str(root / "model_neox"), "tokenizer": str(root / "tok_neox")},
        ],
        "represent": {"k": 4, "batch_size": 2, "shard_size": 4, "logits_dtype": "float32"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_pipeline(root: Path, texts=tuple(t[:1500] for t in TEXTS[:5])) -> Path:
    """``texts`` as .txt documents, a byte-level target tokenizer, and two sources of two architectures (Llama
    with a Metaspace tokenizer, GPT-NeoX byte-level) under ``root``; returns the config path (output:
    ``root/ref``)."""
    (root / "docs").mkdir()
    for i, text in enumerate(texts):
        (root / "docs" / f"{i:02d}.txt").write_text(text)
    _hf_tokenizer(root / "tok_target", "bytelevel", 400)
    for seed, (name, arch, kind, vocab) in enumerate([("llama", "llama", "metaspace", 350),
                                                      ("neox", "gpt_neox", "bytelevel", 420)]):
        tok = _hf_tokenizer(root / f"tok_{name}", kind, vocab)
        _tiny_model(root / f"model_{name}", arch, len(tok), seed)
    return write_config(root / "config.yaml", root, root / "ref")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(root, reference output folder, store event counts per stage) of one uninterrupted run."""
    root = tmp_path_factory.mktemp("reliability")
    config = build_pipeline(root)
    events = {}
    for stage in ("prepare", "represent"):
        proc = _drive(config, stage)
        assert proc.returncode == 0, proc.stderr
        events[stage] = json.loads(proc.stdout.splitlines()[-1])
    return root, root / "ref", events


def _check_complete_prefix(store_dir: Path, reference: dict[str, bytes]) -> int:
    """A killed store: every checksum verifies and each listed shard equals the reference's; returns its rows."""
    if not any(store_dir.glob("manifest*.json")):
        return 0
    store = open_store(store_dir, verify=True)
    for shard in store.shards:
        for name in shard.sha256:
            assert (shard.path / name).read_bytes() == reference[f"{shard.name}/{name}"], (shard.path, name)
    return len(store)


def _copy_outputs(ref: Path, out: Path, names) -> None:
    """Copy the reference run's outputs ``names`` (earlier stages) into the output folder ``out``."""
    out.mkdir()
    for name in names:
        for rel, data in _files(ref / name).items():
            (out / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / name / rel).write_bytes(data)


def _kill_and_resume(pipeline, stage, stores, seed, tmp_path, prepared=(), kinds=("shard", "fsync", "manifest")):
    """Run ``stage`` killed once at each of ``kinds`` of store events (at a seeded random count), checking the
    stores after each kill, then to the end; the final stores must equal the reference run's."""
    root, ref, events = pipeline
    out = tmp_path / "run"
    _copy_outputs(ref, out, prepared)
    config = write_config(tmp_path / "config.yaml", root, out)
    rng = np.random.default_rng(seed)
    for kind in kinds:  # each kill point lies in the first quarter of what is left
        proc = _drive(config, stage, kill_at=f"{kind}:{rng.integers(1, events[stage][kind] // 4 + 1)}")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert list(out.rglob("writer-p*.lock")), "the killed writer's lock should be left behind (stale)"
        for name in stores:
            if (out / name).is_dir():
                _check_complete_prefix(out / name, _store_files(ref / name))
    proc = _drive(config, stage)
    assert proc.returncode == 0, proc.stderr
    for name in stores:
        assert _store_files(out / name) == _store_files(ref / name), name
    assert not list(out.rglob("writer-p*.lock")) and not list(out.rglob(".tmp-*"))


def test_prepare_killed_at_random_points_resumes_byte_identical(pipeline, tmp_path):
    _kill_and_resume(pipeline, "prepare", ["corpus"], seed=0, tmp_path=tmp_path)


@pytest.mark.slow
def test_represent_killed_at_random_points_resumes_byte_identical(pipeline, tmp_path):
    _kill_and_resume(pipeline, "represent", ["represent/llama", "represent/neox"], seed=1, tmp_path=tmp_path,
                     prepared=["corpus"])


@pytest.mark.slow
def test_align_killed_at_a_random_point_resumes_byte_identical(pipeline, tmp_path):
    root, ref, events = pipeline
    if "align" not in events:
        proc = _drive(root / "config.yaml", "align")  # the reference run, in the fixture's output folder
        assert proc.returncode == 0, proc.stderr
        events["align"] = json.loads(proc.stdout.splitlines()[-1])
    kind = str(np.random.default_rng(3).choice(["shard", "fsync", "manifest"]))
    _kill_and_resume(pipeline, "align", ["aligned"], seed=3, tmp_path=tmp_path,
                     prepared=["corpus", "represent", "vocab_maps"], kinds=[kind])
    assert _files(tmp_path / "run" / "vocab_maps") == _files(ref / "vocab_maps")


@pytest.mark.slow
def test_represent_sigkill_from_outside_after_a_random_delay(pipeline, tmp_path):
    """A real external SIGKILL at a random moment once the first shard is on disk; then resume."""
    root, ref, _ = pipeline
    out = tmp_path / "run"
    _copy_outputs(ref, out, ["corpus"])
    config = write_config(tmp_path / "config.yaml", root, out)
    delay = np.random.default_rng(2).uniform(0.0, 1.5)
    proc = subprocess.Popen([sys.executable, "-m", "fusejax.cli", "represent", str(config)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "represent").glob("*/manifest-p0000.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard written within 300 s"
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before the kill"
    for name in ("llama", "neox"):
        if (out / "represent" / name).is_dir():
            _check_complete_prefix(out / "represent" / name, _store_files(ref / "represent" / name))
    resumed = _drive(config, "represent")  # the same device layout as the reference run (see docs/reliability.md)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("llama", "neox"):
        assert _store_files(out / "represent" / name) == _store_files(ref / "represent" / name)


@pytest.mark.parametrize("victim", ["shard file", "manifest"])
def test_full_disk_keeps_the_previous_state_and_reports_it(pipeline, tmp_path, monkeypatch, capsys, victim):
    """ENOSPC from the file writer in the middle of the second shard (or of its manifest update)."""
    root, ref, _ = pipeline
    monkeypatch.setitem(fusejax.corpus.prepare_corpus.__kwdefaults__, "rows_per_shard", CORPUS_ROWS_PER_SHARD)
    config = write_config(tmp_path / "config.yaml", root, tmp_path / "run")
    real = fusejax.store._write_file
    seen = []

    def full_disk(path, data):
        seen.append(path.parent.name if victim == "shard file" else path.name)
        target = ".tmp-shard-p0000-000001" if victim == "shard file" else ".tmp-manifest-p0000.json"
        if seen.count(target) == (3 if victim == "shard file" else 2):  # third file of shard 1 / second manifest
            with open(path, "wb") as f:
                f.write(data[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(fusejax.store, "_write_file", full_disk)
    assert cli.main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusejax: error: [Errno 28] No space left on device")
    assert str(tmp_path / "run" / "corpus") in err
    corpus = tmp_path / "run" / "corpus"
    rows = _check_complete_prefix(corpus, _store_files(ref / "corpus"))
    assert rows == CORPUS_ROWS_PER_SHARD  # the first shard stays readable, the second never appears
    assert not (corpus / "writer-p0000.lock").exists()  # the failed writer released its lock

    monkeypatch.setattr(fusejax.store, "_write_file", real)  # space freed: the rerun completes the store
    assert cli.main(["prepare", str(config)]) == 0
    assert _store_files(corpus) == _store_files(ref / "corpus")


HOLD_LOCK = """
import sys
from fusejax.corpus import FIELDS
from fusejax.store import StoreWriter
writer = StoreWriter(sys.argv[1], kind="corpus", meta={}, fields=FIELDS, rows_per_shard=8)
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_writer_refused_then_stale_lock_taken_over(pipeline, tmp_path, monkeypatch, capsys, caplog):
    """A live writer on the output folder makes `fusejax prepare` refuse; once it is SIGKILLed, it proceeds."""
    root, ref, _ = pipeline
    monkeypatch.setitem(fusejax.corpus.prepare_corpus.__kwdefaults__, "rows_per_shard", CORPUS_ROWS_PER_SHARD)
    corpus = tmp_path / "run" / "corpus"
    config = write_config(tmp_path / "config.yaml", root, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(corpus)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert cli.main(["prepare", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"writer-p0000.lock: held by pid {holder.pid} on host" in err
        assert time.strftime("since %Y-%m-%d") in err
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["prepare", str(config)]) == 0
    assert f"stale lock of dead pid {holder.pid}" in caplog.text
    assert _store_files(corpus) == _store_files(ref / "corpus")
