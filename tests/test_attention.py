"""The attention paths (``ModelConfig.attention_impl``) agree with the explicit one, logits and gradients in
float32, on a tiny parity config of every family, on a right-padded batch with a fully padded
row, longer than every sliding window and split into several query blocks; the chunked path's compiled
gradient holds no ``[B, H, T, T]`` float32 tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_families
import test_models
from flax import nnx

from fusejax.models import ModelConfig, Transformer
from fusejax.models.transformer import attention_impl

LENGTHS = (13, 9, 5, 0)  # 13 queries: blocks of 4 leave a partial last block; the last row is all padding
CHUNK = 4
# (config class, kwargs) of one parity case per family: Llama 3 RoPE scaling with GQA and tied embeddings, Qwen2 and
# Qwen3 with windows on some layers (lax.cond on the xla path), Phi-3 with a window on every layer, partial
# rotary (GPT-NeoX), ALiBi with 6 heads (MPT), learned positions (GPT-2), Gemma 2's soft-capped scores (no xla path)
# and alternating windows, Gemma 3's local RoPE
CASES = {
    **{name: test_families.CASES[name][::2] for name in ("llama3_tied", "qwen2_window", "qwen3_qk_norm",
                                                         "phi3_longrope_long", "gemma2", "gemma3_text")},
    **{name: test_models.CASES[name][::2] for name in ("gpt_neox_parallel", "mpt", "gpt2")},
}
IMPLS = ("explicit", "xla", "chunked")


def _batch(vocab: int):
    """ids, mask [len(LENGTHS), max(LENGTHS)] int32: random ids in [3, vocab), right-padded with id 0."""
    T = max(LENGTHS)
    mask = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    return np.random.default_rng(0).integers(3, vocab, (len(LENGTHS), T)).astype(np.int32) * mask, mask


@pytest.fixture(scope="module", params=list(CASES))
def paths(request):
    """(name, {impl: ((loss, logits [B, T, vocab]), gradients)}) of one family's tiny model with random N(0, 0.3)
    parameters (norm scales around 1, so that attention is far from uniform); the loss is the mean next-token
    cross-entropy over the real tokens. One compiled function for every path (compiling is the cost)."""
    config_cls, kwargs = CASES[request.param]
    config = ModelConfig.from_hf(config_cls(**kwargs).to_dict(), attention_chunk=CHUNK)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal("norm" in jax.tree_util.keystr(path), 0.3, x.shape), x.dtype),
        nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))))
    ids, mask = map(jnp.asarray, _batch(config.vocab_size))

    def loss_fn(params, graphdef):
        logits = nnx.merge(graphdef, params)(ids, mask)[..., :config.vocab_size]
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits

    impls = [impl for impl in IMPLS if impl != "xla" or config.attn_logit_softcap is None]
    graphdefs = {impl: nnx.graphdef(nnx.eval_shape(lambda i=impl: Transformer(
        config.replace(attention_impl=i), rngs=nnx.Rngs(0)))) for impl in impls}
    every_path = jax.jit(lambda params: {impl: jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef)
                                         for impl, graphdef in graphdefs.items()})
    return request.param, every_path(params)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_paths_agree_with_explicit(paths, impl):
    name, results = paths
    if impl not in results:
        pytest.skip("jax.nn.dot_product_attention cannot soft-cap scores")
    ((loss, logits), grads), ((loss2, logits2), grads2) = results["explicit"], results[impl]
    assert np.isfinite(np.asarray(logits2)).all()
    # at every position, padding included; relative to the largest value
    np.testing.assert_allclose(logits2, logits, rtol=0, atol=1e-5 * np.abs(logits).max(), err_msg=name)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads2), jax.tree.leaves(grads), strict=True):
        # + 1e-7: the key bias's gradient is zero up to rounding (softmax ignores a constant per query)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max() + 1e-7,
                                   err_msg=f"{name} {jax.tree_util.keystr(path)}")


def test_auto_is_chunked_beyond_one_block():
    config = test_models._tiny(attention_chunk=8)
    assert [attention_impl(config, T) for T in (1, 8, 9)] == ["xla", "xla", "chunked"]
    assert attention_impl(config.replace(attention_impl="explicit"), 9) == "explicit"


def test_chunked_gradient_holds_no_full_score_tensor():
    """XLA's memory analysis of a compiled forward + backward at T = 2048 (scores [1, 4, T, T] float32 = 64 MiB):
    the explicit path needs more temporaries than one score tensor, the chunked one (blocks of 128 queries) less
    than half of it (its temporaries grow linearly in T; BENCHMARKS.md has the figures)."""
    B, T, H = 1, 2048, 4
    scores = B * H * T * T * 4
    ids = jnp.zeros((B, T), jnp.int32)

    def temp_bytes(impl):
        config = test_models._tiny(num_heads=H, max_position_embeddings=T, attention_impl=impl, attention_chunk=128)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))

        def loss(state):
            return nnx.merge(graphdef, state)(ids)[..., 0].sum()

        return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("explicit") > scores
    assert temp_bytes("chunked") < scores / 2
