"""Gemma 2, Gemma 3 (text) and Mixtral against transformers (PyTorch) on tiny random models, in float32.

Logit parity both ways (load theirs; export ours and load it in transformers) on right-padded batches longer
than every sliding window; the transformers v4 config layouts; for Mixtral the gradient of the loss, top-k
extraction with the experts sharded over the mesh, and `fusejax plan`.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from fusejax.checkpoint import check_architecture
from fusejax.config import load_config
from fusejax.models import ModelConfig, ModelConfigError, load_pretrained
from fusejax.plan import run as plan
from fusejax.represent import extract_topk
from fusejax.sharding import make_mesh
from tiny import (PARITY_LENGTHS, PARITY_VOCAB, assert_close_at_tokens, check_export_parity, check_load_parity,
                  hf_logits, parity_batch, save_random_hf_model)

WINDOW = 3
assert max(PARITY_LENGTHS) > WINDOW
COMMON = dict(vocab_size=PARITY_VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA = dict(COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW)
CASES = {
    # soft-capping of scores and logits, alternating sliding/global layers (default pattern), tied embeddings
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        GEMMA, num_hidden_layers=3, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # q/k norms, a 3:1 local:global pattern, local and global RoPE bases, linear scaling on global layers
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        GEMMA, num_hidden_layers=4, sliding_window_pattern=3, attention_bias=True, tie_word_embeddings=False,
        final_logit_softcapping=3.0, rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # 4 experts, top-2 routing, sliding window on every layer
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF model folder, HF model, reference logits) for one perturbed random tiny HF model."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    model = save_random_hf_model(folder, *CASES[name])
    return name, folder, model, hf_logits(model, *parity_batch())


def test_logits_match_transformers(case):
    name, folder, _, ref = case
    check_load_parity(folder, ref)


def test_save_then_transformers_loads(case, tmp_path):
    name, folder, _, ref = case
    check_export_parity(folder, ref, tmp_path, CASES[name][1])


def test_options_are_read(case):
    """The parity cases turn on what they claim (a case that silently dropped an option would still pass)."""
    name, folder, _, _ = case
    c = load_pretrained(folder).config
    if name == "gemma2":
        assert c.sliding_layers == (True, False, True) and (c.attn_logit_softcap, c.final_logit_softcap) == (5, 3)
        assert c.norm == "rms_plus_one" and c.post_norms and c.scale_embeddings and c.tie_embeddings
        assert c.activation == "gelu_pytorch_tanh" and c.softmax_scale == 24**-0.5
    elif name == "gemma3_text":
        assert c.sliding_layers == (True, True, False, True) and c.qk_norm and c.attention_bias
        assert (c.rope_theta, c.rope_local_theta, c.rope_linear_factor) == (100000.0, 1000.0, 4.0)
    else:
        assert (c.num_experts, c.experts_per_token, c.sliding_layers) == (4, 2, (True, True))


def _gemma2_v4(c):
    c.update(rope_theta=c.pop("rope_parameters")["rope_theta"], hidden_act="gelu_pytorch_tanh")
    del c["layer_types"]  # Gemma 2's default: alternating, the first layer sliding


def _gemma3_v4(c):
    rope = c.pop("rope_parameters")
    c.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]
             ["rope_theta"], rope_scaling={"rope_type": "linear", "factor": rope["full_attention"]["factor"]},
             sliding_window_pattern=3)
    del c["layer_types"]


@pytest.mark.parametrize("name,edit", [("gemma2", _gemma2_v4), ("gemma3_text", _gemma3_v4)])
def test_v4_config_layout_loads(name, edit, tmp_path):
    """A config.json hand-edited to the transformers v4 layout (layer pattern, rope fields) gives the same model."""
    model = save_random_hf_model(tmp_path, *CASES[name])
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids, mask = parity_batch()
    assert_close_at_tokens(load_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)),
                           hf_logits(model, ids, mask), mask)


@pytest.mark.parametrize("model_type,config,fragment", [
    ("mixtral", dict(router_jitter_noise=0.1), "'router_jitter_noise'=0.1 is not supported"),
    ("gemma2", dict(use_bidirectional_attention=True), "'use_bidirectional_attention'=True is not supported"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention"]), "'layer_types'="),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0}}),
     "'rope_parameters.full_attention'="),
])
def test_unsupported_options_are_refused(model_type, config, fragment):
    sizes = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ModelConfigError, match="^cfg.json: .*") as e:
        ModelConfig.from_hf({"model_type": model_type, **sizes, **config}, source="cfg.json")
    assert fragment in str(e.value)


def test_export_refuses_what_the_family_cannot_express():
    c = ModelConfig.from_hf({"model_type": "gemma2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2})
    with pytest.raises(ModelConfigError, match="model_type 'gemma2' needs .*got {'qk_norm': True}"):
        c.replace(qk_norm=True).to_hf()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral_source")
    return folder, save_random_hf_model(folder, *CASES["mixtral"], seed=1)


def _labels(ids, mask):
    """Next-token targets [B, T-1]; -100 where the next token is padding."""
    return np.where(mask[:, 1:] == 1, ids[:, 1:], -100)


def _loss(logits, labels):
    """Mean next-token cross-entropy of our logits [B, T, >= vocab] over targets >= 0 (the naive formula)."""
    logp = jax.nn.log_softmax(logits[:, :-1, :PARITY_VOCAB], axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(labels >= 0, picked, 0)) / jnp.sum(labels >= 0)


def test_mixtral_loss_gradient_matches_transformers(mixtral, tmp_path):
    """Training through the router and the experts: the loss and the gradient of every parameter equal
    torch's (its gradients written as a checkpoint and read back through the same weight map)."""
    folder, hf = mixtral
    ids, mask = parity_batch()
    labels = _labels(ids, mask)
    hf.zero_grad()
    logits = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, PARITY_VOCAB),
                                                 torch.from_numpy(labels).long().reshape(-1), ignore_index=-100)
    ref_loss.backward()
    hf.save_pretrained(tmp_path, state_dict={name: p.grad for name, p in hf.named_parameters()})
    ref_grads = nnx.state(load_pretrained(tmp_path), nnx.Param)

    loss_and_grads = nnx.jit(nnx.value_and_grad(lambda m: _loss(m(jnp.asarray(ids), jnp.asarray(mask)), labels)))
    loss, grads = loss_and_grads(load_pretrained(folder))
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-6)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        ref = np.asarray(flat_ref[path].get_value())
        assert np.abs(ref).max() > 0, path  # every parameter is trained, each expert included
        np.testing.assert_allclose(np.asarray(g.get_value()), ref, atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_mixtral_topk_with_experts_sharded(mixtral):
    """Top-k extraction (the represent stage's) equals transformers' with the experts split over the tensor axis."""
    folder, hf = mixtral
    ids, mask = parity_batch()
    logits = torch.from_numpy(hf_logits(hf, ids, mask))
    ref_values, ref_ids = (x.numpy() for x in torch.topk(logits, 5, dim=-1))
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    model = load_pretrained(folder, mesh=mesh)
    assert model.layers.w_gate.get_value().sharding.spec == PartitionSpec(None, "tensor", "fsdp", None)
    with jax.set_mesh(mesh):
        values, top_ids, _, _ = extract_topk(model, jnp.asarray(ids), jnp.asarray(mask), 5)
    real = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(top_ids)[real], ref_ids[real])
    np.testing.assert_allclose(np.asarray(values)[real], ref_values[real], atol=1e-4)


def test_mixtral_plan_shards_experts(mixtral, capsys):
    folder, _ = mixtral
    result = plan(load_config(overrides=[f"target.path={folder}", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                         "train.batch_size=2", "train.seq_len=16"]))
    report = capsys.readouterr().out
    # [L, X, D, F] -> experts over tensor, embed over fsdp
    assert "layers.w_gate" in report and "[2, 4, 64, 96] -> [2, 2, 32, 96]" in report
    assert result["num_params"] > 2 * 4 * 3 * 64 * 96


def test_checkpoint_metadata_matches_its_model():
    """A training checkpoint's metadata (ModelConfig fields through JSON: tuples become lists) matches the
    model it was written for, so that a Gemma target resumes."""
    c = ModelConfig.from_hf({"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                             "eos_token_id": [1, 2]})
    meta = {"model": json.loads(json.dumps(dataclasses.asdict(c)))}
    check_architecture(meta, c, "here")
    assert ModelConfig(**meta["model"]) == c
