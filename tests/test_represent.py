"""The representation stage: extract_topk against transformers (PyTorch), and the resumable top-k store."""

import pydoc_data.topics

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import fusejax.represent as represent
from fusejax.corpus import prepare_corpus
from fusejax.models import load_pretrained
from fusejax.models.hf_io import model_fingerprint
from fusejax.represent import extract_topk, represent_source
from fusejax.schema import StoreFormatError
from fusejax.store import StoreMismatchError, open_store
from tiny import bpe_tokenizer, save_tiny_model

TEXTS = [t for t in pydoc_data.topics.topics.values() if len(t) > 400][:12]


def _hf_tokenizer(folder, kind: str, vocab: int):
    fast = bpe_tokenizer(kind, vocab, TEXTS)
    fast.save_pretrained(folder)
    return fast


def _tiny_model(folder, arch: str, vocab: int, seed: int):
    save_tiny_model(folder, arch, vocab, seed, eos_token_id=2)
    return load_pretrained(folder)


# 3001: two-stage top-k, and a padded vocabulary in ours; chunks of 5 positions: 12 padded to 15, three chunks
@pytest.mark.parametrize("vocab, chunk", [(300, represent.CHUNK), (3001, 5)])
def test_extract_topk_matches_transformers(tmp_path, vocab, chunk):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path)
    lengths = np.array([12, 9, 3, 1])
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(0, vocab, (4, 12)), 0).astype(np.int32)
    k = 7
    out = represent.extract_step(load_pretrained(tmp_path), jnp.asarray(ids), jnp.asarray(mask), k, chunk=chunk)
    tk_logits, tk_ids, token_ce, seq_ce = map(np.asarray, out[:4])

    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    ref_vals, ref_ids = torch.topk(logits, k, dim=-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), torch.from_numpy(ids[:, 1:]).long(),
                                           reduction="none").numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(tk_logits[real], ref_vals.numpy()[real], atol=1e-4)
    np.testing.assert_array_equal(tk_ids[real], ref_ids.numpy()[real])
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(token_ce[b, : n - 1], ce[b, : n - 1], atol=1e-4)
        assert np.all(token_ce[b, n - 1:] == 0)  # last real token and padding score nothing
        expected = ce[b, : n - 1].mean() if n > 1 else 0.0
        np.testing.assert_allclose(seq_ce[b], expected, atol=1e-4)


@pytest.mark.parametrize("vocab,k,high", [(5000, 10, 4), (5000, 1, 3), (4099, 10, 1000), (4099, 3, 1)])
def test_two_stage_top_k_equals_a_full_sort_with_ties(vocab, k, high):
    """``represent.top_k`` against a stable numpy sort: same values, same ids, ties broken by the lowest id;
    integer-valued logits in a small range make ties common, some rows are mostly -inf."""
    rng = np.random.default_rng(vocab + k)
    logits = rng.integers(0, high, (3, 40, vocab)).astype(np.float32)
    logits[0, :5, 7:] = -np.inf
    assert vocab >= 4 * k * represent._CHUNK  # the two-stage path, not the small-vocabulary fallback
    values, ids = map(np.asarray, represent.top_k(logits, k))
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(values, np.take_along_axis(logits, order, axis=-1))


