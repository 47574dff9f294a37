"""The study driver: aggregation and report on fake result lines (no training); the same-architecture
ensemble evaluator and weight averaging on tiny random models."""

import json
import math

import numpy as np
import pytest

from fusejax import study


def line(variant, seed, all_, prose, code, target=(3.6, 3.0, 4.0)):
    return {"variant": variant, "seed": seed, "store": "x", "seconds": 1.0,
            "target": {"all": target[0], "prose": target[1], "code": target[2]},
            "trained": {"all": all_, "prose": prose, "code": code}}


RESULTS = [line("clm_only", 0, 3.10, 2.9, 3.3), line("clm_only", 1, 3.20, 3.0, 3.4),
           line("clm_only", 2, 3.30, 3.1, 3.5),
           line("fusellm", 0, 3.00, 2.8, 3.2), line("fusellm", 2, 3.40, 3.2, 3.6)]


def test_summarize_matches_hand_values():
    s = study.summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert (s.min, s.max, s.n) == (1.0, 4.0, 3)
    assert study.summarize([5.0]).std == 0.0
    with pytest.raises(ValueError):
        study.summarize([])


def test_aggregate_per_variant_domain_and_target():
    stats = study.aggregate(RESULTS)
    assert set(stats) == {"clm_only", "fusellm", "target"}
    assert stats["clm_only"]["all"].mean == pytest.approx(3.2)
    assert stats["clm_only"]["code"].min == pytest.approx(3.3) and stats["clm_only"]["code"].max == pytest.approx(3.5)
    assert stats["fusellm"]["prose"].n == 2 and stats["fusellm"]["prose"].mean == pytest.approx(3.0)
    # the target is one model: one value per seed, from all runs of that seed
    assert stats["target"]["all"].n == 3 and stats["target"]["all"].std == 0.0


def test_aggregate_rejects_a_repeated_seed():
    with pytest.raises(ValueError, match="fusellm.*seed 0"):
        study.aggregate(RESULTS + [line("fusellm", 0, 3.0, 2.8, 3.2)])


def test_paired_delta_uses_only_common_seeds():
    d = study.paired_delta(RESULTS, "clm_only", "fusellm")
    # seeds 0 and 2: 3.00 - 3.10 = -0.10, 3.40 - 3.30 = +0.10
    assert d.n == 2 and d.mean == pytest.approx(0.0) and d.std == pytest.approx(math.sqrt(0.02))
    assert study.paired_delta(RESULTS, "clm_only", "avg_ce") is None


def test_write_docs_tables_and_plots(tmp_path):
    results_file = tmp_path / "results.jsonl"
    results_file.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    path = study.write_docs(study.read_results(results_file), tmp_path)
    text = path.read_text()
    assert "| clm_only | 3 | 3.2000 ± 0.1000 (3.1000..3.3000)" in text
    assert "| fusellm | 2 | 3.2000 ± 0.2828" in text
    assert "| fusellm | 2 |" in text and "0.0000 ± 0.1414 |" in text  # paired delta vs clm_only
    assert (tmp_path / "study" / "table0.png").stat().st_size > 1000


def test_write_docs_marks_tables_without_runs(tmp_path):
    text = study.write_docs(RESULTS[:3], tmp_path).read_text()  # clm_only only
    assert text.count("(no finished runs yet)") == 2  # sources and ablation tables
    assert not (tmp_path / "study" / "table0.png").exists()  # nothing to compare with clm_only


# ------------------------------------------------------------------ same-architecture comparison (tiny models)

V, T = 50, 12


class _Rows:
    """Fixed random rows of a CLM batch (``fusejax.data.Batches``): variable lengths, random byte counts."""

    def __init__(self, n=5, seed=0):
        from fusejax.data import next_token_targets

        rng = np.random.default_rng(seed)
        self.num_rows = n
        self.ids = rng.integers(0, V, (n, T)).astype(np.int32)
        self.mask = (np.arange(T)[None] < rng.integers(3, T + 1, n)[:, None]).astype(np.int32)
        self.fields = {"input_ids": self.ids, "attention_mask": self.mask, **next_token_targets(self.ids, self.mask),
                       "n_bytes": rng.integers(10, 60, n).astype(np.int32)}

    def rows(self, indices):
        return {k: v[indices] for k, v in self.fields.items()}


def _tiny(seed):
    from flax import nnx

    from fusejax.models import ModelConfig, Transformer

    config = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, max_position_embeddings=T)
    return Transformer(config, rngs=nnx.Rngs(seed))


def test_ensemble_bits_per_byte_matches_numpy_mixture():
    from fusejax.evaluation import evaluate

    data, models = _Rows(), [_tiny(0), _tiny(1)]
    probs = []
    for m in models:  # float64 softmax of each model's logits over the real vocabulary
        logits = np.asarray(m(data.ids, data.mask), np.float64)[..., :V]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs.append(e / e.sum(-1, keepdims=True))
    mix = (probs[0] + probs[1]) / 2
    f = data.fields
    bits = sum(-math.log2(mix[i, t, f["labels"][i, t]]) for i in range(data.num_rows) for t in range(T)
               if f["loss_mask"][i, t])
    got = study.ensemble_bits_per_byte(models, data, batch_size=2, domains=[])  # 5 rows: last batch padded
    assert got["bits_per_byte"] == pytest.approx(bits / f["n_bytes"].sum(), rel=1e-5)
    assert got["tokens"] == f["loss_mask"].sum()
    # the mixture differs from either model alone, and a one-model "ensemble" is that model
    single = [evaluate(m, data, batch_size=2, domains=[])["bits_per_byte"] for m in models]
    assert all(abs(s - got["bits_per_byte"]) > 1e-3 for s in single)
    assert study.ensemble_bits_per_byte(models[:1], data, batch_size=2, domains=[])["bits_per_byte"] == \
        pytest.approx(single[0], rel=1e-6)


def test_average_weights_is_the_parameter_mean():
    import jax
    from flax import nnx

    a, b = _tiny(0), _tiny(1)
    expected = jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / 2, nnx.state(a, nnx.Param),
                            nnx.state(b, nnx.Param))
    got = nnx.state(study.average_weights([a, b]), nnx.Param)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-6)


@pytest.mark.parametrize("on_the_fly", [False, True])
def test_train_and_eval_links_what_training_reads(tmp_path, monkeypatch, on_the_fly):
    """A variant trains on the shared store's aligned store, or on the fly on its top-k stores and vocab maps."""
    from fusejax import evaluation, train
    from fusejax.config import load_config
    from fusejax.schema import RunLayout

    store = RunLayout.at(tmp_path / "store")
    for folder in (store.corpus, store.represent, store.vocab_maps, store.aligned):
        folder.mkdir(parents=True)
    seen = []
    monkeypatch.setattr(train, "run", lambda cfg: seen.append(
        {name: getattr(RunLayout.of(cfg), name).is_dir() for name in ("corpus", "aligned", "represent", "vocab_maps")}))
    monkeypatch.setattr(evaluation, "run", lambda cfg: {})
    cfg = load_config(overrides=[f"align.on_the_fly={str(on_the_fly).lower()}"])
    study.train_and_eval(cfg, store.root, tmp_path / "variant", seed=1)
    assert seen == [{"corpus": True, "aligned": True, "represent": on_the_fly, "vocab_maps": on_the_fly}]
