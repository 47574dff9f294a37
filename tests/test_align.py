"""fusejax.vocab, fusejax.vocab_maps and fusejax.align against independent references: a naive full DTW, a
brute-force MinED map, and a direct, string-by-string transcription of the reference alignment rules; plus
hand-checked cases."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from pydoc_data.topics import topics
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fusejax import align, dtw, vocab, vocab_maps

CORPUS = "\n".join(topics[k] for k in sorted(topics))
TRICKY = "Tabs\tand  double  spaces,\n\nnewlines, émoji 😀 and 漢字 text\t\tend."


# ------------------------------------------------------------------------------------------ tiny tokenizers


def _byte_level_tok(vocab_size=400):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([CORPUS[:60000]], trainer)
    tk.add_tokens(["  ", "   "])  # GPT-NeoX style literal multi-space added tokens
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _sentencepiece_tok(vocab_size=350):
    """A Llama-style BPE: Metaspace, byte fallback tokens <0x00>..<0xFF> right after <unk> <s> </s>."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    tk.train_from_iterator([CORPUS[:60000]], trainer)
    spec = json.loads(tk.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    names += [t for t, _ in learned if t not in names]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(names)}
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    spec["added_tokens"] = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, c in enumerate(names[:3])
    ]
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _hand_tok(tokens, byte_level, specials=()):
    """A tokenizer with exactly ``tokens`` as vocabulary (ids in order), for hand-checked cases."""
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    if byte_level:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    kwargs = dict(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


@pytest.fixture(scope="module")
def toks():
    return _byte_level_tok(), _sentencepiece_tok()


# --------------------------------------------------------------------------------------- naive references


def naive_dtw_partner(a, b):
    """The reference DTW over strings a (source) and b (target), full matrix, float infinities."""
    n, m = len(a), len(b)
    M = np.full((n + 1, m + 1), np.inf)
    M[0, 0] = 0
    for i in range(n):
        for j in range(m):
            M[i + 1, j + 1] = Levenshtein.distance(a[i], b[j]) + min(M[i, j + 1], M[i + 1, j], M[i, j])
    M = M[1:, 1:]
    i, j = n - 1, m - 1
    cols = [[] for _ in range(m)]
    while i > 0 or j > 0:
        cols[j].append(i)
        opts = [M[i - 1, j - 1] if i and j else np.inf, M[i - 1, j] if i else np.inf, M[i, j - 1] if j else np.inf]
        move = int(np.argmin(opts))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    cols[0].append(0)
    return np.array([c[0] if len(c) == 1 else -1 for c in cols], np.int32)


def reference_strings(tok, ids, marker):
    return [t.replace(marker, "") for t in tok.convert_ids_to_tokens(list(ids))]


def naive_partners(s, ids_s, t, ids_t, mode, markers=("Ġ", "▁")):
    """The naive DP on the strings each mode compares: marker-stripped token strings (reference) or the
    spelled bytes (default)."""
    if mode == "reference":
        a, b = reference_strings(s, ids_s, markers[0]), reference_strings(t, ids_t, markers[1])
    else:
        a = [x.decode("latin-1") for x in vocab.token_texts(s, ids_s)]
        b = [x.decode("latin-1") for x in vocab.token_texts(t, ids_t)]
    return naive_dtw_partner(a, b)


def reference_transform(src_tok, src_ids, topk_ids, topk_logits, tgt_tok, tgt_ids, mapping, s_marker, t_marker,
                        src_byte_level):
    """The reference alignment transcribed on strings; ``mapping``: dict replaced source string -> target string."""
    vocab = tgt_tok.get_vocab()
    s_tokens = src_tok.convert_ids_to_tokens(list(src_ids))
    t_tokens = tgt_tok.convert_ids_to_tokens(list(tgt_ids))
    partner = naive_dtw_partner([x.replace(s_marker, "") for x in s_tokens], [x.replace(t_marker, "") for x in t_tokens])
    rows = []
    for i, j in enumerate(partner):
        row = []
        if j >= 0:
            base, blend = t_tokens[i], s_tokens[j].replace(s_marker, t_marker)
            if src_byte_level and i == 0 and base.startswith(t_marker) and not blend.startswith(t_marker):
                blend = t_marker + blend
            if base == blend or (mapping is not None and blend in mapping and mapping[blend] == base):
                for sid, logit in zip(topk_ids[j], topk_logits[j]):
                    t = src_tok.convert_ids_to_tokens([int(sid)])[0].replace(s_marker, t_marker)
                    if mapping is not None:
                        t = mapping[t]
                    if t in vocab and vocab[t] not in [r[0] for r in row]:
                        row.append((vocab[t], float(logit)))
                rows.append(row)
                continue
        rows.append([(vocab[t_tokens[i]], 1.0)])
    return rows


def as_rows(ids, logits):
    return [[(int(a), float(b)) for a, b in zip(r_ids, r_logits) if a >= 0] for r_ids, r_logits in zip(ids, logits)]


def brute_mined(keys_s, keys_t, exact_lookup):
    out = []
    for key in keys_s:
        if key in exact_lookup:
            out.append((exact_lookup[key], 0))
        else:
            d = [Levenshtein.distance(key, y) for y in keys_t]
            best = int(np.argmin(d))
            out.append((best, d[best]))
    return np.array(out, np.int32).T


def text_pair(toks, text):
    s, t = toks
    return np.array(s(text)["input_ids"]), np.array(t(text)["input_ids"])


# --------------------------------------------------------------------------------------------------- tests


def test_module_does_not_import_jax():
    code = ("import sys, fusejax.vocab, fusejax.vocab_maps, fusejax.dtw, fusejax.align; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_markers_and_byte_level(toks):
    s, t = toks
    assert vocab.word_start_marker(s) == "Ġ" and vocab.is_byte_level(s)
    assert vocab.word_start_marker(t) == "▁" and not vocab.is_byte_level(t)


def test_token_texts(toks):
    s, t = toks
    ids_s, ids_t = text_pair(toks, TRICKY)
    # byte-level and byte-fallback tokens decode to the same bytes: the UTF-8 text itself
    assert b"".join(vocab.token_texts(s, ids_s)) == TRICKY.encode()
    assert b"".join(vocab.token_texts(t, ids_t)) == b" " + TRICKY.encode()  # Metaspace's dummy prefix
    sv, tv = s.get_vocab(), t.get_vocab()
    assert vocab.token_texts(s, [sv["Ċ"], sv["  "]]) == [b"\n", b"  "]  # the added token is literal text
    assert vocab.token_texts(t, [tv["<0x0A>"], tv["</s>"], tv["<s>"]]) == [b"\n", b"\xffeos", b"\xffbos"]
    assert vocab.token_texts(s, [sv["<|endoftext|>"]]) == [b"\xffeos"]


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_align_tokens_matches_naive_dp_on_text(toks, mode):
    s, t = toks
    for start, length in [(0, 400), (5000, 700)]:
        text = CORPUS[start : start + length] + TRICKY
        ids_s, ids_t = text_pair(toks, text)
        if mode == "reference":
            a, b = reference_strings(s, ids_s, "Ġ"), reference_strings(t, ids_t, "▁")
        else:  # the spelled bytes, one character per byte
            a = [x.decode("latin-1") for x in vocab.token_texts(s, ids_s)]
            b = [x.decode("latin-1") for x in vocab.token_texts(t, ids_t)]
        got = dtw.align_tokens(s, ids_s, t, ids_t, mode=mode)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, naive_dtw_partner(a, b))


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_align_tokens_matches_naive_dp_on_random_ids(toks, mode):
    s, t = toks
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (1, 7), (9, 1), (23, 40), (60, 31)]:
        ids_s, ids_t = rng.integers(0, len(s), n), rng.integers(0, len(t), m)
        np.testing.assert_array_equal(dtw.align_tokens(s, ids_s, t, ids_t, mode=mode),
                                      naive_partners(s, ids_s, t, ids_t, mode))


