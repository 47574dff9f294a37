"""The attention paths (``ModelConfig.attention_impl``) agree with the explicit one, logits and gradients in
float32, on a tiny parity config of every family, on a right-padded batch with a fully padded
row, longer than every sliding window and split into several query blocks; the chunked path's compiled
gradient holds no ``[B, H, T, T]`` float32 tensor. The cudnn path: which path ``auto`` picks on each backend,
the models cuDNN cannot serve, its arguments checked without a GPU (its calls computed by XLA), and on a GPU
its logits, loss and gradients against the explicit path in bfloat16."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_families
import test_models
from flax import nnx

from fusejax.models import ModelConfig, ModelConfigError, Transformer
from fusejax.models import transformer
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
HALF, HALF_TOL = "bfloat16", 2e-2  # the cudnn path's dtype; max |difference| / max |value| of bfloat16 results


def _batch(vocab: int):
    """ids, mask [len(LENGTHS), max(LENGTHS)] int32: random ids in [3, vocab), right-padded with id 0."""
    T = max(LENGTHS)
    mask = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    return np.random.default_rng(0).integers(3, vocab, (len(LENGTHS), T)).astype(np.int32) * mask, mask


def _config(name: str, **overrides) -> ModelConfig:
    """The model config of parity case ``name`` (queries in blocks of CHUNK), with ``overrides``."""
    config_cls, kwargs = CASES[name]
    return ModelConfig.from_hf(config_cls(**kwargs).to_dict(), attention_chunk=CHUNK, **overrides)


CUDNN_CASES = [name for name in CASES if _config(name, dtype=HALF).cudnn_refusal() is None]


def _every_path(config: ModelConfig, impls, *, grads: bool) -> dict:
    """{impl: (loss, logits [B, T, vocab] float32)} of ``config``'s tiny model with each attention path, or with
    ``grads`` {impl: ((loss, logits), gradients)}; random N(0, 0.3) parameters (norm scales around 1, so that
    attention is far from uniform), the batch of :func:`_batch`; the loss is the mean next-token cross-entropy
    over the real tokens. One compiled function for every path (compiling is the cost)."""
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

    run = jax.value_and_grad(loss_fn, has_aux=True) if grads else loss_fn
    graphdefs = {impl: nnx.graphdef(nnx.eval_shape(lambda i=impl: Transformer(
        config.replace(attention_impl=i), rngs=nnx.Rngs(0)))) for impl in impls}
    return jax.jit(lambda params: {impl: run(params, graphdef) for impl, graphdef in graphdefs.items()})(params)


@pytest.fixture(scope="module", params=list(CASES))
def paths(request):
    """(name, {impl: ((loss, logits [B, T, vocab]), gradients)}) of one family's tiny model in float32."""
    config = _config(request.param)
    impls = [impl for impl in IMPLS if impl != "xla" or config.attn_logit_softcap is None]
    return request.param, _every_path(config, impls, grads=True)


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


def _at_tokens(x) -> np.ndarray:
    """x [len(LENGTHS), max(LENGTHS), ...] at the real (unpadded) tokens: [sum(LENGTHS), ...]."""
    return np.asarray(x, np.float32)[np.arange(max(LENGTHS))[None, :] < np.asarray(LENGTHS)[:, None]]


