"""Parity of fusejax.models with Hugging Face transformers (PyTorch) on tiny random models, in float32.

For every architecture: a random HF model -> save_pretrained -> fusejax load_pretrained -> same logits on a
right-padded batch; fusejax save_pretrained -> transformers loads it -> same logits again.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from fusejax.models import ModelConfig, Transformer, load_pretrained
from tiny import (PARITY_VOCAB, assert_close_at_tokens, check_export_parity, check_load_parity, hf_logits,
                  parity_batch, save_random_hf_model)

VOCAB = PARITY_VOCAB
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, **COMMON)
NEOX = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, hidden_act="gelu", **COMMON)
CASES = {
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LLAMA, num_key_value_heads=2)),
    "llama_bias_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        LLAMA, num_key_value_heads=1, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        LLAMA, num_key_value_heads=2, sliding_window=3)),
    "gpt_neox_parallel": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict(
        NEOX, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gpt_neox_sequential": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict(
        NEOX, use_parallel_residual=False, hidden_act="gelu_new")),
    "mpt": (transformers.MptConfig, transformers.MptForCausalLM, dict(
        d_model=48, n_heads=6, n_layers=2, max_seq_len=64, **COMMON)),  # 6 heads: non-power-of-two ALiBi slopes
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **COMMON)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF model folder, reference logits) for one random tiny HF model whose every weight is perturbed."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    model = save_random_hf_model(folder, *CASES[name])
    return name, folder, hf_logits(model, *parity_batch())


def test_logits_match_transformers(case):
    name, folder, ref = case
    check_load_parity(folder, ref)


def test_save_then_transformers_loads(case, tmp_path):
    name, folder, ref = case
    check_export_parity(folder, ref, tmp_path, CASES[name][1])


@pytest.mark.parametrize("name,edit", [
    ("llama_gqa", lambda c: c.update(rope_theta=c.pop("rope_parameters")["rope_theta"], rope_scaling=None)),
    ("gpt_neox_parallel", lambda c: c.update(rotary_emb_base=c["rope_parameters"]["rope_theta"],
                                             rotary_pct=c.pop("rope_parameters")["partial_rotary_factor"])),
])
def test_v4_config_layout_loads(name, edit, tmp_path_factory):
    """A config.json hand-edited to the transformers v4 layout gives the same model."""
    folder = tmp_path_factory.mktemp(f"v4_{name}")
    model = save_random_hf_model(folder, *CASES[name], seed=1)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    assert "rope_parameters" not in config
    (folder / "config.json").write_text(json.dumps(config))
    ids, mask = parity_batch()
    logits = load_pretrained(folder)(jnp.asarray(ids), jnp.asarray(mask))
    assert_close_at_tokens(logits, hf_logits(model, ids, mask), mask)


def _tiny(**kw):
    return ModelConfig(**{**dict(arch="llama", vocab_size=200, hidden_size=32, intermediate_size=48, num_layers=2,
                                 num_heads=4, num_kv_heads=2), **kw})


@pytest.fixture(scope="module")
def tiny():
    return Transformer(_tiny(), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, ids, mask=None):
    return model(ids, mask)


def test_fully_padded_row_is_finite(tiny):
    ids = jnp.zeros((2, 6), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert np.isfinite(np.asarray(_forward(tiny, ids, mask))[..., :200]).all()


def test_padding_does_not_change_token_logits(tiny):
    """Logits at real tokens do not depend on the ids at padded positions (the padding mask is applied)."""
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0]])
    a, b = _forward(tiny, ids, mask), _forward(tiny, ids.at[0, 4:].set(3), mask)
    np.testing.assert_array_equal(np.asarray(a)[:, :4], np.asarray(b)[:, :4])
    changed_token = _forward(tiny, ids.at[0, 2].set(3))
    assert not np.allclose(np.asarray(_forward(tiny, ids))[:, :4], np.asarray(changed_token)[:, :4])


def test_remat_policies_give_same_loss_and_grads():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 8)), jnp.int32)

    @nnx.jit
    def loss_and_grad(m):
        return nnx.value_and_grad(lambda m: jax.nn.log_softmax(m(ids)[..., :200]).mean())(m)

    l0, g0 = loss_and_grad(Transformer(_tiny(), rngs=nnx.Rngs(0)))
    for remat in ("full", "dots", "dots_no_batch"):
        l1, g1 = loss_and_grad(Transformer(_tiny(remat=remat), rngs=nnx.Rngs(0)))
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_params_carry_logical_axes_and_are_stacked(tiny):
    for path, var in nnx.to_flat_state(nnx.state(tiny, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, path
        if path[0] == "layers":
            assert axes[0] == "layers" and var.get_value().shape[0] == 2, path
    assert tiny.embed.get_value().shape == (256, 32)
    np.testing.assert_array_equal(np.asarray(tiny.embed.get_value())[200:], 0)


def test_sliding_window_limits_attention():
    """One layer with window 2: position 5 sees positions 4 and 5 only, position 4 sees 3 and 4."""
    model = Transformer(_tiny(num_layers=1, sliding_window=2), rngs=nnx.Rngs(0))
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    a, b = np.asarray(_forward(model, ids)), np.asarray(_forward(model, ids.at[0, :4].set(3)))
    np.testing.assert_array_equal(a[0, 5], b[0, 5])
    assert not np.allclose(a[0, 4], b[0, 4])


def test_bfloat16_compute_stays_close_and_returns_float32(tiny):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 200, (2, 8)), jnp.int32)
    low = Transformer(_tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    ref, out = np.asarray(_forward(tiny, ids))[..., :200], _forward(low, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[..., :200], ref, atol=2e-2)
