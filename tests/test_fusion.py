"""fusion_loss against a naive dense numpy implementation of the reference (FuseLLM) formulas."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusejax.fusion import FUSIONS, chunked_fusion_loss, fused_topk, fusion_loss, lm_weight_schedule
from fusejax.models import ModelConfig
from fusejax.models.transformer import head_logits
from fusejax.sharding import make_mesh

V_REAL, V_PAD = 37, 48  # real vocabulary; padded vocabulary (ids >= V_REAL hold -inf logits)


# ----------------------------------------------------------------------------------------- naive reference
def naive_fusion(logits, labels, mask, ids, tlogits, ce, *, fusion="min_ce", lm_weight=0.9, loss_type="ce",
                 temperature=1.0, target_source=None, soft_weighting=False):
    """Loops over positions with dense [V] teachers, in float64: (loss, clm, fusion, grad wrt logits,
    chosen/weight per source [S], no-source count, scored count)."""
    z = np.asarray(logits, np.float64)
    ce = np.asarray(ce, np.float64)
    bsz, seq, vocab = z.shape
    num_sources = ids.shape[2]
    if ce.ndim == 2:
        ce = np.repeat(ce[:, None, :], seq, axis=1)
    clm_terms, fus_terms, grads_clm, grads_fus = [], [], [], []
    grad = np.zeros_like(z)
    source_weight = np.zeros(num_sources)
    no_source = 0
    for b in range(bsz):
        for t in range(seq):
            if not mask[b, t]:
                continue
            top = z[b, t].max()
            logq = z[b, t] - (top + np.log(np.sum(np.exp(z[b, t] - top))))
            q = np.exp(logq)
            dists, present = [], []
            for s in range(num_sources):
                row_ids, row_logits = ids[b, t, s], tlogits[b, t, s]
                if np.all(row_ids < 0) and target_source is not None:
                    row_ids, row_logits = ids[b, t, target_source], tlogits[b, t, target_source]
                keep = row_ids >= 0
                p = np.zeros(vocab)
                if keep.any():
                    x = np.asarray(row_logits[keep], np.float64) / temperature
                    e = np.exp(x - x.max())
                    np.add.at(p, row_ids[keep], e / e.sum())
                dists.append(p)
                present.append(bool(keep.any()))
            idx = [s for s in range(num_sources) if present[s]]
            reward = np.exp(-ce[b, t])
            w = np.zeros(num_sources)
            if fusion == "min_ce" and idx:
                best = idx[0]
                for s in idx[1:]:
                    if ce[b, t, s] < ce[b, t, best]:
                        best = s
                w[best] = 1.0
            elif fusion == "avg_ce" and idx:
                e = np.exp(reward[idx])
                w[idx] = e / e.sum()
            elif fusion == "avg_ce_norm" and idx:
                w[idx] = reward[idx] / reward[idx].sum()
            if not soft_weighting:
                lam = lm_weight
            elif not idx:
                lam = 1.0
            elif fusion == "min_ce":
                lam = 1.0 - reward[idx].max()
            else:
                lam = 1.0 - reward[idx].mean()
            onehot = np.zeros(vocab)
            onehot[labels[b, t]] = 1.0
            clm_terms.append((lam, -logq[labels[b, t]]))
            grads_clm.append((b, t, lam, q - onehot))
            source_weight += w
            if not idx:
                no_source += 1
                continue
            big_p = sum(w[s] * dists[s] for s in range(num_sources))
            pos = big_p > 0
            if loss_type == "ce":
                fus = -np.sum(big_p[pos] * logq[pos])
            else:
                fus = np.sum(big_p[pos] * (np.log(big_p[pos]) - logq[pos]))
            fus_terms.append((lam, fus))
            grads_fus.append((b, t, lam, q - big_p))
    n, nf = max(len(clm_terms), 1), max(len(fus_terms), 1)
    loss = sum(lam * c for lam, c in clm_terms) / n + sum((1 - lam) * f for lam, f in fus_terms) / nf
    for b, t, lam, g in grads_clm:
        grad[b, t] += lam / n * g
    for b, t, lam, g in grads_fus:
        grad[b, t] += (1 - lam) / nf * g
    clm = sum(c for _, c in clm_terms) / n
    fus = sum(f for _, f in fus_terms) / nf
    return loss, clm, fus, grad, source_weight / n, no_source / n, len(clm_terms)


# ----------------------------------------------------------------------------------------- batches
def make_batch(seed, *, bsz=3, seq=6, num_sources=3, k=4, token_level=False):
    """Random batch with padding, empty rows, a position with no source, NaN garbage at -1 ids, repeated
    ids across sources and -inf logits at padded vocabulary ids."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(bsz, seq, V_PAD)) * 2).astype(np.float32)
    logits[..., V_REAL:] = -np.inf
    labels = rng.integers(0, V_REAL, (bsz, seq))
    mask = np.ones((bsz, seq), bool)
    mask[0, -2:] = False  # right padding
    mask[2, 0] = False
    labels[~mask] = -100
    ids = np.full((bsz, seq, num_sources, k), -1, np.int32)
    tlogits = np.full((bsz, seq, num_sources, k), np.nan, np.float32)
    for b in range(bsz):
        for t in range(seq):
            shared = rng.choice(V_REAL, k, replace=False)  # sources overlap heavily, like real top-k
            for s in range(num_sources):
                n_valid = 0 if rng.random() < 0.2 else rng.integers(1, k + 1)
                pool = np.concatenate([shared[:2], rng.choice(V_REAL, k, replace=False)])
                chosen = rng.permutation(np.unique(pool))[:n_valid]
                slots = rng.permutation(k)[:n_valid]  # -1 entries anywhere in the row
                ids[b, t, s, slots] = chosen
                tlogits[b, t, s, slots] = rng.normal(size=n_valid) * 3
    ids[1, 2] = -1  # a scored position where no source is present (the target row too)
    ce_shape = (bsz, seq, num_sources) if token_level else (bsz, num_sources)
    ce = rng.uniform(0.5, 4.0, ce_shape).astype(np.float32)
    return logits, labels, mask, ids, tlogits, ce


