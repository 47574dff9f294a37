"""The model families beyond the first four against transformers (PyTorch), in float32, on tiny random models of
one size: Llama 3.x RoPE scaling and tied embeddings, Qwen2, Qwen3, Phi-3, an MPT folder as transformers writes
it, Gemma 2, Gemma 3 (text) and Mixtral.

Logit parity both ways (load theirs; export ours and load it in transformers) and the options each case turns
on; transformers v4 config layouts; RoPE frequencies against transformers' own functions on a real config; the
errors of the new config fields and tensors; for Mixtral the gradient of the loss, top-k extraction with the
experts sharded over the mesh, and `fusejax plan`. Every batch (:func:`tiny.parity_batch`) is right-padded and
longer than any sliding window, than ``max_position_embeddings`` for dynamic RoPE and than
``original_max_position_embeddings`` for LongRoPE's long factors.
"""

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

from fusejax.checkpoint import check_architecture
from fusejax.config import load_config
from fusejax.models import CheckpointError, ModelConfig, ModelConfigError, load_pretrained
from fusejax.models.hf_io import read_config
from fusejax.models.rope import RopeScaling, inv_freq
from fusejax.plan import plan_training
from fusejax.represent import extract_topk
from fusejax.sharding import make_mesh
from tiny import (PARITY_LENGTHS, PARITY_VOCAB, assert_close_at_tokens, check_export_parity, check_load_parity,
                  hf_logits, parity_batch, save_random_hf_model)

WINDOW = 3
assert max(PARITY_LENGTHS) > WINDOW
COMMON = dict(vocab_size=PARITY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# head_dim 16: 8 frequencies, wavelengths 6.3 ... 19869, so llama3 and yarn keep, scale and blend some of each
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, **COMMON)
GEMMA = dict(DECODER, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW)
LLAMA = (transformers.LlamaConfig, transformers.LlamaForCausalLM)


def _rope(rope_type, **params):
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **params}}


PHI3_ROPE = _rope("longrope", partial_rotary_factor=0.5, short_factor=[1.0, 1.3, 2.0, 3.5],
                  long_factor=[1.2, 2.5, 4.0, 9.0])
CASES = {
    "llama3_tied": (*LLAMA, dict(DECODER, tie_word_embeddings=True, **_rope(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256))),
    "llama_linear": (*LLAMA, dict(DECODER, **_rope("linear", factor=2.0))),
    "llama_dynamic": (*LLAMA, dict(DECODER, max_position_embeddings=8, **_rope("dynamic", factor=2.0))),
    "llama_yarn": (*LLAMA, dict(DECODER, **_rope("yarn", factor=4.0, original_max_position_embeddings=256))),
    "qwen2_window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3_qk_norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        DECODER, head_dim=24, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "phi3_longrope_long": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        DECODER, max_position_embeddings=32, original_max_position_embeddings=8, sliding_window=5, **PHI3_ROPE)),
    "phi3_longrope_short": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        DECODER, max_position_embeddings=64, original_max_position_embeddings=16, **PHI3_ROPE)),
    # transformers' MptForCausalLM builds a 4x MLP whatever expansion_ratio says, and saves expansion_ratio: 2
    "mpt_expansion_ratio_2": (transformers.MptConfig, transformers.MptForCausalLM, dict(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, expansion_ratio=2, **COMMON)),
    # soft-capping of scores and logits, alternating sliding/global layers (default pattern), tied embeddings
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        GEMMA, num_hidden_layers=3, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # q/k norms, a 2:1 local:global pattern, local and global RoPE bases, linear scaling on global layers
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        GEMMA, num_hidden_layers=4, sliding_window_pattern=3, attention_bias=True, tie_word_embeddings=False,
        final_logit_softcapping=3.0, rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # 4 experts, top-2 routing, sliding window on every layer
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        DECODER, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
}
# what each case turns on, as read from its folder (a case that silently dropped an option would still pass)
OPTIONS = {
    "llama3_tied": dict(tie_embeddings=True, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256)),
    "llama_linear": dict(rope_scaling=RopeScaling("linear", factor=2.0)),
    "llama_dynamic": dict(rope_scaling=RopeScaling("dynamic", factor=2.0), max_position_embeddings=8),
    "llama_yarn": dict(rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=256)),
    "qwen2_window": dict(sliding_layers=(False, True), attention_bias=True, attention_out_bias=False),
    "qwen3_qk_norm": dict(sliding_layers=(False, True), qk_norm=True, head_dim=24),
    "phi3_longrope_long": dict(sliding_layers=(True, True), rotary_dim=8, rope_scaling=RopeScaling(
        "longrope", short_factor=(1.0, 1.3, 2.0, 3.5), long_factor=(1.2, 2.5, 4.0, 9.0),
        original_max_position_embeddings=8)),
    "phi3_longrope_short": dict(sliding_layers=(False, False), rotary_dim=8),
    "mpt_expansion_ratio_2": dict(intermediate_size=4 * 32),
    "gemma2": dict(sliding_layers=(True, False, True), attn_logit_softcap=5.0, final_logit_softcap=3.0,
                   norm="rms_plus_one", post_norms=True, scale_embeddings=True, tie_embeddings=True,
                   activation="gelu_pytorch_tanh", softmax_scale=24**-0.5),
    "gemma3_text": dict(sliding_layers=(True, True, False, True), qk_norm=True, attention_bias=True,
                        rope_theta=100000.0, rope_local_theta=1000.0, rope_scaling=RopeScaling("linear", factor=4.0),
                        attn_logit_softcap=None, final_logit_softcap=3.0),
    "mixtral": dict(num_experts=4, experts_per_token=2, sliding_layers=(True, True)),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, model, reference logits) of that case's random HF model, saved once per module on first
    use."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(f"hf_{name}")
            model = save_random_hf_model(folder, *CASES[name])
            made[name] = folder, model, hf_logits(model, *parity_batch())
        return made[name]

    return get


