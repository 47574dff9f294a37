"""Checkpoint I/O: bad input raises a clear error naming the file and field/tensor; bf16 and sharded files work."""

import copy
import json
import pickle
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from fusejax.models import CheckpointError, ModelConfig, ModelConfigError, load_pretrained, save_pretrained
from fusejax.models.hf_io import read_config

LLAMA = dict(vocab_size=130, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(folder, HF model): a tiny random Llama saved as config.json + model.safetensors."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def ckpt(hf_llama, tmp_path):
    """A private copy of the tiny Llama checkpoint folder, free to break."""
    return shutil.copytree(hf_llama[0], tmp_path / "ckpt")


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _params(model):
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*missing"):
        load_pretrained(ckpt)


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_pretrained(ckpt)


def test_index_lists_missing_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    match = r"index\.json: lists model-00001-of-00002\.safetensors, which is missing"
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(ckpt)


@pytest.mark.parametrize("where", ["../outside/x.safetensors", "sub/../../x.safetensors", "absolute"])
def test_index_entry_outside_the_folder_is_refused(ckpt, tmp_path, where):
    (tmp_path / "outside").mkdir()
    shutil.move(ckpt / "model.safetensors", tmp_path / "outside" / "x.safetensors")
    file = str(tmp_path / "outside" / "x.safetensors") if where == "absolute" else where
    index = {"metadata": {}, "weight_map": dict.fromkeys(load_file(tmp_path / "outside" / "x.safetensors"), file)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    match = rf"index\.json: weight_map entry '.*': '{file}' is not a file inside {ckpt}"
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(ckpt)


def test_index_entry_that_is_a_link_inside_the_folder_loads(ckpt, tmp_path, hf_llama):
    """A snapshot folder of the Hugging Face cache links its files to blobs elsewhere: that is fine."""
    (tmp_path / "blobs").mkdir()
    shutil.move(ckpt / "model.safetensors", tmp_path / "blobs" / "abc")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "w.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    index = {"metadata": {}, "weight_map": dict.fromkeys(load_file(tmp_path / "blobs" / "abc"), "sub/w.safetensors")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_pretrained(ckpt)
    assert model.config.num_layers == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(ckpt, damage):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=rf"{file}: not a readable safetensors file"):
        load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    match = r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' is missing"
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(ckpt)


def test_shape_disagrees_with_config(ckpt):
    _edit_config(ckpt, intermediate_size=64)
    match = (r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(32, 48\), "
             r"but .*config\.json implies \(32, 64\)")
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(ckpt)


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="bloom"), r"config\.json: model_type='bloom' is not supported"),
    (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "factor": 4.0}),
     r"config\.json: field 'rope_parameters'.*proportional"),
    (dict(rope_parameters=None, rope_scaling={"type": "su", "factor": 2.0}),
     r"config\.json: field 'rope_scaling'.*su"),
    (dict(hidden_act="swish_glu"), r"config\.json: field 'hidden_act'='swish_glu' is not supported"),
    (dict(num_hidden_layers=None), r"config\.json: required field 'num_hidden_layers' is missing"),
    (dict(hidden_size="64"), r"config\.json: field 'hidden_size'='64' has the wrong type"),
])
def test_bad_config(ckpt, changes, match):
    _edit_config(ckpt, **changes)
    with pytest.raises(ModelConfigError, match=match):
        load_pretrained(ckpt)


@pytest.mark.parametrize("arch, field, value", [
    ("llama", "num_key_value_heads", 0), ("llama", "num_attention_heads", 0), ("llama", "hidden_size", -32),
    ("llama", "head_dim", 0), ("llama", "num_hidden_layers", 0), ("llama", "max_position_embeddings", 0),
    ("gpt_neox", "num_attention_heads", 0), ("gpt_neox", "intermediate_size", -1), ("mpt", "n_heads", 0),
    ("mpt", "expansion_ratio", 0), ("gpt2", "n_head", 0), ("gpt2", "n_positions", -5),
])
def test_zero_or_negative_sizes_in_config_json(tmp_path, arch, field, value):
    configs = {"llama": transformers.LlamaConfig(**LLAMA), "gpt_neox": transformers.GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=100),
        "mpt": transformers.MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=100),
        "gpt2": transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=100)}
    config = {**configs[arch].to_dict(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    match = rf"{tmp_path / 'config.json'}: field '{field}'={value}: expected a positive integer"
    with pytest.raises(ModelConfigError, match=match):
        read_config(tmp_path)


CLASSIC_CONFIGS = {  # model_type -> transformers' config class and tiny sizes
    "gpt_neox": (transformers.GPTNeoXConfig, dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                                  intermediate_size=64, vocab_size=100)),
    "mpt": (transformers.MptConfig, dict(d_model=32, n_heads=4, n_layers=2, vocab_size=100)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_head=4, n_layer=2, vocab_size=100)),
}


