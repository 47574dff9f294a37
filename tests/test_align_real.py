"""fusejax.vocab and fusejax.align with the real tokenizers (Llama-2, GPT-NeoX-20B, OpenLLaMA v1, GPT-2) on
real corpora."""

import numpy as np
import pytest

from fusejax import align, dtw, vocab, vocab_maps
from tests.test_align import naive_partners

PAIRS = [("gpt-neox-20b", "llama2"), ("gpt2", "openllama-v1"), ("llama2", "gpt2")]


@pytest.fixture(scope="module")
def real(shared_data):
    from fusejax.tokenizer import load_tokenizer

    names = ["llama2", "gpt-neox-20b", "openllama-v1", "gpt2"]
    toks = {n: load_tokenizer(shared_data / "tokenizers" / n) for n in names}
    text = (shared_data / "corpora" / "pytorch-examples-python.txt").read_text(encoding="utf-8")[3000:4200]
    text += (shared_data / "corpora" / "wikitext2-raw-test.txt").read_text(encoding="utf-8")[:600]
    return toks, text


def test_markers_and_texts(real):
    toks, text = real
    assert {n: vocab.word_start_marker(t) for n, t in toks.items()} == {
        "llama2": "▁", "gpt-neox-20b": "Ġ", "openllama-v1": "▁", "gpt2": "Ġ"}
    assert [vocab.is_byte_level(toks[n]) for n in ("llama2", "gpt-neox-20b", "gpt2")] == [False, True, True]
    sample = "def f(x):\n\treturn  x  # é 😀 漢字"
    for name, tok in toks.items():
        ids = tok(sample, add_special_tokens=False)["input_ids"]
        spelled = b"".join(vocab.token_texts(tok, ids))
        assert spelled.removeprefix(b" ") == sample.encode(), name
    neox = toks["gpt-neox-20b"]
    assert vocab.token_texts(neox, [neox.convert_tokens_to_ids("  ")]) == [b"  "]  # literal added spaces
    assert vocab.token_texts(neox, [neox.eos_token_id]) == vocab.token_texts(toks["llama2"], [2]) == [b"\xffeos"]


def test_added_tokens_spelled_by_content(real):
    """OpenLLaMA v1 marks <unk> and <s> `normalized`: tokenizers 0.23's id_to_token says "▁<unk>"; the
    reference saw "<unk>", so its exact map finds Llama-2's <unk> and <s>."""
    toks, _ = real
    s, t = toks["openllama-v1"], toks["llama2"]
    assert s.backend_tokenizer.id_to_token(0) == "▁<unk>"  # the quirk this guards against
    assert vocab.token_strings(s, [0, 1, 2, 32000]) == ["<unk>", "<s>", "</s>", "[PAD]"]
    exact, _ = vocab_maps.vocab_map(s, t, method="exact", mode="reference")
    assert exact[:3].tolist() == [0, 1, 2]


@pytest.mark.parametrize("source,target", PAIRS)
@pytest.mark.parametrize("mode", ["reference", "default"])
def test_align_tokens_equals_naive_dp(real, source, target, mode):
    toks, text = real
    s, t = toks[source], toks[target]
    ids_t = np.array(t(text)["input_ids"][:260])
    ids_s = np.array(s(t.decode(ids_t, skip_special_tokens=True))["input_ids"])
    markers = (vocab.word_start_marker(s), vocab.word_start_marker(t))
    np.testing.assert_array_equal(dtw.align_tokens(s, ids_s, t, ids_t, mode=mode),
                                  naive_partners(s, ids_s, t, ids_t, mode, markers))


def test_newlines_match_only_in_default_mode(real):
    toks, text = real
    s, t = toks["gpt-neox-20b"], toks["llama2"]
    ids_t = np.array(t(text)["input_ids"][:200])
    ids_s = np.array(s(t.decode(ids_t, skip_special_tokens=True))["input_ids"])
    topk = ids_s[:, None]
    logits = np.ones_like(topk, np.float32)
    newline = np.flatnonzero(ids_t == t.convert_tokens_to_ids("<0x0A>"))
    assert newline.size > 3
    ref, _ = align.align_topk(s, ids_s, topk, logits, t, ids_t, mode="reference")
    np.testing.assert_array_equal(ref[newline, 0], ids_t[newline])  # the current-token fallback
    default, _, stats = align.align_topk(s, ids_s, topk, logits, t, ids_t, mode="default", return_stats=True)
    partner = dtw.align_tokens(s, ids_s, t, ids_t, mode="default")
    matched = newline[(partner[newline] >= 0) & (ids_s[partner[newline]] == s.convert_tokens_to_ids("Ċ"))]
    assert matched.size > 3
    # matched newline positions carry the source's top-1 (here the source token itself: "Ċ" -> "<0x0A>")
    assert (default[matched, 0] == ids_t[matched]).all() and (default[matched, 1:] == -1).all()
    assert stats.empty <= 1
