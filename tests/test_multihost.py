"""Fused training on two real JAX processes (4 fake CPU devices each, gloo collectives) over one 8-device mesh:
each process reads only its own rows, the checkpoint is saved collectively and restored by a fresh pair of
processes, and every step's loss equals a single-process run on 8 devices with the same global batch."""

import json

import jax
import numpy as np
import pytest

from fusejax.config import TrainConfig
from fusejax.models import ModelConfig
from fusejax.sharding import make_mesh
from fusejax.data import stream_rows
from fusejax.testing import SyntheticTables
from fusejax.train import Trainer, build_target
from processes import run_processes  # tests/processes.py

MODEL = dict(arch="llama", vocab_size=200, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2)
TRAIN = dict(steps=4, batch_size=16, grad_accum=2, seq_len=16, lr=1e-2, lm_weight=0.7, log_every=1,
             eval_every=0, checkpoint_every=0)
DATA = dict(num_rows=40, seq_len=16, vocab_size=200, num_sources=3, k=4, seed=1)
MESH = dict(data=2, fsdp=4)
SEED = 5

# Trains `stop_after` steps (resuming from <out>/checkpoints when it holds one), saves, prints its losses and
# the rows it read. Settings are passed as JSON so that both sides of the test use the very same values.
SCRIPT = """
import json
from fusejax import distributed
assert distributed.initialize() is True
import jax
from fusejax.config import TrainConfig
from fusejax.models import ModelConfig
from fusejax.sharding import make_mesh
from fusejax.testing import SyntheticTables
from fusejax.train import Trainer, build_target

s = json.loads({settings!r})

class Recording(SyntheticTables):
    read = []
    def rows(self, indices):
        self.read.append([int(i) for i in indices])
        return super().rows(indices)

tc = TrainConfig(**s["train"])
mesh = make_mesh(**s["mesh"])
data = Recording(**s["data"])
model = build_target(tc, mesh, config=ModelConfig(**s["model"]), seed=0)
trainer = Trainer(model, data, tc, s["out"], mesh=mesh, seed=s["seed"])
start = trainer.step
Recording.read.clear()  # the rows read to size the batch are not a step's rows
history = trainer.fit(stop_after=s["stop_after"])
trainer.close()
print("RESULT", json.dumps(dict(process=jax.process_index(), devices=jax.device_count(), start=start,
                                losses=[h["loss"] for h in history], rows=Recording.read)))
"""


def two_processes(out, stop_after, cache):
    """One fit of ``stop_after`` steps on two processes sharing the compilation cache folder ``cache``;
    returns each process's RESULT record."""
    settings = json.dumps(dict(train=TRAIN, mesh=MESH, data=DATA, model=MODEL, seed=SEED, out=str(out),
                               stop_after=stop_after))
    cache_env = dict(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    outputs = run_processes(SCRIPT.format(settings=settings), num_processes=2, devices_per_process=4, timeout=240,
                            extra_env=cache_env)
    results = []
    for out_text in outputs:
        lines = [line for line in out_text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out_text
        results.append(json.loads(lines[0][len("RESULT "):]))
    return results


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_equal_one_process(tmp_path):
    # the reference: one process with all 8 devices, the same mesh and global batches, uninterrupted
    tc = TrainConfig(**TRAIN)
    mesh = make_mesh(**MESH)
    assert jax.process_count() == 1 and mesh.devices.size == 8
    model = build_target(tc, mesh, config=ModelConfig(**MODEL), seed=0)
    trainer = Trainer(model, SyntheticTables(**DATA), tc, tmp_path / "single", mesh=mesh, seed=SEED)
    expected = [h["loss"] for h in trainer.fit()]
    trainer.close()
    assert len(expected) == 4 and len(set(expected)) == 4

    first = two_processes(tmp_path / "multi", 2, tmp_path / "cache")
    second = two_processes(tmp_path / "multi", 2, tmp_path / "cache")  # a fresh pair resumes from the checkpoint

    micro = TRAIN["batch_size"] // TRAIN["grad_accum"]
    for run, start in ((first, 0), (second, 2)):
        assert [r["process"] for r in run] == [0, 1]
        for r in run:
            assert r["devices"] == 8 and r["start"] == start
            np.testing.assert_allclose(r["losses"], expected[start:start + 2], rtol=1e-6, atol=0)
            # process i's devices hold rows [4i, 4i+4) of each micro-batch (mesh devices are ordered by
            # process, batch split over data x fsdp): it reads exactly those stream positions, nothing else
            rows = []
            for step in range(start, start + 2):
                stream = stream_rows(SEED, step * TRAIN["batch_size"], TRAIN["batch_size"], DATA["num_rows"])
                half = micro // 2
                lo = r["process"] * half
                rows.append([int(i) for mb in stream.reshape(TRAIN["grad_accum"], micro) for i in mb[lo:lo + half]])
            assert r["rows"] == rows
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