def _assert_half_close(a, b, err_msg: str):
    """Arrays that agree within bfloat16 rounding, relative to the largest value of ``b``."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=HALF_TOL * np.abs(b).max(), err_msg=err_msg)


@pytest.mark.parametrize("where,overrides,T,expected", [
    ("cpu", {}, 8, "xla"),
    ("cpu", {}, 9, "chunked"),
    ("cpu", dict(attn_logit_softcap=5.0), 8, "explicit"),
    ("cpu", dict(attention_impl="explicit"), 9, "explicit"),
    ("cuda", dict(dtype="bfloat16"), 9, "cudnn"),
    ("cuda", dict(dtype="float16"), 8, "cudnn"),
    ("cuda", dict(dtype="bfloat16", attention_impl="cudnn"), 9, "cudnn"),
    ("cuda", dict(dtype="bfloat16", attention_impl="xla"), 8, "xla"),
    ("cuda", {}, 8, "xla"),  # float32
    ("cuda", {}, 9, "chunked"),
    ("cuda", dict(dtype="bfloat16", attn_logit_softcap=5.0), 8, "explicit"),
    ("cuda", dict(dtype="bfloat16", position="alibi"), 9, "chunked"),
    ("cuda", dict(dtype="bfloat16", head_dim=12), 8, "xla"),
    ("cuda", dict(dtype="bfloat16", head_dim=264), 8, "xla"),
    ("rocm", dict(dtype="bfloat16"), 9, "chunked"),
])
def test_attention_impl_picks(monkeypatch, where, overrides, T, expected):
    """``auto`` takes cudnn only on an NVIDIA GPU and for a model cuDNN serves; else chunked beyond one block of
    attention_chunk = 8 queries, else xla, or explicit for soft-capped scores; other settings stay as set."""
    monkeypatch.setattr(transformer, "platform", lambda: where)
    assert attention_impl(test_models._tiny(attention_chunk=8, **overrides), T) == expected


@pytest.mark.parametrize("overrides,reason", [
    (dict(dtype="float32"), "dtype='float32': cuDNN attention runs in bfloat16 or float16 only"),
    (dict(attn_logit_softcap=5.0), "attn_logit_softcap=5.0: cuDNN cannot soft-cap scores"),
    (dict(position="alibi"), "position='alibi'"),
    (dict(head_dim=12), "head_dim=12: cuDNN needs a multiple of 8, at most 256"),
    (dict(head_dim=264), "head_dim=264"),
])
def test_cudnn_refuses_what_it_cannot_serve(overrides, reason):
    with pytest.raises(ModelConfigError, match=re.escape(f"ModelConfig.attention_impl='cudnn': {reason}")):
        test_models._tiny(**{"dtype": "bfloat16", "attention_impl": "cudnn", **overrides})


@pytest.mark.parametrize("where", ["tpu", "rocm"])
def test_cudnn_needs_an_nvidia_gpu(monkeypatch, where):
    monkeypatch.setattr(transformer, "platform", lambda: where)
    with pytest.raises(ValueError, match=re.escape(f"attention_impl='cudnn' needs an NVIDIA GPU; this platform is "
                                                   f"'{where}'")):
        attention_impl(test_models._tiny(dtype="bfloat16", attention_impl="cudnn"), 8)


@pytest.mark.parametrize("name", ["llama3_tied", "phi3_longrope_long", "gemma3_text"])
def test_cudnn_arguments_are_the_explicit_paths(name, monkeypatch):
    """Without a GPU: the cudnn path's calls of ``jax.nn.dot_product_attention`` are recorded and computed by
    its XLA implementation with the same arguments (sequence lengths instead of a mask; causal, window and
    scale as given). They carry the rows' lengths, and give the explicit path's logits at every real token
    within bfloat16 rounding. Cases: grouped-query attention, all layers global (Llama 3); all sliding
    (Phi-3); sliding and global layers under ``lax.cond``, ``softmax_scale`` from query_pre_attn_scalar
    (Gemma 3); the GPU test below takes them all."""
    real, lengths = jax.nn.dot_product_attention, []

    def recorded(*args, implementation, **kwargs):
        assert implementation == "cudnn" and args[0].dtype == jnp.bfloat16 and "mask" not in kwargs
        jax.debug.callback(lambda q, k: lengths.append((q.tolist(), k.tolist())),
                           kwargs["query_seq_lengths"], kwargs["key_value_seq_lengths"])
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(transformer, "platform", lambda: "cuda")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    out = _every_path(_config(name, dtype=HALF), ("explicit", "cudnn"), grads=False)
    assert lengths == [(list(LENGTHS), list(LENGTHS))] * _config(name).num_layers  # one call per layer
    _assert_half_close(_at_tokens(out["cudnn"][1]), _at_tokens(out["explicit"][1]), name)


@pytest.mark.skipif(transformer.platform() != "cuda", reason="cuDNN flash attention needs an NVIDIA GPU "
                    "(JAX_PLATFORMS=cuda pytest -k on_gpu; tests/conftest.py defaults to cpu)")
@pytest.mark.parametrize("name", CUDNN_CASES)
def test_cudnn_agrees_with_explicit_on_gpu(name):
    """On a GPU: cuDNN flash attention and the explicit path, both in bfloat16, agree in logits at the real
    tokens, loss and gradients within bfloat16 rounding."""
    out = _every_path(_config(name, dtype=HALF), ("explicit", "cudnn"), grads=True)
    ((loss, logits), grads), ((loss2, logits2), grads2) = out["explicit"], out["cudnn"]
    _assert_half_close(_at_tokens(logits2), _at_tokens(logits), name)
    _assert_half_close(loss2, loss, name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads2), jax.tree.leaves(grads), strict=True):
        _assert_half_close(a, b, f"{name} {jax.tree_util.keystr(path)}")


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