def test_extract_topk_rejects_k_beyond_vocab(tmp_path):
    model = _tiny_model(tmp_path, "llama", 100, 0)
    with pytest.raises(ValueError, match="k=101"):
        extract_topk(model, np.zeros((1, 4), np.int32), None, k=101)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus store cut with a byte-level target tokenizer, and three sources with different tokenizers."""
    root = tmp_path_factory.mktemp("represent")
    target_tok = _hf_tokenizer(root / "tok_target", "bytelevel", 400)
    for i, text in enumerate(TEXTS):
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"{i:02d}.txt").write_text(text)
    prepare_corpus(root / "docs", target_tok, root / "corpus", block_size=96)
    sources = {}
    for name, arch, kind, vocab in [("llama", "llama", "metaspace", 350), ("neox", "gpt_neox", "bytelevel", 420),
                                    ("gpt2", "gpt2", "bytelevel", 300)]:
        tok = _hf_tokenizer(root / f"tok_{name}", kind, vocab)
        sources[name] = (_tiny_model(root / f"model_{name}", arch, len(tok), seed=len(sources)), tok)
    return root, sources


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_store_rows_equal_unbatched_extraction(setup):
    root, sources = setup
    corpus = open_store(root / "corpus")
    for name, (model, tok) in sources.items():
        summary = represent_source(model, tok, root / "corpus", root / "rep" / name, name=name, k=5, batch_size=4,
                                   logits_dtype="float32", rows_per_shard=8, progress=False,
                                   model_fingerprint=model_fingerprint(root / f"model_{name}"))
        store = open_store(root / "rep" / name)
        assert summary["blocks"] == len(store) == len(corpus) and summary["nonfinite_blocks"] == 0
        assert store.meta["k"] == 5 and store.meta["vocab_size"] == len(tok)
        for pos in (0, len(corpus) - 1):  # the first batch's first row and the padded last batch's last
            block = corpus.row(pos)
            row = store.get(int(block["id"]))
            ids = tok.encode(block["text"].decode("utf-8"), add_special_tokens=False) + [tok.eos_token_id]
            np.testing.assert_array_equal(row["input_ids"], ids)
            vals, tk, ce, sce = map(np.asarray, extract_topk(model, np.asarray([ids], np.int32), None, k=5))
            np.testing.assert_allclose(row["topk_logits"], vals[0], atol=1e-5)
            np.testing.assert_array_equal(row["topk_ids"], tk[0])
            np.testing.assert_allclose(row["token_ce"], ce[0], atol=1e-5)
            np.testing.assert_allclose(row["seq_ce"], sce[0], atol=1e-5)


def test_resume_after_interruption_is_byte_identical(setup, monkeypatch):
    root, sources = setup
    model, tok = sources["neox"]
    kwargs = dict(name="neox", k=4, batch_size=2, rows_per_shard=4, progress=False,
                  model_fingerprint=model_fingerprint(root / "model_neox"))
    represent_source(model, tok, root / "corpus", root / "straight", **kwargs)

    calls = {"n": 0}
    real = represent.extract_step

    def dies_on_fifth_batch(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real(*args)

    monkeypatch.setattr(represent, "extract_step", dies_on_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        represent_source(model, tok, root / "corpus", root / "resumed", **kwargs)
    assert 0 < len(open_store(root / "resumed")) < len(open_store(root / "corpus"))
    monkeypatch.setattr(represent, "extract_step", real)
    represent_source(model, tok, root / "corpus", root / "resumed", **kwargs)
    assert _files(root / "resumed") == _files(root / "straight")


def test_store_refuses_other_k_or_tokenizer(setup):
    root, sources = setup
    model, tok = sources["gpt2"]
    kwargs = dict(name="gpt2", progress=False, model_fingerprint=model_fingerprint(root / "model_gpt2"))
    represent_source(model, tok, root / "corpus", root / "refuse", k=3, **kwargs)
    with pytest.raises(StoreMismatchError, match="k"):
        represent_source(model, tok, root / "corpus", root / "refuse", k=4, **kwargs)
    other_model, other_tok = sources["neox"]
    with pytest.raises(StoreMismatchError, match="tokenizer_fingerprint"):
        represent_source(other_model, other_tok, root / "corpus", root / "refuse", k=3, **kwargs)


def test_other_weights_in_the_same_folder_are_refused_not_resumed(setup, tmp_path):
    """Another random model saved over a source's folder: same config, same safetensors header and size."""
    root, sources = setup
    _, tok = sources["llama"]
    folder = tmp_path / "model"
    kwargs = dict(name="llama", k=3, progress=False)
    save_tiny_model(folder, "llama", len(tok), 0, eos_token_id=2)
    first = represent_source(load_pretrained(folder), tok, root / "corpus", tmp_path / "rep",
                             model_fingerprint=model_fingerprint(folder), **kwargs)
    again = represent_source(load_pretrained(folder), tok, root / "corpus", tmp_path / "rep",
                             model_fingerprint=model_fingerprint(folder), **kwargs)
    assert again["resumed_blocks"] == first["blocks"] == len(open_store(tmp_path / "rep")) > 0
    save_tiny_model(folder, "llama", len(tok), 1, eos_token_id=2)
    with pytest.raises(StoreMismatchError, match=r"source 'llama'.*rep.*model_fingerprint.*remove"):
        represent_source(load_pretrained(folder), tok, root / "corpus", tmp_path / "rep",
                         model_fingerprint=model_fingerprint(folder), **kwargs)


def test_nonfinite_logits_are_counted_and_flagged(setup, tmp_path):
    root, sources = setup
    _, tok = sources["llama"]
    model = _tiny_model(tmp_path / "nan_model", "llama", len(tok), seed=5)
    model.embed[...] = model.embed[...].at[tok.eos_token_id].set(np.nan)  # every block ends in EOS: all go NaN
    summary = represent_source(model, tok, root / "corpus", tmp_path / "nan", name="llama", k=3, progress=False,
                               model_fingerprint="weights set by hand")
    store = open_store(tmp_path / "nan")
    assert summary["nonfinite_blocks"] == len(store) > 0
    assert all(store.row(i)["nonfinite"] > 0 for i in range(len(store)))


def test_extraction_on_a_mesh_equals_one_device(tmp_path):
    """Tensor-parallel logits (vocabulary split over devices) through the two-stage top-k and the CE."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fusejax.sharding import make_mesh

    save_tiny_model(tmp_path, "llama", 3001, 0, eos_token_id=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3001, (4, 16)).astype(np.int32)
    mask = (np.arange(16)[None] < np.array([16, 9, 4, 16])[:, None]).astype(np.int32)
    ref = extract_topk(load_pretrained(tmp_path), ids, mask, k=10)
    mesh = make_mesh(2, 1, 4)
    model = load_pretrained(tmp_path, mesh=mesh)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = extract_topk(model, jax.device_put(ids, batch), jax.device_put(mask, batch), k=10)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))
    for x, y in (out[0], ref[0]), (out[2], ref[2]), (out[3], ref[3]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_resume_on_another_device_layout_is_refused(setup, tmp_path):
    """The store records the mesh and device count; the same model on a 2-device mesh may not extend it."""
    import jax

    from fusejax.sharding import make_mesh

    root, sources = setup
    _, tok = sources["llama"]
    kwargs = dict(name="llama", k=3, progress=False, model_fingerprint=model_fingerprint(root / "model_llama"))
    represent_source(load_pretrained(root / "model_llama"), tok, root / "corpus", tmp_path / "rep", **kwargs)
    meta = open_store(tmp_path / "rep").meta
    assert meta["device_layout"]["devices"] == 1 and meta["format_version"] == 2
    files = _files(tmp_path / "rep")
    model = load_pretrained(root / "model_llama", mesh=make_mesh(1, 2, 1, devices=jax.devices()[:2]))
    with pytest.raises(StoreFormatError, match=r"rep was written with device_layout = .*'devices': 1.*this run has "
                                               r"device_layout = .*'fsdp': 2.*'devices': 2"):
        represent_source(model, tok, root / "corpus", tmp_path / "rep", **kwargs)
    assert _files(tmp_path / "rep") == files