def test_align_tokens_ties_on_repetitive_text(toks):
    """Runs of identical tokens make many equal-cost paths: the tie-breaking must equal the reference's."""
    s, t = toks
    text = "a a a a a  b b b\n\n\n" * 6 + "the the the, the."
    ids_s, ids_t = text_pair(toks, text)
    for ids_a, ids_b in [(ids_s, ids_t), (ids_s[::-1].copy(), ids_t)]:
        a, b = reference_strings(s, ids_a, "Ġ"), reference_strings(t, ids_b, "▁")
        np.testing.assert_array_equal(dtw.align_tokens(s, ids_a, t, ids_b, mode="reference"), naive_dtw_partner(a, b))


TIE_SRC = ["a", "aa", "ab", "b", "Ġa", "Ġb", "ĠĠ", "Ċ", "ba"]
TIE_TGT = ["▁", "a", "▁a", "aa", "b", "▁b", "▁▁", "<0x0A>", "ab", "▁ab"]


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_align_tokens_pruning_keeps_ties_on_tiny_alphabets(mode):
    """Short random sequences over a few similar tokens: many equal-cost paths and cells whose pruning
    bound is tight; the pruned DP must still break every tie like the full one."""
    s, t = _hand_tok(TIE_SRC, True), _hand_tok(TIE_TGT, False)
    rng = np.random.default_rng(1)
    for _ in range(150):
        n, m = rng.integers(1, 30, 2)
        ids_s, ids_t = rng.integers(0, len(TIE_SRC), n), rng.integers(0, len(TIE_TGT), m)
        np.testing.assert_array_equal(dtw.align_tokens(s, ids_s, t, ids_t, mode=mode),
                                      naive_partners(s, ids_s, t, ids_t, mode))