@pytest.fixture(params=list(CASES))
def case(request, hf_models):
    """(name, HF model folder, HF model, reference logits) of one case."""
    return request.param, *hf_models(request.param)


def test_logits_match_transformers(case):
    name, folder, _, ref = case
    check_load_parity(folder, ref)


def test_save_then_transformers_loads(case, tmp_path):
    name, folder, _, ref = case
    check_export_parity(folder, ref, tmp_path, CASES[name][1])


def test_options_are_read(case):
    name, folder, _, _ = case
    c = read_config(folder)
    assert {key: getattr(c, key) for key in OPTIONS[name]} == OPTIONS[name]


def test_mpt_folder_with_its_own_expansion_ratio_loads(tmp_path):
    """A MosaicML-style MPT folder whose tensors follow expansion_ratio: 2 loads with a 2x MLP."""
    save_random_hf_model(tmp_path, *CASES["mpt_expansion_ratio_2"])
    tensors = load_file(tmp_path / "model.safetensors")
    for name in list(tensors):
        if ".ffn.up_proj." in name:
            tensors[name] = tensors[name][:64]
        elif ".ffn.down_proj." in name:
            tensors[name] = np.ascontiguousarray(tensors[name][:, :64])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert read_config(tmp_path).intermediate_size == 64
    assert load_pretrained(tmp_path).layers.w_up.get_value().shape == (2, 32, 64)


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
def test_v4_config_layout_loads(hf_models, name, edit, tmp_path):
    """A config.json hand-edited to the transformers v4 layout (layer pattern, rope fields) gives the same model."""
    folder, _, ref = hf_models(name)
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids, mask = parity_batch()
    assert_close_at_tokens(load_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask)), ref, mask)


@pytest.mark.parametrize("name,rope_fn", [("llama-3.1-8b", "_compute_llama3_parameters")])
def test_rope_of_real_configs_matches_transformers(shared_data, name, rope_fn):
    """The Llama 3.1 8B config (v4 layout: rope_scaling + top-level rope_theta) gives transformers' frequencies."""
    from transformers import modeling_rope_utils

    config = json.loads((shared_data / "model-configs" / name / "config.json").read_text())
    ours = read_config(shared_data / "model-configs" / name)
    assert ours.rope_scaling.original_max_position_embeddings == 8192 and ours.rope_theta == 500000.0
    ref, ref_attention = getattr(modeling_rope_utils, rope_fn)(transformers.AutoConfig.for_model(**config))
    freq, attention = inv_freq(ours.rotary_dim, ours.rope_theta, ours.rope_scaling, ours.max_position_embeddings, 1)
    np.testing.assert_allclose(freq, ref.numpy(), rtol=1e-6)
    assert attention == ref_attention


def test_qwen2_real_config_without_window(shared_data):
    """Qwen2.5-7B: use_sliding_window false, so no layer slides; 152064 embedding rows (151665 tokens)."""
    ours = read_config(shared_data / "model-configs" / "qwen2.5-7b")
    assert ours.sliding_layers == (False,) * 28 and ours.vocab_size == 152064 == ours.padded_vocab_size
    assert ours.attention_bias and not ours.attention_out_bias and ours.rope_theta == 1e6