@pytest.mark.parametrize("model_type,changes,field", [
    ("gpt_neox", dict(final_logit_softcap=30.0), "final_logit_softcap"),
    ("gpt_neox", dict(post_norms=True), "post_norms"),
    ("gpt_neox", dict(sliding_window=8, layer_types=("sliding_attention", "full_attention")), "sliding_window"),
    ("gpt_neox", dict(num_kv_heads=2), "num_kv_heads"),
    ("gpt_neox", dict(qk_norm=True), "qk_norm"),
    ("gpt_neox", dict(norm="rms"), "norm"),
    ("mpt", dict(num_experts=4, mlp="gated", mlp_bias=False), "num_experts"),
    ("mpt", dict(attn_logit_softcap=50.0), "attn_logit_softcap"),
    ("mpt", dict(head_dim=16), "head_dim"),
    ("mpt", dict(parallel_residual=True), "parallel_residual"),
    ("gpt2", dict(scale_embeddings=True), "scale_embeddings"),
    ("gpt2", dict(rope_local_theta=1e4), "rope_local_theta"),
    ("gpt2", dict(softmax_scale=0.5), "softmax_scale"),
    ("gpt2", dict(attention_out_bias=False), "attention_out_bias"),
])
def test_classic_writers_refuse_fields_they_cannot_express(model_type, changes, field):
    """GPT-NeoX, MPT and GPT-2 configs read from transformers' own write back as they were; with a field their
    config.json has no place for, to_hf refuses in one line naming that field (no config of another model)."""
    cls, sizes = CLASSIC_CONFIGS[model_type]
    config = ModelConfig.from_hf(cls(**sizes).to_dict())
    assert ModelConfig.from_hf(config.to_hf()) == config
    with pytest.raises(ModelConfigError, match=rf"^ModelConfig\.{field}=.*: model_type '{model_type}' needs"):
        config.replace(**changes).to_hf()


def test_model_config_refuses_zero_sizes():
    base = dict(arch="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)
    for field in ("num_kv_heads", "head_dim", "max_position_embeddings"):
        with pytest.raises(ModelConfigError, match=f"ModelConfig.{field}=0: expected a positive integer"):
            ModelConfig(**base, **{field: 0})


def test_a_gemma_model_config_names_its_model_type():
    """arch 'gemma' is two Hugging Face model types; without one of them the config could not be saved."""
    with pytest.raises(ModelConfigError, match=r"ModelConfig.model_type=None: arch 'gemma' needs one of "
                                               r"\['gemma2', 'gemma3_text'\]"):
        ModelConfig(arch="gemma", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


@pytest.mark.parametrize("field,value", [
    ("attn_config.clip_qkv", 6.0), ("attn_config.qk_ln", True), ("attn_config.prefix_lm", True),
    ("attn_config.alibi", False), ("logit_scale", 0.5), ("no_bias", False),
    ("attn_config.alibi_bias_max", 4),  # transformers' MPT always uses 8
])
def test_unsupported_mpt_options(tmp_path, field, value):
    config = transformers.MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=100).to_dict()
    if field.startswith("attn_config."):
        config["attn_config"][field.split(".")[1]] = value
    else:
        config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=rf"config\.json: field '{field}'={value!r} is not supported"):
        load_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused_not_unpickled(tmp_path, hf_llama):
    shutil.copy(hf_llama[0] / "config.json", tmp_path / "config.json")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    match = r"only pickle checkpoints \['pytorch_model\.bin'\]; fusejax never unpickles"
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(tmp_path)
    assert not marker.exists()