def test_cost_to_go_bound_is_a_lower_bound():
    """The pruning bound never exceeds the exact DTW cost still to pay (naive backward DP with Levenshtein)."""
    from fusejax import align_kernels as K

    rng = np.random.default_rng(2)
    words = ["the", "then", "he", "a", "an", "and", "na", "", "x", "éé", "ab" * 4]
    keys = {w: k for k, w in enumerate(words)}
    informative = 0
    for _ in range(20):
        n, m = rng.integers(1, 25, 2)
        a, b = [words[i] for i in rng.integers(0, len(words), n)], [words[i] for i in rng.integers(0, len(words), m)]
        G = np.full((n + 1, m + 1), np.inf)  # exact cost to go after each cell
        G[n - 1, m - 1] = 0
        for i in range(n - 1, -1, -1):
            for j in range(m - 1, -1, -1):
                if (i, j) != (n - 1, m - 1):
                    G[i, j] = min(Levenshtein.distance(a[x], b[y]) + G[x, y]
                                  for x, y in ((i + 1, j), (i, j + 1), (i + 1, j + 1)) if x < n and y < m)
        codes_a = np.frombuffer("".join(a).encode("utf-32-le"), np.uint32).astype(np.int32)
        codes_b = np.frombuffer("".join(b).encode("utf-32-le"), np.uint32).astype(np.int32)
        offs_a, offs_b = np.cumsum([0] + [len(w) for w in a]), np.cumsum([0] + [len(w) for w in b])
        cap = 10**6
        out = np.zeros((n, m), np.int32)
        lo, hi = K.cost_to_go_bound(
            np.array([keys[w] for w in a]), np.diff(offs_a), K.char_masks(codes_a, offs_a, np.arange(n)),
            np.array([keys[w] for w in b]), np.diff(offs_b), K.char_masks(codes_b, offs_b, np.arange(m)), cap, out)
        bound = np.full((n, m), cap)
        for i in range(n):
            bound[i, lo[i] : hi[i] + 1] = out[i, lo[i] : hi[i] + 1]
        assert (bound <= G[:n, :m]).all() and bound[n - 1, m - 1] == 0
        informative += (bound > 0).sum()
    assert informative > 0


def test_vocab_map_reference_equals_brute_force(toks):
    s, t = toks
    keys_s = [x.replace("Ġ", "▁") for x in s.convert_ids_to_tokens(list(range(len(s))))]
    keys_t = t.convert_ids_to_tokens(list(range(len(t))))
    want_ids, want_d = brute_mined(keys_s, keys_t, t.get_vocab())
    ids, dist = vocab_maps.vocab_map(s, t, method="mined", mode="reference")
    assert ids.dtype == np.int32 and dist.dtype == np.int32 and ids.shape == (len(s),)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_d)
    exact_ids, exact_d = vocab_maps.vocab_map(s, t, method="exact", mode="reference")
    np.testing.assert_array_equal(exact_ids, np.where(want_d == 0, want_ids, -1))
    np.testing.assert_array_equal(exact_d, np.where(want_d == 0, 0, -1))
    summary = vocab_maps.vocab_map_summary(ids, dist)
    assert summary["exact_rate"] == pytest.approx(np.mean(want_d == 0))
    assert summary["mean_distance"] == pytest.approx(want_d.mean())