@functools.cache
def jitted(**opts):
    """fusion_loss and its gradient wrt the student logits, jit-compiled once per option set."""
    def f(*args):
        return fusion_loss(*args, **opts)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def check(batch, **opts):
    """fusion_loss (jit) equals the naive reference: loss, parts, gradient and source metrics."""
    (loss, metrics), grad = jitted(**opts)(*batch)
    ref_loss, ref_clm, ref_fus, ref_grad, ref_weight, ref_none, ref_n = naive_fusion(*batch, **opts)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["clm_loss"], ref_clm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["fusion_loss"], ref_fus, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["source_weight"], ref_weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["no_source"], ref_none, atol=1e-7)
    assert int(metrics["scored_tokens"]) == ref_n
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, ref_grad, atol=2e-6)
    assert loss.dtype == jnp.float32
    return loss, metrics


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce", "avg_ce_norm"])
@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("loss_type", ["ce", "kl"])
def test_matches_naive_reference(fusion, token_level, loss_type):
    check(make_batch(1, token_level=token_level), fusion=fusion, loss_type=loss_type)


@pytest.mark.parametrize(
    "opts",
    [
        dict(fusion="avg_ce", temperature=2.0),
        dict(fusion="min_ce", loss_type="kl", temperature=0.5),
        dict(fusion="min_ce", target_source=0),
        dict(fusion="avg_ce_norm", loss_type="kl", target_source=2),
        dict(fusion="avg_ce", lm_weight=0.0),
        dict(fusion="min_ce", lm_weight=1.0),
        dict(fusion="min_ce", soft_weighting=True),
        dict(fusion="avg_ce", soft_weighting=True, target_source=1),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_match_naive_reference(opts):
    check(make_batch(2, token_level=True), **opts)


def test_target_source_fills_empty_rows_and_absence_otherwise():
    batch = make_batch(3)
    ids = batch[3]
    assert np.any(np.all(ids[:, :, 1] < 0, axis=-1) & np.any(ids[:, :, 0] >= 0, axis=-1))  # something to fill
    _, filled = check(batch, fusion="avg_ce", target_source=0)
    _, absent = check(batch, fusion="avg_ce")
    assert not np.isclose(filled["fusion_loss"], absent["fusion_loss"])
    np.testing.assert_allclose(filled["source_present"], absent["source_present"])  # own rows, before filling


def test_lm_weight_extremes_are_the_two_parts():
    batch = make_batch(4)
    _, metrics = check(batch, fusion="min_ce", lm_weight=1.0)
    np.testing.assert_allclose(metrics["loss"], metrics["clm_loss"], rtol=1e-6)
    _, metrics = check(batch, fusion="min_ce", lm_weight=0.0)
    np.testing.assert_allclose(metrics["loss"], metrics["fusion_loss"], rtol=1e-6)


def test_min_ce_ties_go_to_the_lowest_source_index():
    logits, labels, mask, ids, tlogits, _ = make_batch(5)
    ids[:, :, :, 0] = np.arange(3)  # every row is non-empty, and the sources' rows differ
    tlogits[:, :, :, 0] = 1.0
    ce = np.array([[3.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.5, 0.5, 0.5]], np.float32)
    _, metrics = check((logits, labels, mask, ids, tlogits, ce), fusion="min_ce")
    weight = np.asarray(metrics["source_weight"]) * float(metrics["scored_tokens"])
    assert np.allclose(weight, [6, 4 + 5, 0])  # example 1 (6 scored, all tied) -> source 0; examples 0, 2 -> source 1


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("more", [False, True], ids=["top5", "top_beyond_S_k"])
def test_fused_topk_is_the_naive_teacher(fusion, more):
    _, labels, _, ids, tlogits, ce = make_batch(5, token_level=True)
    top = ids.shape[-2] * ids.shape[-1] + 3 if more else 5  # more than the tables hold: -1 / 0 padded
    # the naive reference's gradient at a uniform student with λ = 0 is (q - P) / (positions with a source)
    present = (ids >= 0).any(axis=(-2, -1))
    uniform = np.zeros((*labels.shape, V_PAD), np.float32)
    grad = naive_fusion(uniform, np.zeros_like(labels), np.ones(labels.shape, bool), ids, tlogits, ce, fusion=fusion,
                        lm_weight=0.0, temperature=0.7)[3]
    teacher = np.where(present[..., None], 1 / V_PAD - grad * present.sum(), 0.0)  # [B,T,V]
    got_ids, got_p = fused_topk(ids, tlogits, ce, top=top, fusion=fusion, temperature=0.7)
    assert got_ids.shape == got_p.shape == (*labels.shape, top)
    for b, t in np.ndindex(labels.shape):
        n = min(top, int((teacher[b, t] > 1e-9).sum()))
        want = np.argsort(-teacher[b, t], kind="stable")[:n]
        assert got_ids[b, t, :n].tolist() == want.tolist() and np.all(got_ids[b, t, n:] == -1)
        np.testing.assert_allclose(got_p[b, t, :n], teacher[b, t, want], atol=1e-5)
        assert np.all(got_p[b, t, n:] == 0)
    assert not present.all() and present.any()


def test_position_with_no_source_only_carries_clm():
    logits, labels, mask, ids, tlogits, ce = make_batch(6)
    ids[:] = -1
    ids[:, :, 1, :2] = [3, 7]  # one source with two entries everywhere ...
    tlogits[:, :, 1, :2] = [0.3, -1.2]
    ids[0, 1] = -1  # ... except one scored position, where no source is present
    _, metrics = check((logits, labels, mask, ids, tlogits, ce), fusion="avg_ce", target_source=0)
    n = float(metrics["scored_tokens"])
    assert float(metrics["fused_tokens"]) == n - 1
    np.testing.assert_allclose(metrics["no_source"], 1 / n, rtol=1e-6)
    np.testing.assert_allclose(np.sum(metrics["source_weight"]) + metrics["no_source"], 1.0, rtol=1e-6)


def test_bf16_student_logits_use_float32_math():
    logits, *rest = make_batch(7)
    logits16 = jnp.asarray(logits, jnp.bfloat16)
    loss, _ = fusion_loss(logits16, *rest, fusion="avg_ce")
    ref = naive_fusion(np.asarray(logits16.astype(jnp.float32)), *rest, fusion="avg_ce")[0]
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_fully_masked_batch_gives_zero_loss_and_finite_gradient():
    logits, labels, mask, ids, tlogits, ce = make_batch(8)
    mask[:] = False
    labels[:] = -100
    (loss, metrics), grad = jitted(fusion="avg_ce", loss_type="kl")(logits, labels, mask, ids, tlogits, ce)
    assert float(loss) == 0.0 and float(metrics["scored_tokens"]) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    for value in metrics.values():
        assert np.all(np.isfinite(value))


def test_no_dense_teacher_is_built():
    batch = make_batch(9)
    jaxpr = str(jax.make_jaxpr(functools.partial(fusion_loss, fusion="avg_ce", loss_type="kl"))(*batch))
    assert "scatter" not in jaxpr


def test_lm_weight_schedule():
    assert float(lm_weight_schedule("hard", 0.9, 50, 100)) == pytest.approx(0.9)
    assert float(lm_weight_schedule("hard_and_decay", 0.8, 0, 100)) == pytest.approx(0.8)
    assert float(lm_weight_schedule("hard_and_decay", 0.8, 25, 100)) == pytest.approx(0.85)
    assert float(lm_weight_schedule("hard_and_decay", 0.8, 100, 100)) == pytest.approx(1.0)
    traced = jax.jit(lambda s: lm_weight_schedule("hard_and_decay", 0.6, s, 10))(jnp.int32(5))
    assert float(traced) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="soft_weighting"):
        lm_weight_schedule("soft", 0.9, 0, 10)
    with pytest.raises(ValueError, match="'linear'"):
        lm_weight_schedule("linear", 0.9, 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        lm_weight_schedule("hard_and_decay", 0.9, 0, 0)


# ----------------------------------------------------------------------------------------- chunked loss
HEAD = ModelConfig(arch="llama", vocab_size=V_REAL, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2)


def hidden_batch(seed, *, tied, dtype=jnp.float32, **sizes):
    """:func:`make_batch` tables with hidden states [B,T,8] and a head weight instead of logits."""
    _, *rest = make_batch(seed, **sizes)
    rng = np.random.default_rng(seed + 100)
    cfg = HEAD.replace(tie_embeddings=tied)
    b, t = rest[0].shape
    hidden = jnp.asarray(rng.normal(size=(b, t, cfg.hidden_size)), dtype)
    shape = (cfg.padded_vocab_size, cfg.hidden_size) if tied else (cfg.hidden_size, cfg.padded_vocab_size)
    weight = jnp.asarray(rng.normal(size=shape), dtype)
    return functools.partial(head_logits, cfg), weight, hidden, rest


@functools.cache
def chunked_and_dense(chunk, batch_axes=(), **opts):
    """value_and_grad wrt (weight, hidden) of the chunked loss and of fusion_loss on the dense logits."""
    def chunked(weight, hidden, head, *rest):
        return chunked_fusion_loss(hidden, weight, head, *rest, chunk=chunk, batch_axes=batch_axes, **opts)

    def dense(weight, hidden, head, *rest):
        return fusion_loss(head(weight, hidden), *rest, **opts)

    return [jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True), static_argnums=2) for f in (chunked, dense)]


