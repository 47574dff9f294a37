"""fusejax.vocab, vocab_maps and align with the real tokenizers (Llama-2, Llama 3, DeepSeek-V4, GPT-NeoX-20B,
OpenLLaMA v1, GPT-2) on real corpora."""

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from fusejax import align, dtw, vocab, vocab_maps
from tests.test_align import naive_dtw_partner, naive_partners

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


# ------------------------------------------- 128k+ vocabularies: every pair of the five spellings, MinED on a sample

SPELLINGS = ["llama2", "llama3", "deepseek-v4", "gpt-neox-20b", "gpt2"]  # ▁ + <0x..>, Ġ (three), added specials


@pytest.fixture(scope="module")
def five(real, shared_data):
    from fusejax.tokenizer import load_tokenizer

    toks = {n: real[0][n] if n in real[0] else load_tokenizer(shared_data / "tokenizers" / n) for n in SPELLINGS}
    return {n: vocab.Vocab(t) for n, t in toks.items()}, real[1]


@pytest.mark.parametrize("source,target,mode", [
    ("deepseek-v4", "llama3", "default"), ("llama3", "deepseek-v4", "reference"), ("llama2", "llama3", "reference")])
def test_mined_equals_brute_force_on_a_sample(five, source, target, mode):
    """The MinED search (lengths outward, bag bounds) against every target token, on 150 sampled source tokens
    without an exact match; random co-occurrence counts on some ties must pick the most frequent tied token."""
    from rapidfuzz.process import cdist

    s, t = five[0][source], five[0][target]
    keys_s, keys_t, _ = vocab_maps._map_strings(s, t, mode)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(np.flatnonzero(vocab_maps.exact_ids(s, t, mode) < 0), 150, replace=False))
    d = cdist([keys_s[r] for r in rows], keys_t, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    best = d.min(axis=1)
    tied = [np.flatnonzero(row == b) for row, b in zip(d, best)]
    co = [(r, j, c) for r, ties in zip(rows, tied) if len(ties) > 1
          for j, c in zip(rng.choice(ties, 2), rng.integers(1, 4, 2))] + [(rows[0], int(d[0].argmax()), 99)]
    src, tgt, cnt = (np.array(x) for x in zip(*co))
    table = vocab_maps._co_occurrence_table((src, tgt, cnt), s.size, t.size)
    ids, dist = vocab_maps._mined(keys_s, rows, keys_t, table, workers=2)
    counts = {}
    for a, b, c in co:
        counts[a, b] = counts.get((a, b), 0) + c
    want = [max(ties, key=lambda j: (counts.get((r, j), 0), -j)) for r, ties in zip(rows, tied)]
    assert len(co) > 10  # ties do occur
    np.testing.assert_array_equal(dist, best)
    np.testing.assert_array_equal(ids, want)


@pytest.mark.parametrize("source,target", [(a, b) for i, a in enumerate(SPELLINGS) for b in SPELLINGS[i + 1:]])
@pytest.mark.parametrize("mode", ["reference", "default"])
def test_align_every_pair_of_spellings(five, source, target, mode):
    """DTW alignment between every pair of the five spellings equals the naive DP; in default mode the
    spelled bytes of both sequences are the text, EOS included."""
    vocabs, text = five
    s, t = vocabs[source], vocabs[target]
    ids_t = np.array(t.tok(text[:500], add_special_tokens=False)["input_ids"] + [t.tok.eos_token_id])
    ids_s = np.array(s.tok(text[:500], add_special_tokens=False)["input_ids"] + [s.tok.eos_token_id])
    if mode == "default":
        spelled = [b"".join(vocab.token_texts(v, ids)).removeprefix(b" ") for v, ids in ((s, ids_s), (t, ids_t))]
        assert spelled[0] == spelled[1] == text[:500].encode() + b"\xffeos"
    if mode == "reference":
        a, b = ([v.tokens[i].replace(v.marker, "") for i in ids] for v, ids in ((s, ids_s), (t, ids_t)))
    else:
        a, b = ([v.texts[i].decode("latin-1") for i in ids] for v, ids in ((s, ids_s), (t, ids_t)))
    np.testing.assert_array_equal(dtw.align_tokens(s, ids_s, t, ids_t, mode=mode), naive_dtw_partner(a, b))