def test_bfloat16_checkpoint_loads_exact_values(hf_llama, tmp_path):
    folder, model = hf_llama
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype="bfloat16")
    assert ours.embed.get_value().dtype == jnp.bfloat16
    ref = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(ours.embed.get_value(), np.float32)[:130], ref)
    ref_q = model.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(ours.layers.wq.get_value(), np.float32)[1].reshape(32, 32), ref_q.T)
    # and written back as bfloat16 that transformers reads
    save_pretrained(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(back.model.embed_tokens.weight.float().detach().numpy(), ref)


def test_sharded_save_and_load(hf_llama, tmp_path):
    folder, model = hf_llama
    ours = load_pretrained(folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # an earlier single-file save must disappear
    save_pretrained(ours, out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "config.json", "model.safetensors.index.json"])
    reloaded = _params(load_pretrained(out))
    for name, value in _params(ours).items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.state_dict().items():
        np.testing.assert_array_equal(hf.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_a_folder_with_both_forms_is_read_as_transformers_reads_it(hf_llama, tmp_path):
    """model.safetensors beside an index and its shards: transformers reads model.safetensors, and so do we."""
    folder, model = hf_llama
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(tmp_path, max_shard_size="20KB")
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    ids = np.arange(3, 19)[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids)))[..., :130], ref, atol=1e-4)


def test_a_switch_to_shards_cut_short_leaves_no_stale_single_file(hf_llama, tmp_path, monkeypatch):
    """Saving shards over a single-file folder: the old model.safetensors, which would be read before the new
    index, is gone before the index is written."""
    from fusejax.models import hf_io

    ours = load_pretrained(hf_llama[0])
    save_pretrained(ours, tmp_path)
    real = hf_io.atomic_write

    def cut_at_index(path, data):
        if path.name == "model.safetensors.index.json":
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(hf_io, "atomic_write", cut_at_index)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(ours, tmp_path, max_shard_bytes=20_000)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_a_weight_that_is_not_floating_point_is_refused(ckpt, dtype):
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = (tensors[name] * 1000).astype(dtype)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    tag = "I32" if dtype is np.int32 else "BOOL"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has dtype {tag}; model weights "
                                              "must be floating point"):
        load_pretrained(ckpt)


def test_tied_config_over_a_distinct_output_projection_loads_untied_as_transformers_does(hf_llama, tmp_path):
    """config.json says tie_word_embeddings, but the folder holds an lm_head.weight of its own: transformers
    keeps it (untied); we do the same, with a warning, and export the model untied."""
    folder, model = hf_llama
    ckpt = shutil.copytree(folder, tmp_path / "ckpt")
    _edit_config(ckpt, tie_word_embeddings=True)
    ids = np.arange(3, 19)[None]
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(torch.from_numpy(ids)).logits.numpy()
    with pytest.warns(UserWarning, match=r"ties the embeddings, but 'lm_head\.weight' differs from "
                                         r"'model\.embed_tokens\.weight'; loading them untied"):
        ours = load_pretrained(ckpt)
    assert not ours.config.tie_embeddings
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)))[..., :130], ref, atol=1e-4)
    save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_tied_config_with_an_equal_output_projection_stays_tied(hf_llama, tmp_path):
    folder, _ = hf_llama
    ckpt = shutil.copytree(folder, tmp_path / "ckpt")
    _edit_config(ckpt, tie_word_embeddings=True)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_pretrained(ckpt).config.tie_embeddings


def test_loads_hf_sharded_checkpoint(hf_llama, tmp_path):
    folder, model = hf_llama
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    np.testing.assert_array_equal(
        np.asarray(load_pretrained(tmp_path).layers.w_down.get_value())[1],
        model.model.layers[1].mlp.down_proj.weight.detach().numpy().T,
    )


def test_gpt2_without_transformer_prefix(tmp_path):
    """Hub GPT-2 checkpoints name tensors 'h.0.attn.c_attn.weight' (no 'transformer.' prefix)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    ours = load_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(ours.pos_embed.get_value()), model.transformer.wpe.weight.detach().numpy())


def test_safetensors_fingerprint_samples_large_files(tmp_path):
    """Above 1 MiB of data: header, size and 16 windows; the first and last data bytes are in windows."""
    from fusejax.models.hf_io import safetensors_fingerprint

    path = tmp_path / "w.safetensors"
    save_file({"w": np.zeros((1024, 1024), np.float32)}, str(path))  # 4 MiB of data
    base = safetensors_fingerprint(path)
    data = bytearray(path.read_bytes())
    for where in (8 + int.from_bytes(data[:8], "little"), len(data) - 1):
        edited = bytearray(data)
        edited[where] ^= 1
        path.write_bytes(bytes(edited))
        assert safetensors_fingerprint(path) != base
    path.write_bytes(bytes(data))
    assert safetensors_fingerprint(path) == base


def test_unused_tensor_warns(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    match = r"1 tensors not used by the model: \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"
    with pytest.warns(UserWarning, match=match):
        load_pretrained(ckpt)