def _write(folder, name, **changes):
    """config.json of case ``name`` with ``changes`` (None deletes a key) in ``folder``; returns the folder."""
    config_cls, _, kwargs = CASES[name]
    config = config_cls(**kwargs).to_dict()
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA3 = CASES["llama3_tied"][2]["rope_parameters"]
GEMMA3_ROPE = CASES["gemma3_text"][2]["rope_parameters"]


@pytest.mark.parametrize("name,changes,match", [
    ("llama3_tied", dict(rope_parameters={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     r"field 'rope_parameters': required field 'low_freq_factor' is missing"),
    ("llama_linear", dict(rope_parameters={"rope_type": "linear", "factor": "2"}),
     r"field 'rope_parameters': field 'factor'='2' has the wrong type"),
    ("llama_linear", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "mrope_section": [2, 2]}),
     r"field 'rope_parameters.mrope_section'=\[2, 2\] is not supported by fusejax with rope_type 'linear'"),
    ("phi3_longrope_long", dict(rope_parameters={**PHI3_ROPE["rope_parameters"], "short_factor": [1.0, 2.0]}),
     r"ModelConfig.rope_scaling.short_factor has 2 entries; expected rotary_dim // 2 = 4"),
    ("phi3_longrope_long", dict(rope_parameters={**PHI3_ROPE["rope_parameters"], "long_factor": [1, "x", 2, 3]}),
     r"field 'rope_parameters.long_factor'=\[1, 'x', 2, 3\] is not supported by fusejax \(expected a list of"),
    ("phi3_longrope_long", dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
     r"field 'rope_parameters'='linear' is not supported by fusejax \(phi3: only 'default' or 'longrope'\)"),
    ("qwen2_window", dict(layer_types=["full_attention", "local"]),
     r"field 'layer_types'=\['full_attention', 'local'\] is not supported by fusejax"),
    ("qwen2_window", dict(layer_types=["full_attention"]),
     r"ModelConfig.layer_types=\['full_attention'\]: expected num_layers=2 entries"),
    ("qwen2_window", dict(layer_types=None, max_window_layers=-1),
     r"field 'max_window_layers'=-1: expected an integer >= 0"),
    ("qwen3_qk_norm", dict(num_key_value_heads=3), r"ModelConfig: num_heads=4 is not a multiple of num_kv_heads=3"),
    ("qwen2_window", dict(hidden_act="swiglu"), r"field 'hidden_act'='swiglu' is not supported"),
    ("mixtral", dict(router_jitter_noise=0.1), r"field 'router_jitter_noise'=0.1 is not supported by fusejax"),
    ("gemma2", dict(use_bidirectional_attention=True),
     r"field 'use_bidirectional_attention'=True is not supported by fusejax"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     r"field 'layer_types'=\['sliding_attention', 'chunked_attention', 'full_attention'\] is not supported"),
    ("gemma3_text", dict(rope_parameters={**GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"field 'rope_parameters.sliding_attention'=.* is not supported by fusejax \(only rope_type 'default'\)"),
    ("gemma3_text", dict(rope_parameters={**GEMMA3_ROPE, "full_attention": {"rope_type": "mrope"}}),
     r"field 'rope_parameters.full_attention'=.* is not supported by fusejax \(rope_type 'mrope'"),
    ("gemma3_text", dict(rope_parameters=None, rope_scaling={"rope_type": "linear"}),
     r"field 'rope_scaling': required field 'factor' is missing"),
    # transformers' classes of these families rotate every dimension, whatever partial_rotary_factor says
    ("llama_linear", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
     r"field 'rope_parameters.partial_rotary_factor'=0.5 is not supported by fusejax \(transformers' llama class "
     r"rotates every dimension"),
    ("qwen2_window", dict(rope_parameters=None, rope_theta=1e4, partial_rotary_factor=0.5),
     r"field 'partial_rotary_factor'=0.5 is not supported by fusejax \(transformers' qwen2 class"),
    ("gemma2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
     r"field 'rope_parameters.partial_rotary_factor'=0.25 is not supported by fusejax \(transformers' gemma2"),
    ("gemma2", dict(query_pre_attn_scalar=0), r"field 'query_pre_attn_scalar'=0.0: expected a number > 0"),
    ("gemma3_text", dict(query_pre_attn_scalar=-4), r"field 'query_pre_attn_scalar'=-4.0: expected a number > 0"),
])
def test_bad_new_config_fields_name_file_and_field(tmp_path, name, changes, match):
    _write(tmp_path, name, **changes)
    with pytest.raises(ModelConfigError, match=re.escape(f"{tmp_path / 'config.json'}: ") + match):
        read_config(tmp_path)


@pytest.mark.parametrize("name,changes,match", [
    ("gemma2", dict(qk_norm=True), r"ModelConfig.qk_norm=True: model_type 'gemma2' needs False"),
    ("llama_linear", dict(rotary_dim=8), r"ModelConfig.rotary_dim=8: model_type 'llama' needs 16"),
    ("mixtral", dict(rotary_dim=8), r"ModelConfig.rotary_dim=8: model_type 'mixtral' needs 16"),
    ("mpt_expansion_ratio_2", dict(alibi_bias_max=4), r"ModelConfig.alibi_bias_max=4: model_type 'mpt' needs 8"),
    ("gemma3_text", dict(rope_local_theta=None), r"ModelConfig.rope_local_theta=None with rope_scaling="),
    ("llama_linear", dict(final_logit_softcap=30.0), r"ModelConfig.final_logit_softcap=30.0: model_type 'llama' "),
    ("mixtral", dict(num_experts=None), r"ModelConfig.num_experts=None: model_type 'mixtral' needs experts"),
])
def test_export_refuses_what_the_family_cannot_express(tmp_path, name, changes, match):
    config = read_config(_write(tmp_path, name)).replace(**changes)
    with pytest.raises(ModelConfigError, match=match):
        config.to_hf()


# the fields a config.json may leave out, which each family's transformers class fills with its own defaults
DEFAULTED = ("max_position_embeddings", "num_key_value_heads", "head_dim", "rope_parameters", "rope_theta",
             "rms_norm_eps", "sliding_window", "original_max_position_embeddings")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma2",
                                        "gemma3_text"])
