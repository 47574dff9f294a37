"""export(): a training checkpoint -> a Hugging Face folder that transformers (PyTorch) loads with our logits."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from fusejax.config import TrainConfig, load_config
from fusejax.checkpoint import find_checkpoints
from fusejax.export import export, run as export_stage
from fusejax.models import ModelConfig, Transformer
from fusejax.sharding import make_mesh
from fusejax.testing import SyntheticTables
from fusejax.train import Trainer

MODEL = ModelConfig(arch="llama", vocab_size=200, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, rope_theta=500.0, bos_token_id=1, eos_token_id=2)
TC = TrainConfig(steps=3, batch_size=8, seq_len=16, lr=1e-2, checkpoint_every=100, log_every=100)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with checkpoints at steps 0 and 3: (folder, initial numpy params, trainer after 3 steps)."""
    out = tmp_path_factory.mktemp("run")
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    params0 = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    trainer = Trainer(model, SyntheticTables(24, 16, MODEL.vocab_size), TC, out, mesh=make_mesh(fsdp=8),
                      config={"target": {"path": None, "tokenizer": str(tokenizer)}})
    trainer.save(wait=True)
    trainer.fit()
    trainer.close()
    return out, params0, trainer


def test_transformers_loads_the_export_with_our_logits(run, tmp_path):
    folder, _, trainer = run
    from transformers import AutoModelForCausalLM

    export(folder, tmp_path / "hf", dtype="float32")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == {"model_max_length": 16}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, MODEL.vocab_size, (2, 16))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(trainer.model()(ids))[..., :MODEL.vocab_size]
    assert np.abs(theirs - ours).max() <= 1e-4
    # the export holds the trained weights, not the initial ones
    init = Transformer(MODEL, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(init(ids))[..., :MODEL.vocab_size] - ours).max() > 1e-3


def test_export_of_an_earlier_step_and_other_dtype(run, tmp_path):
    folder, params0, _ = run
    export(folder / "checkpoints", tmp_path / "a", step=0)
    export(folder / "checkpoints" / "0", tmp_path / "b", dtype="bfloat16")
    weights = load_file(tmp_path / "a" / "model.safetensors")
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], params0["embed"][:MODEL.vocab_size])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    b = load_file(tmp_path / "b" / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_allclose(b.astype(np.float32), params0["embed"][:MODEL.vocab_size], rtol=1e-2)


def test_find_checkpoints_and_errors(run, tmp_path):
    folder, *_ = run
    assert find_checkpoints(folder) == (folder / "checkpoints", None)
    assert find_checkpoints(folder / "checkpoints") == (folder / "checkpoints", None)
    assert find_checkpoints(folder / "checkpoints" / "3") == (folder / "checkpoints", 3)
    with pytest.raises(FileNotFoundError, match="no training checkpoints"):
        find_checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7; available steps: \[0, 3\]"):
        export(folder, tmp_path / "x", step=7)
    with pytest.raises(ValueError, match="step=0 given for the step folder"):
        export(folder / "checkpoints" / "3", tmp_path / "x", step=0)
    export(folder, tmp_path / "y")
    cfg = json.loads((tmp_path / "y" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["eos_token_id"]) == (32, 2, 2)


def test_export_stage_of_the_pipeline(run, tmp_path):
    folder, _, trainer = run
    shutil.copytree(folder / "checkpoints", tmp_path / "train" / "checkpoints")
    cfg = load_config(data={"run": {"output_dir": str(tmp_path)}, "export": {"dtype": "float32"},
                            "mesh": {"fsdp": 4, "tensor": 2}})
    assert export_stage(cfg) == tmp_path / "export"
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "float32"
    weights = load_file(tmp_path / "export" / "model.safetensors")
    final = jax.device_get(trainer.state["params"])
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], final["embed"][:MODEL.vocab_size])
    np.testing.assert_array_equal(weights["model.norm.weight"], final["final_norm_scale"])