def test_vocab_map_default_compares_spelled_text(toks):
    s, t = toks
    ids, dist = vocab_maps.vocab_map(s, t, method="mined", mode="default")
    sv, tv = s.get_vocab(), t.get_vocab()
    # newline, never equal as token strings; the tiny vocabulary learned a literal "\n", preferred to <0x0A>
    assert vocab.token_texts(t, [ids[sv["Ċ"]]]) == [b"\n"] and dist[sv["Ċ"]] == 0
    assert ids[sv["<|endoftext|>"]] == tv["</s>"]  # EOS by role
    a_s = s.convert_tokens_to_ids("A")
    assert ids[a_s] == tv["A"]  # the regular token is preferred over byte fallback <0x41>
    keys_s = [x.decode("latin-1") for x in vocab.token_texts(s)]
    keys_t = [x.decode("latin-1") for x in vocab.token_texts(t)]
    for sid in random.Random(0).sample(range(len(s)), 40):
        want = min(Levenshtein.distance(keys_s[sid], y) for y in keys_t)
        assert dist[sid] == want == Levenshtein.distance(keys_s[sid], keys_t[ids[sid]])


def test_vocab_map_co_occurrence_breaks_ties_and_cache(toks, tmp_path):
    s, t = toks
    ids, dist = vocab_maps.vocab_map(s, t, mode="reference")
    keys_s = [x.replace("Ġ", "▁") for x in s.convert_ids_to_tokens(list(range(len(s))))]
    keys_t = t.convert_ids_to_tokens(list(range(len(t))))
    # a source token with several equally distant candidates
    sid = next(i for i in range(len(s)) if dist[i] > 0 and sum(
        Levenshtein.distance(keys_s[i], y) == dist[i] for y in keys_t) >= 2)
    tied = [j for j, y in enumerate(keys_t) if Levenshtein.distance(keys_s[sid], y) == dist[sid]]
    other = tied[-1]
    far = int(np.argmax([Levenshtein.distance(keys_s[sid], y) for y in keys_t]))  # not a tie: ignored
    co = (np.array([sid, sid, sid]), np.array([other, far, far]), np.array([2.0, 50.0, 50.0]))
    ids_co, dist_co = vocab_maps.vocab_map(s, t, mode="reference", co_occurrence=co, cache_dir=tmp_path)
    assert ids[sid] == tied[0] and ids_co[sid] == other and dist_co[sid] == dist[sid]
    changed = np.flatnonzero(ids_co != ids)
    assert changed.tolist() == [sid]
    # the cached map is reused (a file keyed by both fingerprints), not recomputed
    (cached,) = tmp_path.glob("vocab_map-*.npz")
    np.savez(cached, target_ids=np.zeros(len(s), np.int32), distances=np.zeros(len(s), np.int32))
    again, _ = vocab_maps.vocab_map(s, t, mode="reference", co_occurrence=co, cache_dir=tmp_path)
    assert not again.any()
    with pytest.raises(ValueError, match="co_occurrence"):
        vocab_maps.vocab_map(s, t, co_occurrence=(np.array([len(s)]), np.array([0]), np.array([1.0])))


@pytest.mark.parametrize("soft", [False, True])
def test_align_topk_reference_equals_transcription(toks, soft):
    s, t = toks
    text = CORPUS[2000:2600] + TRICKY
    ids_s, ids_t = text_pair(toks, text)
    rng = np.random.default_rng(1)
    k = 6
    topk = np.concatenate([ids_s[1:, None], rng.integers(0, len(s), (len(ids_s) - 1, k - 1))], axis=1)
    topk = np.concatenate([topk, topk[:1]], axis=0)
    topk[::5, 3] = topk[::5, 0]  # duplicates
    logits = rng.normal(size=topk.shape).astype(np.float32)
    mapping = vmap = None
    if soft:
        vmap, _ = vocab_maps.vocab_map(s, t, mode="reference")
        tokens_t = t.convert_ids_to_tokens(list(range(len(t))))
        mapping = {x.replace("Ġ", "▁"): tokens_t[vmap[i]] for i, x in enumerate(s.convert_ids_to_tokens(list(range(len(s)))))}
    want = reference_transform(s, ids_s, topk, logits, t, ids_t, mapping, "Ġ", "▁", True)
    got_ids, got_logits, stats = align.align_topk(
        s, ids_s, topk, logits, t, ids_t, vocab_map=vmap, mode="reference", return_stats=True
    )
    assert got_ids.shape == (len(ids_t), k) and got_ids.dtype == np.int32 and got_logits.dtype == np.float32
    assert as_rows(got_ids, got_logits) == want
    assert stats.positions == len(ids_t)
    assert 0 < stats.matched <= stats.one_to_one <= stats.positions


