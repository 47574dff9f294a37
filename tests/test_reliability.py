"""Fault injection through the ``fusejax`` command: SIGKILL at random points, full disk, concurrent writers.

Every stage run here is the real CLI in a subprocess (one CPU device). A kill is a real SIGKILL of that
process, sent either by the process itself at a seeded random store event of each kind (see ``DRIVER``: a
shard file or a manifest cut half way, a directory fsync before/after a rename) or from outside after a
random delay. After each kill the store must open with every checksum verified, hold only shards
byte-identical to the uninterrupted run's, and the restarted stage must finish with byte-identical files.
Training is killed between steps and while Orbax finalizes a checkpoint; the restarted run must end with the
uninterrupted run's parameters and per-step losses. ``fusejax export`` and ``fusejax run`` are killed the same
way and rerun to identical outputs.
"""

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

import fusejax.corpus
import fusejax.files
from fusejax import cli
from fusejax.store import open_store

from processes import xla_flags  # tests/processes.py
from test_represent import TEXTS, _hf_tokenizer, _tiny_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS_ROWS_PER_SHARD = 8  # the prepare stage writes 4096 blocks per shard: too few shards for a tiny corpus

# Runs `fusejax <stage> CONFIG` for each stage named after CONFIG, in one process, with the corpus shard size
# lowered, and counts store events of three kinds: "shard" (a file written into a shard's temporary folder, or
# a JSON report's temporary file), "manifest" (a manifest written to its temporary name) and "fsync" (a
# directory fsync: after a shard's files, after its rename, after the manifest's rename). For the stages
# train, export and run it also counts "step" (before a train step's batch is read), "checkpoint" (before
# Orbax renames a finished temporary checkpoint folder into place) and "export" (a file of the exported
# model written to its temporary name). FUSEJAX_TEST_KILL_AT=KIND:N SIGKILLs the process at the N-th event of
# KIND; a file is cut half way first. The last stdout line holds the counts as JSON.
DRIVER = f"""
import io, json, os, signal, sys
import fusejax.corpus, fusejax.files as files
from fusejax.cli import main

fusejax.corpus.prepare_corpus.__kwdefaults__["rows_per_shard"] = {CORPUS_ROWS_PER_SHARD}
kill_kind, _, kill_at = os.environ.get("FUSEJAX_TEST_KILL_AT", ":0").partition(":")
events = {{"shard": 0, "manifest": 0, "fsync": 0, "step": 0, "checkpoint": 0, "export": 0, "array": 0}}

def event(kind):
    events[kind] += 1
    return kind == kill_kind and events[kind] == int(kill_at)

def write_file(path, data, real=files.write_file):
    if event("manifest" if "manifest" in path.name else "shard"):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

def fsync_dir(path, real=files.fsync_dir):
    if event("fsync"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)

files.write_file, files.fsync_dir = write_file, fsync_dir
config, *stages = sys.argv[1:]
if {{"train", "export", "run"}} & set(stages):  # these import JAX and Orbax: not for the host-only stages
    import fusejax.models.hf_io as hf_io, fusejax.train as train
    from orbax.checkpoint._src.path.atomicity import AtomicRenameTemporaryPath

    def host_batch(self, position, real=train.Trainer._host_batch):
        if event("step"):  # FUSEJAX_TEST_SIGNAL=TERM: a SIGTERM instead (training saves, then stops)
            os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get("FUSEJAX_TEST_SIGNAL", "KILL")])
        return real(self, position)

    async def finalize(self, real=AtomicRenameTemporaryPath.finalize):
        if event("checkpoint"):
            os.kill(os.getpid(), signal.SIGKILL)
        await real(self)

    def atomic_write(path, write, real=hf_io.atomic_write):
        if event("export"):
            def write(f, whole=write):
                data = io.BytesIO()
                whole(data)
                f.write(data.getvalue()[: len(data.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, write)

    train.Trainer._host_batch, hf_io.atomic_write, AtomicRenameTemporaryPath.finalize = host_batch, atomic_write, finalize
    import orbax.checkpoint._src.serialization.serialization as serialization

    async def serialize(*args, real=serialization.async_serialize_from_host, **kwargs):
        if event("array") and os.environ.get("FUSEJAX_TEST_SIGNAL") == "ENOSPC":  # a full disk, as TensorStore says
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "/x/": '
                             "Failed to write 752307 bytes to file 4: No space left on device [os_error_code='28']")
        return await real(*args, **kwargs)

    serialization.async_serialize_from_host = serialize
for stage in stages:
    code = main([stage, config])
    if code:
        sys.exit(code)
print(json.dumps(events))
"""