def assert_chunked_equals_dense(head, weight, hidden, rest, chunk, batch_axes=(), **opts):
    chunked, dense = chunked_and_dense(chunk, batch_axes, **opts)
    (loss, metrics), grads = chunked(weight, hidden, head, *rest)
    (ref_loss, ref_metrics), ref_grads = dense(weight, hidden, head, *rest)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == ref.dtype and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk, tied, opts", [
    (2, False, dict(fusion="min_ce")),
    (3, True, dict(fusion="avg_ce", loss_type="kl", temperature=2.0)),
    (1, False, dict(fusion="avg_ce_norm", target_source=1, soft_weighting=True)),
    (64, False, dict(fusion="avg_ce", loss_type="kl")),  # larger than T: one chunk
])
def test_chunked_loss_equals_dense_loss_and_gradients(chunk, tied, opts):
    head, weight, hidden, rest = hidden_batch(11, tied=tied, token_level=True)
    assert_chunked_equals_dense(head, weight, hidden, rest, chunk, **opts)


def _while_bodies(hlo: str) -> dict[str, str]:
    """{name: text} of the computations that are while-loop bodies in an HLO module's text."""
    parts = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^(?:ENTRY )?(%\S+) .*?^}", hlo)}
    return {name: parts[name] for name in re.findall(r"body=(%[\w.\-]+)", hlo)}