# hand-checked cases --------------------------------------------------------------------------------------

SRC = ["<|endoftext|>", "Hello", "Ġworld", "Ċ", "Ġ", "ĠĠ", "ĠÃ©", "Ã©", "world"]
TGT = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "<0x0A>", "▁", "▁▁▁", "é", "▁é", "Hello"]


@pytest.fixture(scope="module")
def hand():
    s = _hand_tok(SRC, True, {"eos_token": "<|endoftext|>"})
    t = _hand_tok(TGT, False, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    return s, t


def _ids(vocab, tokens):
    return np.array([vocab.index(x) for x in tokens])


def test_hand_reference_first_position_newline_eos(hand):
    s, t = hand
    src = _ids(SRC, ["Hello", "Ġworld", "Ċ", "<|endoftext|>"])
    tgt = _ids(TGT, ["▁Hello", "▁world", "<0x0A>", "</s>"])
    topk = _ids(SRC, ["Ġworld", "Hello", "Ġworld", "ĠÃ©"])[None].repeat(4, 0)
    logits = np.array([[4.0, 3.0, 2.0, 1.0]] * 4, np.float32)
    ids, lg, st = align.align_topk(s, src, topk, logits, t, tgt, mode="reference", return_stats=True)
    W, E = TGT.index("▁world"), TGT.index("▁é")
    # i = 0: "Hello" gets the marker prefix (byte-level source) and matches "▁Hello"; the projection keeps
    # "Ġworld" -> "▁world", "Hello" -> "Hello", drops the duplicate "Ġworld" and the non-ASCII "ĠÃ©" (" é")
    assert ids[0].tolist() == [W, TGT.index("Hello"), -1, -1] and lg[0].tolist() == [4.0, 3.0, 0.0, 0.0]
    assert ids[1].tolist() == [W, TGT.index("Hello"), -1, -1]
    # newline and EOS never match across byte-level and SentencePiece: one-hot on the *current* token
    assert ids[2].tolist() == [TGT.index("<0x0A>"), -1, -1, -1] and lg[2].tolist() == [1.0, 0, 0, 0]
    assert ids[3].tolist() == [TGT.index("</s>"), -1, -1, -1]
    assert (st.one_to_one, st.matched, st.fallback, st.empty) == (4, 2, 2, 0)
    # default mode: newline and EOS align through the text they spell; fallback would be the next token
    ids, lg, st = align.align_topk(s, src, topk, logits, t, tgt, mode="default", return_stats=True)
    assert (st.matched, st.fallback) == (4, 0)
    assert ids[2].tolist() == [W, TGT.index("Hello"), E, -1] and lg[2].tolist() == [4.0, 3.0, 1.0, 0.0]


def test_hand_empty_rows_and_fallbacks(hand):
    s, t = hand
    src = _ids(SRC, ["Hello", "Ġworld", "Ġ"])
    tgt = _ids(TGT, ["▁Hello", "▁world", "▁"])
    topk = _ids(SRC, ["Ã©", "ĠĠ"])[None].repeat(3, 0)  # neither resolves to a target token
    logits = np.ones((3, 2), np.float32)
    ids, _, st = align.align_topk(s, src, topk, logits, t, tgt, mode="reference", return_stats=True)
    assert (ids == -1).all() and st.empty == 3 and st.matched == 3
    # default: "Ã©" spells "é" (resolves to the regular token); rows never stay empty
    ids, lg, st = align.align_topk(s, src, topk, logits, t, tgt, mode="default", return_stats=True, next_target_id=2)
    assert ids[:, 0].tolist() == [TGT.index("é")] * 3 and st.empty == 0
    ids, lg, st = align.align_topk(s, src, topk[:, 1:], logits[:, 1:], t, tgt, mode="default", return_stats=True)
    # no resolvable entry: one-hot on the next token; the last position has no next token inside the block
    assert ids[:, 0].tolist() == [tgt[1], tgt[2], -1] and st.fallback == 3 and st.empty == 1
    ids, _ = align.align_topk(s, src, topk[:, 1:], logits[:, 1:], t, tgt, mode="default", next_target_id=2)
    assert ids[2, 0] == 2
    ids, _ = align.align_topk(s, src, topk[:, 1:], logits[:, 1:], t, tgt, mode="default", fallback="reference")
    assert ids[:, 0].tolist() == tgt.tolist()


def test_hand_marker_only_tokens_cost_zero(hand):
    """Reference cost: markers are removed, so "ĠĠ" pairs with "▁▁▁" at cost 0 and "Hello" with "▁Hello"."""
    s, t = hand
    src = _ids(SRC, ["ĠĠ", "Hello"])
    tgt = _ids(TGT, ["▁▁▁", "▁Hello", "Hello"])
    # costs by hand: ""-"" 0, ""-"Hello" 5, ""-"Hello" 5 / "Hello"-"" 5, 0, 0 ->
    # D = [[0, 5, 10], [5, 0, 0]]; backtrack (1,2) -> left (1,1) -> diag (0,0)
    assert dtw.align_tokens(s, src, t, tgt, mode="reference").tolist() == [0, 1, 1]


def test_bad_input_errors(hand):
    s, t = hand
    with pytest.raises(ValueError, match="mode"):
        dtw.align_tokens(s, [1], t, [3], mode="fast")
    with pytest.raises(ValueError, match="target_ids: id 99"):
        dtw.align_tokens(s, [1], t, [99])
    with pytest.raises(ValueError, match="empty sequence"):
        dtw.align_tokens(s, [], t, [3])
    with pytest.raises(ValueError, match="source_topk_ids"):
        align.align_topk(s, [1, 2], np.zeros((3, 2), int), np.zeros((3, 2)), t, [3])
    with pytest.raises(ValueError, match="vocab_map"):
        align.align_topk(s, [1], np.zeros((1, 2), int), np.zeros((1, 2)), t, [3], vocab_map=np.zeros(3, int))
    # -1 padding or float ids in the top-k, a map onto ids the target does not have: named, never wrapped around
    with pytest.raises(ValueError, match=r"source_topk_ids: expected source token ids \(integers >= 0\).*minimum -1"):
        align.align_topk(s, [1], np.array([[1, -1]]), np.zeros((1, 2)), t, [3])
    with pytest.raises(ValueError, match="source_topk_ids: .*got dtype float64"):
        align.align_topk(s, [1], np.array([[1.0, 2.0]]), np.zeros((1, 2)), t, [3])
    n_s, n_t = vocab.Vocab.of(s).size, vocab.Vocab.of(t).size
    for bad in (np.full(n_s, 10**6), np.full(n_s, -2), np.zeros(n_s) + 0.5):
        with pytest.raises(ValueError, match=rf"vocab_map: expected target ids in \[0, {n_t}\) or -1"):
            align.align_topk(s, [1], np.zeros((1, 2), int), np.zeros((1, 2)), t, [3], vocab_map=bad)
    with pytest.raises(ValueError, match="method"):
        vocab_maps.vocab_map(s, t, method="fuzzy")


def test_kernel_levenshtein_equals_rapidfuzz_on_both_sides_of_64_characters():
    """The compiled edit distance (bit-parallel up to 64 characters, a plain DP beyond) against rapidfuzz."""
    from rapidfuzz.distance import Levenshtein

    from fusejax import align_kernels as K

    rng = np.random.default_rng(0)
    buf = np.zeros(200, np.int64)
    for _ in range(3000):
        la, lb = rng.integers(0, 90, 2)
        a = rng.integers(0, 6, la).astype(np.int64)  # a small alphabet: many repeats and near-ties
        b = rng.integers(0, 6, lb).astype(np.int64)
        codes = np.concatenate([a, b])
        got = K.levenshtein(codes, 0, la, codes, la, la + lb, buf)
        assert got == Levenshtein.distance(a.tolist(), b.tolist()), (a, b)
