"""fusejax merge: parity with mergekit on a tiny random Llama and its perturbed variants, VaRM against a
naive loop over FuseChat's formula, DARE by its properties, refusals and the CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fusejax.cli import main
from fusejax.merging import merge, merge_tensor

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)
WEIGHTS = [0.5, 1.0, 0.3]


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base, three variants (base + noise of different sizes), a bigger vocabulary, a GPT-2."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    out = {"base": _save(base, root / "base")}
    for i in range(3):
        variant = LlamaForCausalLM(LlamaConfig(**LLAMA))
        with torch.no_grad():
            for p, q in zip(variant.parameters(), base.parameters()):
                p.copy_(q + 0.01 * (i + 1) * torch.randn_like(q))
        out[f"m{i}"] = _save(variant, root / f"m{i}")
    out["vocab"] = _save(LlamaForCausalLM(LlamaConfig(**{**LLAMA, "vocab_size": 80})), root / "vocab")
    out["gpt2"] = _save(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64)), root / "gpt2")
    return out


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _mergekit(method, base, models, params):
    """mergekit's merge of every tensor (torch, float32), as numpy."""
    mergekit = pytest.importorskip("mergekit.merge_methods")
    ids = ["base"] * (base is not None) + [f"m{i}" for i in range(len(models))]
    inputs = ([_tensors(base)] if base is not None else []) + [_tensors(m) for m in models]
    return {name: mergekit.merge_tensors([torch.from_numpy(t[name]) for t in inputs], method, parameters=params,
                                         ids=ids, base_index=0 if base is not None else None).numpy()
            for name in inputs[0]}


PARITY = [  # (method, our settings, mergekit's parameters)
    ("linear", {"weights": WEIGHTS}, {"weight": WEIGHTS}),
    ("linear", {"weights": WEIGHTS, "normalize": False}, {"weight": WEIGHTS, "normalize": False}),
    ("task_arithmetic", {"weights": WEIGHTS, "scale": 0.7}, {"weight": WEIGHTS, "lambda": 0.7}),
    ("ties", {"weights": WEIGHTS, "density": 0.4}, {"weight": WEIGHTS, "density": 0.4}),
    ("ties", {"weights": WEIGHTS, "density": 1.0, "normalize": False, "scale": 1.5},
     {"weight": WEIGHTS, "normalize": False, "lambda": 1.5}),
    ("dare_linear", {"weights": WEIGHTS}, {"weight": WEIGHTS}),
    ("dare_ties", {"weights": WEIGHTS, "scale": 0.5}, {"weight": WEIGHTS, "lambda": 0.5}),
    ("sce", {"density": 0.3}, {"select_topk": 0.3}),
    ("sce", {}, {}),
]


@pytest.mark.parametrize("method,ours,theirs", PARITY, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(PARITY)])
def test_parity_with_mergekit(folders, tmp_path, method, ours, theirs):
    models = [folders[f"m{i}"] for i in range(3)]
    base = None if method == "linear" else folders["base"]
    if base is not None:  # mergekit keys the per-model parameters by model id
        theirs = {k: dict(zip(["m0", "m1", "m2"], v)) if isinstance(v, list) else v for k, v in theirs.items()}
    merge(models, tmp_path / "out", method=method, base=base, **ours)
    got, want = _tensors(tmp_path / "out"), _mergekit(method, base, models, theirs)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
    assert not np.allclose(got["lm_head.weight"], _tensors(folders["base"])["lm_head.weight"])


def test_varm_is_fusechat_formula(folders, tmp_path):
    """W_{j,m} = mean(Δθ²_{j,m}) / Σ_j mean(Δθ²_{j,m}) per matrix m; θ_m = Σ_j W_{j,m} θ_{j,m}, element by element."""
    models = [folders[f"m{i}"] for i in range(3)]
    merge(models, tmp_path / "out", method="varm", base=folders["base"])
    got, base = _tensors(tmp_path / "out"), _tensors(folders["base"])
    thetas = [_tensors(m) for m in models]
    for name, b in base.items():
        b = b.astype(np.float64)
        var = [float(np.mean([(float(t[name].flat[i]) - b.flat[i]) ** 2 for i in range(b.size)])) for t in thetas]
        want = sum(v / sum(var) * t[name].astype(np.float64) for v, t in zip(var, thetas))
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
    # the variant with the largest update weighs most
    assert np.abs(got["lm_head.weight"] - thetas[2]["lm_head.weight"]).mean() < \
        np.abs(got["lm_head.weight"] - thetas[0]["lm_head.weight"]).mean()