def _env(**extra) -> dict:
    # one CPU device: cheaper to start
    return {**os.environ, "XLA_FLAGS": xla_flags(None), "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1", **extra}


def _drive(config, *stages, kill_at=":0", sig="KILL", cache: Path | None = None) -> subprocess.CompletedProcess:
    """Run DRIVER on ``config`` and ``stages``; ``cache``: a JAX compilation cache folder shared by the runs."""
    extra = {} if cache is None else {"JAX_COMPILATION_CACHE_DIR": str(cache),
                                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.run([sys.executable, "-c", DRIVER, str(config), *stages], capture_output=True, text=True,
                          cwd=ROOT, env=_env(FUSEJAX_TEST_KILL_AT=kill_at, FUSEJAX_TEST_SIGNAL=sig, **extra),
                          timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _store_files(folder: Path) -> dict[str, bytes]:
    """Every file of a stage folder except its informational outputs (summary, resolved config, stage.json)."""
    return {k: v for k, v in _files(folder).items()
            if "summary" not in k and "config.resolved" not in k and "stage.json" not in k}


def write_config(path: Path, root: Path, output_dir: Path, *, training: bool = False) -> Path:
    """A config for the tiny pipeline of :func:`build_pipeline` writing to ``output_dir``. ``training``: the
    whole pipeline (the target is the Llama source with its own tokenizer; 6 train steps, 2 held-out
    documents); otherwise only the stages up to ``align`` are meaningful (byte-level target tokenizer)."""
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
    if training:
        cfg["target"]["tokenizer"] = str(root / "tok_llama")
        cfg["corpus"]["holdout_fraction"] = 0.4
        cfg["train"] = {"steps": 6, "batch_size": 2, "seq_len": 64, "lr": 1e-3, "log_every": 1,
                        "checkpoint_every": 2, "eval_every": 0, "keep_checkpoints": 2}
        cfg["eval"] = {"batch_size": 2}
        cfg["export"] = {"dtype": "float32"}
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
    real = fusejax.files.write_file
    seen = []

    def full_disk(path, data):
        seen.append(path.parent.name if victim == "shard file" else path.name.rsplit(".", 1)[0])
        target = ".tmp-shard-p0000-000001" if victim == "shard file" else ".tmp-manifest-p0000.json"
        if seen.count(target) == (3 if victim == "shard file" else 2):  # third file of shard 1 / second manifest
            with open(path, "wb") as f:
                f.write(data[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(fusejax.files, "write_file", full_disk)
    assert cli.main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusejax: error: [Errno 28] No space left on device")
    assert str(tmp_path / "run" / "corpus") in err
    corpus = tmp_path / "run" / "corpus"
    rows = _check_complete_prefix(corpus, _store_files(ref / "corpus"))
    assert rows == CORPUS_ROWS_PER_SHARD  # the first shard stays readable, the second never appears
    assert not (corpus / "writer-p0000.lock").exists()  # the failed writer released its lock

    monkeypatch.setattr(fusejax.files, "write_file", real)  # space freed: the rerun completes the store
    assert cli.main(["prepare", str(config)]) == 0
    assert _store_files(corpus) == _store_files(ref / "corpus")


HOLD_LOCK = """
import sys
from fusejax.schema import CORPUS_FIELDS
from fusejax.store import StoreWriter
writer = StoreWriter(sys.argv[1], kind="corpus", meta={}, fields=CORPUS_FIELDS, rows_per_shard=8)
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


# ------------------------------------------------------------------------------- train, export, fusejax run

TRAIN_TAGS = ("loss", "clm_loss", "fusion_loss", "lr", "grad_norm")  # per-step values (not timings)


@pytest.fixture(scope="module")
def trained(pipeline):
    """(root, reference output folder, event counts) of one uninterrupted `fusejax run` of the whole tiny
    pipeline (:func:`write_config` with ``training=True``)."""
    root = pipeline[0]
    config = write_config(root / "train.yaml", root, root / "ref_run", training=True)
    proc = _drive(config, "run", cache=root / "jax-cache")  # the tests below reuse its compiled programs
    assert proc.returncode == 0, proc.stderr
    events = json.loads(proc.stdout.splitlines()[-1])
    assert events["step"] == 6 and events["export"] == 2, events
    assert events["checkpoint"] > 0 and events["checkpoint"] % 3 == 0, events  # 3 checkpoints: steps 2, 4, 6
    return root, root / "ref_run", events


def _tb_files(folder: Path) -> list[dict[tuple[str, int], float]]:
    """``{(tag, step): value}`` of each TensorBoard event file in ``folder``, oldest file first; a record cut
    short by a kill ends its file."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.iterdir()):  # events.out.tfevents.<unix time>.<host>: sorted by creation
        data, pos, values = path.read_bytes(), 0, {}
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 16 + length > len(data):
                break
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            values.update({(v.tag, event.step): v.simple_value for v in event.summary.value if v.tag in TRAIN_TAGS})
        out.append(values)
    return out


def _checkpoints(folder: Path) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, names of any other entries such as Orbax's temporary folders)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


def _check_training(out: Path, ref: Path, resumed_from: list[int] | None = None) -> None:
    """The training in ``out`` ended with ``ref``'s parameters, checkpoints and summary, and every per-step
    value logged by any of its processes (a step redone after a kill is logged again) equals ``ref``'s.
    ``resumed_from``: the step each restarted process must have resumed from (its first logged step - 1)."""
    from fusejax.checkpoint import load_trained

    (reference,) = _tb_files(ref / "train" / "tb")
    assert {step for _, step in reference} == set(range(1, 7))
    logs = _tb_files(out / "train" / "tb")
    for logged in logs:
        for key, value in logged.items():
            assert value == reference[key], key
    assert set().union(*logs) == set(reference)
    if resumed_from is not None:
        assert len(logs) == len(resumed_from) + 1
        for logged, step in zip(logs[1:], resumed_from):
            if logged:  # empty when that process was killed before its first step
                assert min(s for _, s in logged) == step + 1
    assert _checkpoints(out / "train" / "checkpoints")[0] == _checkpoints(ref / "train" / "checkpoints")[0]
    assert json.loads((out / "train" / "summary.json").read_text()) == \
        json.loads((ref / "train" / "summary.json").read_text())
    ours, theirs = load_trained(out / "train")[0], load_trained(ref / "train")[0]
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(theirs))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


@pytest.mark.slow
def test_train_stopped_by_sigterm_and_killed_twice_resumes_to_the_same_run(trained, tmp_path):
    """`fusejax train` three times cut short, then run to the end: a real SIGTERM before a random step N (step
    N finishes, a checkpoint of step N is saved, exit 143), a SIGKILL before a random later step, and a SIGKILL
    while Orbax finalizes a random checkpoint (the unfinished checkpoint folder is left behind, never
    restored from, and removed by the next run). The final run equals the uninterrupted one."""
    root, ref, events = trained
    out = tmp_path / "run"
    _copy_outputs(ref, out, ["corpus", "represent", "vocab_maps", "aligned"])
    config = write_config(tmp_path / "config.yaml", root, out, training=True)
    checkpoints = out / "train" / "checkpoints"
    rng = np.random.default_rng(4)
    n = int(rng.integers(1, 3))
    proc = _drive(config, "train", kill_at=f"step:{n}", sig="TERM", cache=root / "jax-cache")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr  # not finished: a scheduler must not say done
    assert f"fusejax: interrupted by SIGTERM: saved a checkpoint at step {n}" in proc.stderr
    assert _checkpoints(checkpoints) == ([n], [])
    assert json.loads((out / "train" / "stage.json").read_text())["status"] == "running"  # `run` resumes it
    resumed_from = [n]
    # each kill point lies early in what is left: every later process still reaches at least one checkpoint
    for kind, last in (("step", 3), ("checkpoint", events["checkpoint"] // 3)):
        proc = _drive(config, "train", kill_at=f"{kind}:{rng.integers(1, last + 1)}", cache=root / "jax-cache")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        complete, other = _checkpoints(checkpoints)
        if kind == "checkpoint":
            assert any("tmp" in name for name in other), f"no unfinished checkpoint folder left: {other}"
        resumed_from.append(max(complete))
    proc = _drive(config, "train", cache=root / "jax-cache")
    assert proc.returncode == 0, proc.stderr
    assert _checkpoints(checkpoints)[1] == [], "the restart must remove the killed save's unfinished folder"
    _check_training(out, ref, resumed_from)


@pytest.mark.slow
def test_train_on_a_full_disk_reports_one_line_and_resumes_to_the_same_run(trained, tmp_path):
    """Orbax's array writer (TensorStore) fails with RESOURCE_EXHAUSTED / ENOSPC while saving the second
    checkpoint: exit 2 with the error as the one line of stderr after the progress notes (no traceback of
    Orbax's background threads); after space is freed the rerun resumes to the uninterrupted run."""
    root, ref, events = trained
    out = tmp_path / "run"
    _copy_outputs(ref, out, ["corpus", "represent", "vocab_maps", "aligned"])
    config = write_config(tmp_path / "config.yaml", root, out, training=True)
    proc = _drive(config, "train", kill_at=f"array:{events['array'] // 3 + 1}", sig="ENOSPC",
                  cache=root / "jax-cache")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.splitlines()[-1]
    assert line.startswith("fusejax: error: RESOURCE_EXHAUSTED: Error writing") and line.endswith(
        "No space left on device [os_error_code='28']") and proc.stderr.count("fusejax: error") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    assert _checkpoints(out / "train" / "checkpoints")[0] == [2]
    proc = _drive(config, "train", cache=root / "jax-cache")
    assert proc.returncode == 0, proc.stderr
    assert _checkpoints(out / "train" / "checkpoints")[1] == []
    _check_training(out, ref, [2])


@pytest.mark.slow
def test_export_killed_while_writing_reruns_to_identical_files(trained, tmp_path):
    root, ref, events = trained
    out = tmp_path / "run"
    _copy_outputs(ref, out, ["train"])
    config = write_config(tmp_path / "config.yaml", root, out, training=True)
    n = int(np.random.default_rng(6).integers(1, events["export"] + 1))
    proc = _drive(config, "export", kill_at=f"export:{n}", cache=root / "jax-cache")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = _drive(config, "export", cache=root / "jax-cache")
    assert proc.returncode == 0, proc.stderr
    assert _store_files(out / "export") == _store_files(ref / "export")
    # no leftover temporary file either; the command's own record says it completed
    assert set(_files(out / "export")) == {*_store_files(ref / "export"), "stage.json"}
    assert json.loads((out / "export" / "stage.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_fusejax_run_killed_at_a_random_point_reruns_to_the_same_outputs(trained, tmp_path):
    """`fusejax run` SIGKILLed at a random event of a random kind (any stage), then run again."""
    root, ref, events = trained
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", root, out, training=True)
    rng = np.random.default_rng(7)
    kind = str(rng.choice(sorted(k for k, count in events.items() if count)))
    proc = _drive(config, "run", kill_at=f"{kind}:{rng.integers(1, events[kind] + 1)}", cache=root / "jax-cache")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    records = [json.loads(p.read_text()) for p in out.rglob("stage.json")]
    killed_in = [r["stage"] for r in records if r["status"] == "running"]
    assert len(killed_in) == 1, records
    proc = _drive(config, "run", cache=root / "jax-cache")
    assert proc.returncode == 0, proc.stderr
    assert f"[fusejax run] {killed_in[0]}: resumed" in proc.stdout
    for record in records:
        if record["status"] == "complete":
            assert f"[fusejax run] {record['stage']}: complete, skipped" in proc.stdout
    for name in ("corpus", "represent/llama", "represent/neox", "vocab_maps", "aligned", "export"):
        assert _store_files(out / name) == _store_files(ref / name), name
    assert json.loads((out / "eval" / "results.json").read_text()) == \
        json.loads((ref / "eval" / "results.json").read_text())
    _check_training(out, ref)
