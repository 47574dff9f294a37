"""Trainer tests on 8 fake CPU devices with a tiny Llama: optimizer and step against a reference written here
(jax.grad of the loss + numpy AdamW), deterministic data order, checkpoint resume / SIGTERM / other mesh,
TensorBoard events, CLM-only and single-teacher baselines."""

import dataclasses
import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from fusejax.checkpoint import CheckpointMismatchError
from fusejax.config import TrainConfig
from fusejax.data import stream_rows
from fusejax.export import export
from fusejax.fusion import fusion_loss
from fusejax.models import ModelConfig, Transformer
from fusejax.sharding import make_mesh
from fusejax.schema import STEP_AXES
from fusejax.step import StepOptions, make_optimizer, make_train_step
from fusejax.store import StoreLockedError
from fusejax.testing import SyntheticTables
from fusejax.train import Interrupted, NonFiniteError, Trainer, build_target
from tiny import read_events

MODEL = ModelConfig(arch="llama", vocab_size=200, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2)
T = 16
SEED = 3
# clip_norm below the typical gradient norm (~0.8) so that clipping is exercised; large weight decay to see it
TC = TrainConfig(steps=4, batch_size=8, seq_len=T, lr=1e-2, b1=0.8, b2=0.9, weight_decay=0.5, clip_norm=0.3,
                 lm_weight=0.7, log_every=2, checkpoint_every=1, keep_checkpoints=2, peak_flops=1e9, eval_every=2,
                 loss_chunk=T // 2)  # two chunks: the reference below takes the dense logits


def fresh_params(seed=0, config=MODEL):
    """A new tiny model and a numpy copy of its parameters (the trainer may donate the model's arrays)."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    return model, jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


def initial_model(params0, config=MODEL):
    """A model holding the numpy parameters ``params0`` of :func:`fresh_params`."""
    model = Transformer(config, rngs=nnx.Rngs(0))
    nnx.update(model, params0)
    return model


def log_probs(model, rows):
    """float64 log-softmax of ``model``'s logits over the real vocabulary on ``rows``, in numpy."""
    logits = np.asarray(model(rows["input_ids"], rows["attention_mask"]), np.float64)[..., :MODEL.vocab_size]
    logp = logits - logits.max(-1, keepdims=True)
    return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def label_ce(logp, rows):
    """Cross-entropy of the label at each scored position (``loss_mask`` 1), flattened in order."""
    scored = rows["loss_mask"] == 1
    return -np.take_along_axis(logp, np.where(scored, rows["labels"], 0)[..., None], -1)[..., 0][scored]


def as_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def reference_run(params, data, tc, steps, *, seed=SEED, grad_accum=1):
    """Per-step (loss, unclipped grad norm) and final params of plain-numpy AdamW with global-norm clipping and
    a cosine learning rate (no warmup), on gradients of ``fusion_loss(model logits)`` averaged over micro-batches."""
    graphdef = nnx.graphdef(Transformer(MODEL, rngs=nnx.Rngs(0)))

    def loss(p, mb):
        logits = nnx.merge(graphdef, p)(mb["input_ids"], mb["attention_mask"])
        return fusion_loss(logits, mb["labels"], mb["loss_mask"], mb["table_ids"], mb["table_logits"],
                           mb["source_ce"], lm_weight=tc.lm_weight)[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    p = jax.tree.map(np.float64, params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    losses, norms = [], []
    micro = tc.batch_size // grad_accum
    for s in range(steps):
        rows = data.rows(stream_rows(seed, s * tc.batch_size, tc.batch_size, data.num_rows))
        outs = [value_and_grad(jax.tree.map(np.float32, p), {k: x[i * micro:(i + 1) * micro] for k, x in rows.items()})
                for i in range(grad_accum)]
        losses.append(np.mean([float(o[0]) for o in outs]))
        g = jax.tree.map(lambda *gs: np.mean([np.float64(x) for x in gs], axis=0), *[o[1] for o in outs])
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in jax.tree.leaves(g)))
        norms.append(norm)
        g = jax.tree.map(lambda x: x * min(1.0, tc.clip_norm / norm), g)
        lr = tc.lr * 0.5 * (1 + math.cos(math.pi * s / tc.steps))
        t = s + 1
        m = jax.tree.map(lambda m_, g_: tc.b1 * m_ + (1 - tc.b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: tc.b2 * v_ + (1 - tc.b2) * g_ * g_, v, g)
        adam = jax.tree.map(lambda m_, v_: (m_ / (1 - tc.b1**t)) / (np.sqrt(v_ / (1 - tc.b2**t)) + 1e-8), m, v)
        p = jax.tree.map(lambda p_, u: p_ - lr * (u + tc.weight_decay * p_), p, adam)
    return losses, norms, p


def assert_params_close(actual, expected, atol, *, outlier_atol=None):
    """Equal within ``atol``; with ``outlier_atol``, up to 0.1% of entries (parameters whose gradient is
    mostly cancellation noise, where Adam's m/sqrt(v) amplifies float32 rounding) may differ up to it."""
    flat_a = jax.tree_util.tree_leaves_with_path(as_numpy(actual))
    flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert [k for k, _ in flat_a] == list(flat_e)
    for k, a in flat_a:
        err = np.abs(a - flat_e[k])
        name = jax.tree_util.keystr(k)
        if outlier_atol is None:
            np.testing.assert_allclose(a, flat_e[k], atol=atol, rtol=0, err_msg=name)
        else:
            assert err.max() <= outlier_atol and np.mean(err > atol) <= 1e-3, (name, err.max(), np.mean(err > atol))


# ------------------------------------------------------------------------------------------------ data


def test_stream_rows_is_a_deterministic_sequence_of_epoch_permutations():
    n = 10
    stream = stream_rows(7, 0, 3 * n, n)
    for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    # reading in other chunk sizes (another batch size after a resume) gives the same stream
    chunks = np.concatenate([stream_rows(7, 0, 4, n), stream_rows(7, 4, 9, n), stream_rows(7, 13, 17, n)])
    np.testing.assert_array_equal(chunks, stream)
    assert not np.array_equal(stream_rows(8, 0, n, n), stream[:n])
    with pytest.raises(ValueError, match="0 rows"):
        stream_rows(0, 0, 4, 0)


def test_synthetic_tables_rows():
    data = SyntheticTables(20, T, 200, num_sources=3, k=10, seed=1, empty_fraction=0.2)
    rows = data.rows(np.array([5, 2, 5]))
    assert rows["input_ids"].shape == (3, T) and rows["table_ids"].shape == (3, T, 3, 10)
    assert rows["source_ce"].shape == (3, 3)
    for name in rows:
        np.testing.assert_array_equal(rows[name][0], rows[name][2])
    assert not np.array_equal(rows["input_ids"][0], rows["input_ids"][1])
    np.testing.assert_array_equal(SyntheticTables(20, T, 200, seed=1).row(2)["input_ids"], rows["input_ids"][1])
    ids, real = rows["table_ids"], rows["loss_mask"].astype(bool)
    # next-token labels: the input shifted by one within the real part
    np.testing.assert_array_equal(rows["labels"][:, :-1][real[:, 1:]], rows["input_ids"][:, 1:][real[:, 1:]])
    assert (rows["labels"][~real] == -100).all() and (ids[~real] == -1).all()
    full = ids[real].reshape(-1, 10)
    full = full[(full >= 0).any(-1)]
    assert all(len(set(r)) == 10 for r in full) and full.max() < 200
    assert 0.5 < np.mean((ids[real] == rows["labels"][real][:, None, None]).any(-1)) < 0.95
    assert np.all(np.diff(rows["table_logits"], axis=-1) <= 0)


def test_learning_rate_schedule_warmup_then_cosine():
    _, schedule = make_optimizer(TrainConfig(lr=2e-3, warmup_ratio=0.25), total_steps=8)
    expected = [2e-3 * s / 2 for s in range(2)]
    expected += [2e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(2, 9)]
    np.testing.assert_allclose([float(schedule(s)) for s in range(9)], expected, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------- one run shared by several tests


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 uninterrupted steps on an fsdp=8 mesh: (trainer, history, initial numpy params, data, out_dir)."""
    out = tmp_path_factory.mktemp("straight")
    model, params0 = fresh_params()
    data = SyntheticTables(40, T, MODEL.vocab_size, seed=11)
    eval_data = SyntheticTables(12, T, MODEL.vocab_size, seed=12)
    trainer = Trainer(model, data, TC, out, mesh=make_mesh(fsdp=8), seed=SEED, source_names=["a", "b", "c"],
                      eval_data=eval_data)
    history = trainer.fit()
    trainer.close()
    return trainer, history, params0, data, out


def test_steps_match_numpy_adamw_reference(straight):
    trainer, history, params0, data, _ = straight
    losses, norms, params = reference_run(params0, data, TC, steps=4)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=2e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in history], norms, rtol=2e-4)
    assert min(norms) > TC.clip_norm  # clipping was active
    cosine = [TC.lr * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    np.testing.assert_allclose([h["lr"] for h in history], cosine, rtol=1e-6)
    assert_params_close(trainer.state["params"], params, atol=2e-5, outlier_atol=0.02 * TC.lr)
    assert trainer.memory["peak_bytes"] > 0 and trainer.memory["argument_bytes"] > 0


def test_checkpoints_keep_the_last_n_and_store_data_position(straight):
    trainer, *_, out = straight
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
    assert trainer.step == 4 and trainer.data_position == 4 * TC.batch_size


def test_tensorboard_events_hold_the_logged_metrics(straight):
    trainer, history, *_, out = straight
    events = read_events(out / "tb")
    for tag in ("loss", "clm_loss", "fusion_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "source_frac/a", "source_frac/b", "source_frac/c"):
        assert [s for s, _ in events[tag]] == [2, 4], tag
    # logged values are the means over the log interval
    np.testing.assert_allclose([v for _, v in events["loss"]],
                               [np.mean([h["loss"] for h in history[i:i + 2]]) for i in (0, 2)], rtol=1e-6)
    fracs = sum(np.array([v for _, v in events[f"source_frac/{n}"]]) for n in "abc")
    np.testing.assert_allclose(fracs + np.array([v for _, v in events["no_source"]]), 1.0, rtol=1e-5)
    # held-out evaluation every 2 steps over all 12 rows: CLM loss and bits per byte of the model alone
    assert [s for s, _ in events["eval/loss"]] == [2, 4] == [s for s, _ in events["eval/bits_per_byte"]]
    rows = SyntheticTables(12, T, MODEL.vocab_size, seed=12).rows(np.arange(12))
    ce = label_ce(log_probs(trainer.model(), rows), rows)
    np.testing.assert_allclose(events["eval/loss"][-1][1], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(events["eval/bits_per_byte"][-1][1], ce.sum() / np.log(2) / rows["n_bytes"].sum(),
                               rtol=1e-5)
    flops = 6 * (trainer.num_params - MODEL.padded_vocab_size * 32) + 12 * 2 * T * 32
    for (_, mfu), (_, tps) in zip(events["mfu"], events["tokens_per_s"]):
        np.testing.assert_allclose(mfu, tps * flops / (TC.peak_flops * 8), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_then_resume_gives_the_uninterrupted_run(straight, tmp_path, signum):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) stop after the step and a checkpoint, then raise Interrupted
    with the signal (never swallowed: the run is not finished). A new trainer resumes to the uninterrupted run."""
    _, history, params0, data, _ = straight

    def stop(summary):
        if summary["step"] == 2:
            os.kill(os.getpid(), signum)

    mesh = make_mesh(fsdp=8)
    tc = dataclasses.replace(TC, log_every=1, checkpoint_every=100)
    first = Trainer(initial_model(params0), data, tc, tmp_path, mesh=mesh, seed=SEED)
    launched = signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
    try:  # as in a terminal (a CI job may start with SIGINT ignored, and the trainer then leaves it ignored)
        with pytest.raises(Interrupted, match=f"interrupted by {signum.name}: saved a checkpoint at step 2") as e:
            first.fit(log_fn=stop)
        assert e.value.signum == signum
        part1 = history[:2]
        assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # restored after fit
    finally:
        signal.signal(signum, launched)
    first.close()
    assert [h["step"] for h in part1] == [1, 2]
    # a new trainer (whose fresh model differs) resumes from the latest checkpoint
    second = Trainer(Transformer(MODEL, rngs=nnx.Rngs(99)), data, tc, tmp_path, mesh=mesh, seed=SEED)
    assert second.step == 2 and second.data_position == 2 * TC.batch_size
    part2 = second.fit()
    second.close()
    assert [h["loss"] for h in part1 + part2] == [h["loss"] for h in history]
    assert_params_close(second.state["params"], as_numpy(straight[0].state["params"]), atol=0)


def test_a_finished_run_keeps_its_final_metrics(straight, tmp_path):
    """Reopening a finished run (or one killed after its last checkpoint) gives back the last logged metrics."""
    trainer, history, _, data, out = straight
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    again = Trainer(Transformer(MODEL, rngs=nnx.Rngs(5)), data, TC, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    assert again.fit() == []  # nothing left to train
    again.close()
    assert again.last_metrics["step"] == history[-1]["step"] == TC.steps
    assert again.last_metrics["loss"] == history[-1]["loss"] and again.last_metrics["skipped_steps"] == 0


def test_fewer_steps_than_the_latest_checkpoint_are_refused(straight, tmp_path):
    """train.steps below the step a run already reached is a mistake, not a finished run."""
    _, _, _, data, out = straight
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    tc = dataclasses.replace(TC, steps=TC.steps - 1)
    again = Trainer(Transformer(MODEL, rngs=nnx.Rngs(5)), data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    with pytest.raises(ValueError, match=rf"train.steps={TC.steps - 1} .*is already at step {TC.steps}; raise "):
        again.fit()
    again.close()


@pytest.mark.parametrize("damage", ["truncated", "no meta"])
def test_a_damaged_checkpoint_is_named_with_the_way_out(straight, tmp_path, damage):
    """A latest checkpoint whose files cannot be read: one error naming the step folder (training and
    load_trained alike), not Orbax's traceback."""
    from fusejax.checkpoint import CheckpointDamagedError, load_trained

    _, _, _, data, out = straight
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / str(TC.steps)
    if damage == "truncated":
        biggest = max((p for p in (last / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        os.truncate(biggest, 100)
    else:
        shutil.rmtree(last / "meta")
    match = rf"checkpoint {last} cannot be read \(.*\); if its files were damaged .*, move that step folder aside"
    with pytest.raises(CheckpointDamagedError, match=match):
        Trainer(Transformer(MODEL, rngs=nnx.Rngs(5)), data, TC, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    with pytest.raises(CheckpointDamagedError, match=match):
        load_trained(tmp_path)


def _with_inf_weight(params0):
    params = jax.tree.map(np.copy, params0)
    params["layers"]["wq"][0, 0, 0, 0] = np.inf
    return initial_model(params)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    _, params0 = fresh_params(4)
    data = SyntheticTables(16, T, MODEL.vocab_size, seed=2)
    tc = dataclasses.replace(TC, steps=3, checkpoint_every=1, log_every=2)
    trainer = Trainer(_with_inf_weight(params0), data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    with pytest.raises(NonFiniteError, match="step 1: the loss or the gradient norm is not finite.*checkpoint "
                                             r"\(none\).*train.nonfinite=skip"):
        trainer.fit()
    trainer.close()
    assert trainer.ckpt.latest_step() is None  # nothing was saved after the bad step


def test_non_finite_steps_are_skipped_counted_and_never_exported(tmp_path):
    _, params0 = fresh_params(4)
    data = SyntheticTables(16, T, MODEL.vocab_size, seed=2)
    tc = dataclasses.replace(TC, steps=2, checkpoint_every=1, log_every=1, nonfinite="skip")
    trainer = Trainer(_with_inf_weight(params0), data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    history = trainer.fit()
    trainer.close()
    assert [h["skipped"] for h in history] == [1.0, 1.0] and trainer.skipped_steps == 2
    params = as_numpy(trainer.state["params"])  # the updates were never applied: the weights are the initial ones
    np.testing.assert_array_equal(params["layers"]["w_up"], params0["layers"]["w_up"])
    assert np.isinf(params["layers"]["wq"]).sum() == 1
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) weights in \['layers.wq'\]"):
        export(tmp_path, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_skipped_step_returns_params_and_adamw_state_bit_identical():
    model, params0 = fresh_params(4)
    tx, _ = make_optimizer(TC, TC.steps)
    step = jax.jit(make_train_step(nnx.graphdef(model), tx, StepOptions.from_config(TC, TC.steps)))
    rows = SyntheticTables(TC.batch_size, T, MODEL.vocab_size, seed=2).rows(np.arange(TC.batch_size))
    batch = {k: v[None] for k, v in rows.items() if k in STEP_AXES}
    state, metrics = step({"params": params0, "opt_state": tx.init(params0), "step": np.int32(0)}, batch)
    assert metrics["skipped"] == 0  # a real step first: moments and counts away from their initial values
    state = jax.tree.map(np.array, state)  # writable copies
    state["params"]["layers"]["wq"][0, 0, 0, 0] = np.inf
    out, metrics = step(state, batch)
    assert metrics["skipped"] == 1 and out["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, as_numpy(out["params"]), state["params"])
    jax.tree.map(np.testing.assert_array_equal, as_numpy(out["opt_state"]), state["opt_state"])


def test_checkpoint_restores_onto_another_mesh(straight, tmp_path):
    trainer, *_, out = straight
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    other = Trainer(Transformer(MODEL, rngs=nnx.Rngs(5)), SyntheticTables(40, T, MODEL.vocab_size, seed=11), TC,
                    tmp_path, mesh=mesh, seed=SEED)
    assert other.step == 4
    assert other.state["params"]["layers"]["wq"].sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert_params_close(other.state["params"], as_numpy(trainer.state["params"]), atol=0)
    assert_params_close(other.state["opt_state"], as_numpy(trainer.state["opt_state"]), atol=0)
    # AdamW moments are sharded like their parameters (ZeRO), never replicated on every device
    wq = other.state["params"]["layers"]["wq"].sharding.spec
    assert wq != PartitionSpec()
    moments = [x for x in jax.tree.leaves(other.state["opt_state"]) if x.shape == (2, 32, 4, 8)]
    assert moments and all(m.sharding.spec == wq for m in moments)
    other.close()


def test_a_second_trainer_on_the_same_folder_is_refused_until_the_first_closes(tmp_path):
    data, mesh = SyntheticTables(16, T, MODEL.vocab_size, seed=1), make_mesh(fsdp=8)
    first = Trainer(Transformer(MODEL, rngs=nnx.Rngs(0)), data, TC, tmp_path, mesh=mesh)
    lock = json.loads((tmp_path / "trainer.lock").read_text())
    assert lock["pid"] == os.getpid()
    with pytest.raises(StoreLockedError, match=f"held by pid {os.getpid()}"):
        Trainer(Transformer(MODEL, rngs=nnx.Rngs(0)), data, TC, tmp_path, mesh=mesh)
    first.close()
    Trainer(Transformer(MODEL, rngs=nnx.Rngs(0)), data, TC, tmp_path, mesh=mesh).close()
    assert not (tmp_path / "trainer.lock").exists()


def test_refuses_sizes_no_step_or_data_holds_before_allocating(tmp_path):
    data, mesh = SyntheticTables(16, T, MODEL.vocab_size, seed=1), make_mesh(fsdp=8)
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    for tc, message in [
        (dataclasses.replace(TC, batch_size=10**12), f"train.batch_size=1000000000000 x train.seq_len={T}"),
        (dataclasses.replace(TC, batch_size=17 * 16), "train.batch_size=272: more than 16 x the 16 training rows"),
        (dataclasses.replace(TC, seq_len=10**9), "train.seq_len=1000000000: more than the target's context"),
    ]:
        with pytest.raises(ValueError, match=message):
            Trainer(model, data, tc, tmp_path, mesh=mesh)
    with pytest.raises(ValueError, match="a batch would read every row 20 times"):
        stream_rows(0, 0, 20 * 16, 16)
    assert not (tmp_path / "trainer.lock").exists()


def test_refuses_a_checkpoint_of_another_model(straight, tmp_path):
    *_, out = straight
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    wider = MODEL.replace(hidden_size=64)
    with pytest.raises(CheckpointMismatchError, match="another model.*hidden_size.*32, 64"):
        Trainer(Transformer(wider, rngs=nnx.Rngs(0)), SyntheticTables(40, T, 200), TC, tmp_path,
                mesh=make_mesh(fsdp=8), seed=SEED)


# ---------------------------------------------------------------------------- other step configurations


@pytest.mark.slow
def test_gradient_accumulation_matches_the_reference(tmp_path):
    model, params0 = fresh_params(1)
    data = SyntheticTables(40, T, MODEL.vocab_size, seed=4)
    tc = dataclasses.replace(TC, batch_size=16, grad_accum=2, steps=2)
    trainer = Trainer(model, data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    history = trainer.fit()
    trainer.close()
    losses, norms, params = reference_run(params0, data, tc, steps=2, grad_accum=2)
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=2e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in history], norms, rtol=2e-4)
    assert_params_close(trainer.state["params"], params, atol=2e-5, outlier_atol=0.02 * TC.lr)


def test_clm_only_baseline_needs_no_tables(tmp_path):
    model, params0 = fresh_params(2)
    data = SyntheticTables(16, T, MODEL.vocab_size, seed=5, with_tables=False)
    tc = dataclasses.replace(TC, lm_weight=1.0, steps=1)
    with pytest.raises(ValueError, match="lack fields.*table_ids"):
        Trainer(model, data, TC, tmp_path, mesh=make_mesh(fsdp=8))
    with pytest.raises(ValueError, match="rows hold 16 tokens but train.seq_len=32"):
        Trainer(model, data, dataclasses.replace(tc, seq_len=32), tmp_path, mesh=make_mesh(fsdp=8))
    trainer = Trainer(model, data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    history = trainer.fit()
    trainer.close()
    # reference: mean next-token cross-entropy of the initial model over the scored positions, in numpy
    rows = data.rows(stream_rows(SEED, 0, 8, 16))
    expected = label_ce(log_probs(initial_model(params0), rows), rows).mean()
    np.testing.assert_allclose(history[0]["loss"], expected, rtol=1e-5)
    assert not any(k.startswith("source_frac") for k in history[0])


def test_single_teacher_distillation_matches_numpy(tmp_path):
    model, params0 = fresh_params(3)
    data = SyntheticTables(16, T, MODEL.vocab_size, num_sources=1, k=4, seed=6, empty_fraction=0.3)
    tc = dataclasses.replace(TC, steps=1, temperature=2.0)
    trainer = Trainer(model, data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    history = trainer.fit()
    trainer.close()
    # the paper's loss with one teacher: lambda*CE(labels) + (1-lambda)*CE(teacher softmax(logits/temperature))
    rows = data.rows(stream_rows(SEED, 0, 8, 16))
    logp = log_probs(initial_model(params0), rows)
    clm, fus, n_fus = [], 0.0, 0
    for b in range(8):
        for t in range(T):
            if not rows["loss_mask"][b, t]:
                continue
            logq = logp[b, t]
            clm.append(-logq[rows["labels"][b, t]])
            ids, tl = rows["table_ids"][b, t, 0], rows["table_logits"][b, t, 0] / 2.0
            if (ids >= 0).any():
                p = np.exp(tl[ids >= 0] - tl[ids >= 0].max())
                fus += -(p / p.sum() * logq[ids[ids >= 0]]).sum()
                n_fus += 1
    expected = tc.lm_weight * np.mean(clm) + (1 - tc.lm_weight) * fus / n_fus
    np.testing.assert_allclose(history[0]["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(history[0]["source_frac/0"], n_fus / len(clm), rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_with_float32_master_weights_and_remat(tmp_path):
    model, params0 = fresh_params(4)
    data = SyntheticTables(40, T, MODEL.vocab_size, seed=7)
    tc = dataclasses.replace(TC, steps=2, compute_dtype="bfloat16", remat="full")
    trainer = Trainer(model, data, tc, tmp_path, mesh=make_mesh(fsdp=8), seed=SEED)
    history = trainer.fit()
    trainer.close()
    assert trainer.model().config.dtype == "bfloat16" and trainer.model().config.remat == "full"
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(trainer.state["params"]))
    losses, _, _ = reference_run(params0, data, tc, steps=2)
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-2)
    assert [h["loss"] for h in history] != losses  # the step really ran in bfloat16


def test_build_target_places_a_random_model_on_the_mesh():
    mesh = make_mesh(fsdp=4, tensor=2)
    model = build_target(TrainConfig(compute_dtype="bfloat16", remat="dots"), mesh, config=MODEL)
    assert model.config.dtype == "bfloat16" and model.config.remat == "dots"
    assert model.layers.wq[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    with pytest.raises(ValueError, match="exactly one"):
        build_target(TC, mesh)