def test_dare_drops_and_rescales_with_a_seed():
    rng = np.random.default_rng(0)
    base, x = rng.normal(size=(200, 100)).astype(np.float32), rng.normal(size=(200, 100)).astype(np.float32)

    def dare(seed, density=0.3):
        return merge_tensor("dare_linear", [x], base, density=density, rngs=[np.random.default_rng(seed)])

    out = dare(1)
    kept = out != base
    assert abs(kept.mean() - 0.3) < 0.01  # drop rate 1 - density
    np.testing.assert_allclose(out[kept] - base[kept], (x - base)[kept] / 0.3, rtol=1e-5, atol=1e-6)  # rescaled by 1/p
    np.testing.assert_array_equal(out, dare(1))  # seeded
    assert not np.array_equal(out, dare(2))
    np.testing.assert_array_equal(dare(1, density=0.0), base)


def test_dare_merge_is_seeded_and_bfloat16(folders, tmp_path):
    models = [folders[f"m{i}"] for i in range(2)]
    kw = dict(method="dare_ties", base=folders["base"], density=0.5, dtype="bfloat16")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        merge(models, tmp_path / name, seed=seed, **kw)
    a, b, c = (_tensors(tmp_path / n) for n in "abc")
    assert a["lm_head.weight"].dtype.name == "bfloat16"
    assert json.loads((tmp_path / "a" / "config.json").read_text()).get("dtype") == "bfloat16"
    assert all(np.array_equal(a[k], b[k]) for k in a) and not all(np.array_equal(a[k], c[k]) for k in a)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "a")  # a complete Hugging Face folder
    assert loaded.config.vocab_size == LLAMA["vocab_size"]


@pytest.mark.parametrize("other,needle", [("vocab", "config field 'vocab_size' is 80, not 64"),
                                          ("gpt2", "config field 'model_type' is 'gpt2', not 'llama'")])
def test_different_models_are_refused(folders, tmp_path, other, needle):
    with pytest.raises(ValueError, match=needle):
        merge([folders["m0"], folders[other]], tmp_path / "out", method="task_arithmetic", base=folders["base"])
    assert not tmp_path.joinpath("out").exists() and not list(tmp_path.iterdir())


def test_a_missing_tensor_is_refused_and_the_old_output_kept(folders, tmp_path):
    import shutil

    from safetensors.numpy import save_file
    shutil.copytree(folders["m0"], tmp_path / "cut")
    tensors = _tensors(tmp_path / "cut")
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "cut" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(ValueError, match="tensor 'model.norm.weight' is in .*base but not in .*cut"):
        merge([tmp_path / "cut"], tmp_path / "out", method="ties", base=folders["base"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]


def test_cli_merge_and_bad_weights(folders, tmp_path, capsys):
    import fusejax
    assert fusejax.merge is merge  # the function, also once the stage module is imported
    models = f"[{folders['m0']},{folders['m1']}]"
    args = ["merge", f"run.output_dir={tmp_path}", f"merge.models={models}"]
    assert main([*args, "merge.weights=[1,2]"]) == 0
    assert set(_tensors(tmp_path / "merge")) == set(_tensors(folders["base"]))
    assert (tmp_path / "merge" / "config.json").is_file()
    # recorded in its stage.json, so that merging again replaces it (a folder fusejax did not write is refused)
    assert json.loads((tmp_path / "merge" / "stage.json").read_text())["status"] == "complete"
    assert main([*args, "merge.weights=[2,1]"]) == 0
    assert json.loads((tmp_path / "merge" / "stage.json").read_text())["stage"] == "merge"
    capsys.readouterr()
    assert main([*args, "merge.weights=[1,-1]", f"merge.path={tmp_path}/bad"]) == 2
    assert "merge.weights [1.0, -1.0] sum to 0" in capsys.readouterr().err
    assert main([*args, "merge.method=ties", f"merge.path={tmp_path}/bad"]) == 2
    assert "merge.base is not set" in capsys.readouterr().err
    assert main([*args, f"merge.path={folders['m1']}"]) == 2
    assert f"merge.path ({folders['m1']}) would overwrite or move the input merge.models.1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_sharded_base_keeps_its_layout(folders, tmp_path):
    LlamaForCausalLM.from_pretrained(folders["base"]).save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    models = [folders["m0"], folders["m1"]]
    merge(models, tmp_path / "a", method="task_arithmetic", base=tmp_path / "sharded")
    merge(models, tmp_path / "b", method="task_arithmetic", base=folders["base"])
    out = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert out["weight_map"] == index["weight_map"]
    got = {k: v for f in set(out["weight_map"].values()) for k, v in load_file(str(tmp_path / "a" / f)).items()}
    want = _tensors(tmp_path / "b")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    LlamaForCausalLM.from_pretrained(tmp_path / "a")


def test_merge_refuses_to_write_over_its_inputs(folders):
    """The Python API's own check (the command line refuses earlier, naming the setting)."""
    with pytest.raises(ValueError, match="overlaps merge.models.1 .*: the output would replace an input"):
        merge([folders["m0"], folders["m1"]], folders["m1"], method="linear")
    assert (folders["m1"] / "model.safetensors").is_file()