@pytest.mark.parametrize("batch_axes", [(), ("data", "fsdp")])
def test_chunked_loss_on_a_tensor_sharded_vocabulary(batch_axes):
    """Hidden states split over the batch (fsdp=2), the head's vocabulary over tensor=4, on 8 CPU devices; with
    the batch's mesh axes given, the head gradient is summed per row group and reduced once, after the scan
    over chunks, without them once per chunk inside it."""
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    head, weight, hidden, rest = hidden_batch(12, tied=False, bsz=4, seq=8)
    with jax.set_mesh(mesh):
        weight = jax.device_put(weight, jax.sharding.NamedSharding(mesh, jax.P(None, "tensor")))
        hidden = jax.device_put(hidden, jax.sharding.NamedSharding(mesh, jax.P("fsdp")))
        assert weight.addressable_shards[0].data.shape == (8, HEAD.padded_vocab_size // 4)
        assert_chunked_equals_dense(head, weight, hidden, rest, 2, batch_axes, fusion="avg_ce")
        chunked, _ = chunked_and_dense(2, batch_axes, fusion="avg_ce")
        bodies = _while_bodies(chunked.lower(weight, hidden, head, *rest).compile().as_text())
    # the results of the all-reduces in the loop over chunks: over tensor, the logsumexp and hidden gradient of
    # a chunk of the sharded vocabulary; over fsdp, the head gradient (a [1, 32, 8] shard of the [8, 128]
    # weight), unless it is summed per row group
    reduced = [line.split(" all-reduce(")[0] for text in bodies.values() for line in text.splitlines()
               if " all-reduce(" in line]
    assert reduced and any("f32[1,32,8]" in r for r in reduced) != bool(batch_axes), reduced


def test_chunked_loss_rejects_a_chunk_that_does_not_divide():
    head, weight, hidden, rest = hidden_batch(13, tied=False)
    with pytest.raises(ValueError, match="chunk of 4 positions does not divide the 6"):
        chunked_fusion_loss(hidden, weight, head, *rest, chunk=4)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(labels=np.zeros((3, 5), np.int32)), "labels"),
        (dict(loss_mask=np.ones((3,), bool)), "loss_mask"),
        (dict(table_ids=np.zeros((3, 6, 3), np.int32)), "table_ids"),
        (dict(table_ids=np.zeros((3, 6, 3, 4), np.float32)), "integer"),
        (dict(table_logits=np.zeros((3, 6, 3, 5), np.float32)), "table_logits"),
        (dict(source_ce=np.zeros((3, 2), np.float32)), "source_ce"),
        (dict(fusion="max_ce"), "'max_ce'"),
        (dict(loss_type="mse"), "'mse'"),
        (dict(temperature=0.0), "temperature"),
        (dict(target_source=3), "target_source"),
    ],
)
def test_bad_input_raises_a_clear_error(change, match):
    logits, labels, mask, ids, tlogits, ce = make_batch(10)
    args = dict(student_logits=logits, labels=labels, loss_mask=mask, table_ids=ids, table_logits=tlogits,
                source_ce=ce)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fusion_loss(**args)