def test_absent_fields_take_the_defaults_of_the_family_as_transformers_does(tmp_path, model_type):
    """A config.json with only the sizes: our config against the one transformers reads from the same file."""
    sizes = dict(model_type=model_type, vocab_size=100, hidden_size=512, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=32)
    (tmp_path / "config.json").write_text(json.dumps(sizes))
    theirs, ours = transformers.AutoConfig.from_pretrained(tmp_path), read_config(tmp_path)
    rope = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert (ours.max_position_embeddings, ours.num_kv_heads, ours.head_dim, ours.norm_eps) == (
        theirs.max_position_embeddings, theirs.num_key_value_heads, head_dim, theirs.rms_norm_eps)
    assert (ours.rope_theta, ours.rotary_dim) == (rope["rope_theta"], head_dim)
    assert ours.sliding_window == (theirs.sliding_window if any(ours.sliding_layers) else None)
    assert not set(DEFAULTED) & set(sizes)


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name,tensor", [
    ("phi3_longrope_long", "model.layers.1.self_attn.qkv_proj.weight"),
    ("phi3_longrope_long", "model.layers.1.mlp.gate_up_proj.weight"),
    ("qwen3_qk_norm", "model.layers.1.self_attn.q_norm.weight"),
    ("qwen2_window", "model.layers.1.self_attn.k_proj.bias"),
    ("gemma3_text", "model.layers.1.self_attn.k_norm.weight"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
])
def test_tensor_shapes_that_disagree_with_config_json(hf_models, tmp_path, name, tensor):
    folder = shutil.copytree(hf_models(name)[0], tmp_path / "ckpt")
    _edit_tensors(folder, lambda tensors: tensors.update({tensor: np.ascontiguousarray(tensors[tensor][:-1])}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(tensor)}' has shape .*, "
                                              rf"but .*config\.json implies"):
        load_pretrained(folder)


