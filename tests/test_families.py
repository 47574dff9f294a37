"""Parity of today's families with transformers (PyTorch) both ways, in float32, on tiny random configs: Llama 3.x
RoPE scaling and tied embeddings, Qwen2, Qwen3, Phi-3 and an MPT folder as transformers writes it; RoPE frequencies
against transformers' own functions on the real 8B configs; and the errors of their new config fields.

Every batch is right-padded and longer than any sliding window, than ``max_position_embeddings`` for dynamic
RoPE and than ``original_max_position_embeddings`` for LongRoPE's long factors.
"""

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file
from tiny import assert_close_at_tokens, hf_logits, padded_batch, random_hf_model

from fusejax.models import CheckpointError, ModelConfigError, load_pretrained, save_pretrained
from fusejax.models.hf_io import read_config
from fusejax.models.rope import inv_freq

VOCAB = 300  # not a multiple of 128: the embedding is padded to 384
LENGTHS = (12, 9, 5, 1)
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# head_dim 16: 8 frequencies, wavelengths 6.3 ... 19869, so llama3 and yarn keep, scale and blend some of each
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, **COMMON)
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
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF model folder, reference logits) of one random tiny HF model."""
    name = request.param
    model = random_hf_model(*CASES[name])
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return name, folder, hf_logits(model, *padded_batch(VOCAB, LENGTHS))


def test_logits_match_transformers(case):
    name, folder, ref = case
    ids, mask = padded_batch(VOCAB, LENGTHS)
    logits = load_pretrained(folder)(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (*ids.shape, 384)
    assert_close_at_tokens(logits, ref, mask)


def test_save_then_transformers_loads(case, tmp_path):
    name, folder, ref = case
    ids, mask = padded_batch(VOCAB, LENGTHS)
    save_pretrained(load_pretrained(folder), tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == CASES[name][1].__name__
    assert_close_at_tokens(hf_logits(hf.eval(), ids, mask), ref, mask)


def test_mpt_folder_with_its_own_expansion_ratio_loads(tmp_path):
    """A MosaicML-style MPT folder whose tensors follow expansion_ratio: 2 loads with a 2x MLP."""
    hf = random_hf_model(*CASES["mpt_expansion_ratio_2"])
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for name in list(tensors):
        if ".ffn.up_proj." in name:
            tensors[name] = tensors[name][:64]
        elif ".ffn.down_proj." in name:
            tensors[name] = np.ascontiguousarray(tensors[name][:, :64])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert read_config(tmp_path).intermediate_size == 64
    assert load_pretrained(tmp_path).layers.w_up.get_value().shape == (2, 32, 64)


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
])
def test_bad_new_config_fields_name_file_and_field(tmp_path, name, changes, match):
    _write(tmp_path, name, **changes)
    with pytest.raises(ModelConfigError, match=re.escape(f"{tmp_path / 'config.json'}: ") + match):
        read_config(tmp_path)


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name,tensor", [
    ("phi3_longrope_long", "model.layers.1.self_attn.qkv_proj.weight"),
    ("phi3_longrope_long", "model.layers.1.mlp.gate_up_proj.weight"),
    ("qwen3_qk_norm", "model.layers.1.self_attn.q_norm.weight"),
    ("qwen2_window", "model.layers.1.self_attn.k_proj.bias"),
])
def test_tensor_shapes_that_disagree_with_config_json(case_folders, tmp_path, name, tensor):
    folder = shutil.copytree(case_folders(name), tmp_path / "ckpt")
    _edit_tensors(folder, lambda tensors: tensors.update({tensor: np.ascontiguousarray(tensors[tensor][:-1])}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(tensor)}' has shape .*, "
                                              rf"but .*config\.json implies"):
        load_pretrained(folder)


def test_missing_qk_norm_tensor_is_named(case_folders, tmp_path):
    folder = shutil.copytree(case_folders("qwen3_qk_norm"), tmp_path / "ckpt")
    _edit_tensors(folder, lambda tensors: tensors.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        load_pretrained(folder)


@pytest.fixture(scope="module")
def case_folders(tmp_path_factory):
    """name -> folder of that case's random HF model, saved once per module on first use."""
    folders = {}

    def get(name):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(f"hf_{name}")
            random_hf_model(*CASES[name]).save_pretrained(folders[name])
        return folders[name]

    return get