def test_missing_qk_norm_tensor_is_named(hf_models, tmp_path):
    folder = shutil.copytree(hf_models("qwen3_qk_norm")[0], tmp_path / "ckpt")
    _edit_tensors(folder, lambda tensors: tensors.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        load_pretrained(folder)


def _labels(ids, mask):
    """Next-token targets [B, T-1]; -100 where the next token is padding."""
    return np.where(mask[:, 1:] == 1, ids[:, 1:], -100)


def _loss(logits, labels):
    """Mean next-token cross-entropy of our logits [B, T, >= vocab] over targets >= 0 (the naive formula)."""
    logp = jax.nn.log_softmax(logits[:, :-1, :PARITY_VOCAB], axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(labels >= 0, picked, 0)) / jnp.sum(labels >= 0)


def test_mixtral_loss_gradient_matches_transformers(hf_models, tmp_path):
    """Training through the router and the experts: the loss and the gradient of every parameter equal
    torch's (its gradients written as a checkpoint and read back through the same weight map)."""
    folder, hf, _ = hf_models("mixtral")
    ids, mask = parity_batch()
    labels = _labels(ids, mask)
    hf.zero_grad()
    logits = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, PARITY_VOCAB),
                                                 torch.from_numpy(labels).long().reshape(-1), ignore_index=-100)
    ref_loss.backward()
    hf.save_pretrained(tmp_path, state_dict={name: p.grad for name, p in hf.named_parameters()})
    hf.zero_grad()
    ref_grads = nnx.state(load_pretrained(tmp_path), nnx.Param)

    loss_and_grads = nnx.jit(nnx.value_and_grad(lambda m: _loss(m(jnp.asarray(ids), jnp.asarray(mask)), labels)))
    loss, grads = loss_and_grads(load_pretrained(folder))
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-6)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        ref = np.asarray(flat_ref[path].get_value())
        assert np.abs(ref).max() > 0, path  # every parameter is trained, each expert included
        np.testing.assert_allclose(np.asarray(g.get_value()), ref, atol=1e-6, rtol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("name", ["mixtral", "gemma2"])
def test_topk_on_a_mesh_matches_transformers(hf_models, name):
    """Top-k extraction (the represent stage's, through head_logits: Gemma 2's logits soft-capped) equals
    transformers' on a (1, 2, 2) mesh (Mixtral: the experts split over the tensor axis)."""
    folder, _, ref = hf_models(name)
    ids, mask = parity_batch()
    ref_values, ref_ids = (x.numpy() for x in torch.topk(torch.from_numpy(ref), 5, dim=-1))
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    model = load_pretrained(folder, mesh=mesh)
    with jax.set_mesh(mesh):
        values, top_ids, _, _ = extract_topk(model, jnp.asarray(ids), jnp.asarray(mask), 5)
    real = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(top_ids)[real], ref_ids[real])
    np.testing.assert_allclose(np.asarray(values)[real], ref_values[real], atol=1e-4)


def test_mixtral_plan_shards_experts():
    """`fusejax plan`'s train step (forward, backward, AdamW) compiles for a Mixtral with the experts over the
    tensor axis and their MLP inputs over fsdp (one tiny layer: the compile is what costs)."""
    c = ModelConfig.from_hf({"model_type": "mixtral", "vocab_size": 200, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "num_local_experts": 4})
    tc = load_config(overrides=["train.batch_size=2", "train.seq_len=8"]).train
    result = plan_training(c, tc, make_mesh(1, 2, 2, devices=jax.devices()[:4]))
    shardings = {name: (shape, local, spec) for name, shape, local, spec in result["shardings"]}
    # [L, X, D, F] -> experts over tensor, embed over fsdp; the experts' MLP units stay whole
    assert shardings["layers.w_gate"] == ((1, 4, 32, 64), (1, 2, 16, 64), PartitionSpec(None, "tensor", "fsdp", None))
    assert shardings["layers.w_down"] == ((1, 4, 64, 32), (1, 2, 64, 16), PartitionSpec(None, "tensor", None, "fsdp"))
    # embed and lm_head (vocab padded to 256), final norm; per layer: 2 norms, q/o, k/v, router, 4 x 3 expert MLPs
    assert result["num_params"] == 2 * 256 * 32 + 32 + 2 * 32 + 2 * 32 * 32 + 2 * 32 * 16 + 32 * 4 + 4 * 3 * 32 * 64
    assert result["memory"]["peak_bytes"] > 0


@pytest.mark.parametrize("name", ["gemma3_text", "phi3_longrope_long"])
def test_checkpoint_metadata_matches_its_model(tmp_path, name):
    """A training checkpoint's metadata (ModelConfig fields through JSON: tuples become lists, RoPE scaling a
    dict) matches the model it was written for and rebuilds its config, so that such a target resumes and
    exports."""
    c = read_config(_write(tmp_path, name, eos_token_id=[1, 2]))
    meta = {"model": json.loads(json.dumps(dataclasses.asdict(c)))}
    check_architecture(meta, c, "here")
    assert ModelConfig(**meta["model"]) == c
