"""load_tokenizer equals each model's own tokenizer; fingerprints; errors.

References: the `sentencepiece` library for SentencePiece folders, the raw `tokenizers.Tokenizer` for
tokenizer.json / vocab+merges folders, and the HF test vectors shipped with llama.cpp for the real ones.
"""

import io
import json
import re
import sys

import pytest
import sentencepiece as spm
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fusejax.tokenizer import load_tokenizer, tokenizer_fingerprint

PYDOC_TEXT = "\n".join(topics[key] for key in sorted(topics))

TRICKY = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \n ",
    "Hello world",
    " Hello world",
    "  Hello   world  ",
    "Hello\tworld\n",
    "trailing spaces   ",
    " " * 40 + "x" + " " * 17,
    "def f(x):\n    if x:\n        return x  # comment\n",
    "line1\r\nline2\r\n",
    "\u3000ideographic space and\u00a0no-break space",
    "emoji 🦙🤗 👨‍👩‍👧 ✨",
    "中文字符和日本語のテキスト 한국어",
    "byte fallback: \x00\x01 \u0378 \U0010fffd 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ",
    "<s> </s> <unk> <0x0A> <pad>",
    "ﬁ ligature ① Ｆｕｌｌｗｉｄｔｈ é vs e\u0301",
    "3.14159 1234567890 -42",
    "a" * 300,
]


def corpus_chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def assert_same_ids(tok, reference, texts):
    """tok.encode(text, add_special_tokens=False) equals reference(text) for every text, naming the first miss."""
    for text in texts:
        expected = reference(text)
        assert tok.encode(text, add_special_tokens=False) == expected, f"ids differ on {text[:80]!r}"


# ---------------------------------------------------------------- tiny SentencePiece BPE models (always run)

SPM_VARIANTS = {
    # Llama-2 style: no normalization, runs of spaces kept, whitespace-only pieces, digits split
    "llama_like": dict(
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
    ),
    # SentencePiece defaults: NFKC charsmap, extra whitespace removed
    "nfkc_default": dict(),
}
# runs of spaces before various characters (SentencePiece breaks score ties between merges leftmost first)
WHITESPACE_RUNS = [" " * n + end for n in range(1, 41) for end in ("", "x", "\n", "🦙")]


def _tie_whitespace_scores(model: bytes) -> bytes:
    """Give every whitespace-only piece one score, as Llama-2's tokenizer.model does (-1e9)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    tied = [p for p in proto.pieces if set(p.piece) == {"▁"}]
    assert len(tied) > 3
    for piece in tied:
        piece.score = -1e9
    return proto.SerializeToString()


@pytest.fixture(scope="module", params=["llama_like", "llama_like_tied", "nfkc_default"])
def spm_folder(request, tmp_path_factory):
    """Folder holding only a tokenizer.model: a 1000-piece SentencePiece BPE (byte fallback) trained on pydoc."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PYDOC_TEXT.splitlines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        character_coverage=0.999,
        num_threads=1,
        minloglevel=2,
        **SPM_VARIANTS[request.param.removesuffix("_tied")],
    )
    model = buf.getvalue()
    if request.param.endswith("_tied"):
        model = _tie_whitespace_scores(model)
    folder = tmp_path_factory.mktemp(f"spm_{request.param}")
    (folder / "tokenizer.model").write_bytes(model)
    return folder


def test_tiny_sentencepiece_equals_library(spm_folder):
    sp = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    tok = load_tokenizer(spm_folder)
    texts = TRICKY + WHITESPACE_RUNS + corpus_chunks(PYDOC_TEXT[:60_000], 997)
    assert_same_ids(tok, sp.encode, texts)
    # the tricky strings really exercise byte fallback and whitespace pieces
    used = {sp.id_to_piece(i) for text in TRICKY for i in sp.encode(text)}
    assert any(sp.is_byte(sp.piece_to_id(p)) for p in used)


def test_tiny_sentencepiece_specials_and_decode(spm_folder):
    sp = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    tok = load_tokenizer(spm_folder)
    # no tokenizer_config.json: specials from the model, BOS added like LlamaTokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.pad_token is None and sp.pad_id() == -1
    assert tok.encode("Hello world") == [sp.bos_id()] + sp.encode("Hello world")
    assert len(tok) == sp.get_piece_size()
    for text in ["Hello world", "  two  spaces", "emoji 🦙 and 中文", "tab\there\n"]:
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)


def test_sentencepiece_config_controls_specials(spm_folder, tmp_path):
    folder = tmp_path / "with_config"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((spm_folder / "tokenizer.model").read_bytes())
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": {"content": "<unk>", "__type": "AddedToken"},
              "pad_token": "</s>", "add_bos_token": False, "add_eos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    assert tok.pad_token_id == sp.eos_id()
    assert tok.encode("Hello world") == sp.encode("Hello world") + [sp.eos_id()]


def test_sentencepiece_added_tokens_json(spm_folder, tmp_path):
    folder = tmp_path / "added"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((spm_folder / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    (folder / "added_tokens.json").write_text(json.dumps({"<extra>": 1001, "[PAD]": 1000, "</s>": 2}))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    assert (len(tok), tok.pad_token_id, tok.convert_tokens_to_ids("<extra>")) == (1002, 1000, 1001)
    assert tok.encode("a<extra>b", add_special_tokens=False) == sp.encode("a") + [1001] + sp.encode("b")
    assert tok.encode("[PAD]", add_special_tokens=False) == sp.encode("[PAD]")  # special text stays text

    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": 1005}))
    with pytest.raises(ValueError, match=r"added_tokens.json: token '\[PAD\]' has id 1005, expected 1000"):
        load_tokenizer(folder)
    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": 1000, "<extra>": "1001"}))  # ids of two types
    with pytest.raises(ValueError, match=r"added_tokens.json: token '<extra>' has id '1001'; expected an integer"):
        load_tokenizer(folder)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(model_type="unigram"), "only SentencePiece BPE models are supported, model_type is 1"),
        (dict(model_type="bpe", user_defined_symbols=["<sep>"]), r"user-defined pieces are not supported.*<sep>"),
    ],
)
def test_unsupported_sentencepiece_refused(tmp_path, options, message):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PYDOC_TEXT.splitlines()[:2000]), model_writer=buf, vocab_size=300, num_threads=1,
        minloglevel=2, **options,
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=message) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(err.value)


# ---------------------------------------------------------------- tiny `tokenizers` models (always run)


def _metaspace_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        [PYDOC_TEXT], trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _metaspace_unigram() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        [PYDOC_TEXT[:100_000]],
        trainers.UnigramTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"),
    )
    return tok


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [PYDOC_TEXT],
        trainers.BpeTrainer(
            vocab_size=800, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return tok


TRAINED = {"metaspace_bpe": _metaspace_bpe, "metaspace_unigram": _metaspace_unigram, "byte_level_bpe": _byte_level_bpe}
CONFIGS = {
    "metaspace_bpe": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "metaspace_unigram": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None},
    "byte_level_bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}


@pytest.fixture(scope="module")
def trained():
    """name -> raw `tokenizers.Tokenizer` trained on pydoc text."""
    return {name: build() for name, build in TRAINED.items()}


def _save_json_folder(raw: Tokenizer, folder, config: dict | None):
    folder.mkdir()
    raw.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_tokenizer_json_equals_raw(trained, tmp_path, name):
    folder = _save_json_folder(trained[name], tmp_path / name, CONFIGS[name])
    tok = load_tokenizer(folder)
    # reference: the saved file (an in-memory Unigram can differ from its own reload on score ties)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = TRICKY + corpus_chunks(PYDOC_TEXT[-50_000:], 1009)
    assert_same_ids(tok, lambda t: raw.encode(t, add_special_tokens=False).ids, texts)
    # with special tokens: whatever the tokenizer.json post-processor adds (BOS for metaspace_bpe)
    assert tok.encode("Hello world") == raw.encode("Hello world").ids
    assert tok.bos_token_id == raw.token_to_id(CONFIGS[name]["bos_token"])
    assert tok.pad_token is None


def test_vocab_merges_folder_equals_raw(trained, tmp_path):
    raw = trained["byte_level_bpe"]
    raw.model.save(str(tmp_path))  # writes vocab.json + merges.txt only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    tok = load_tokenizer(tmp_path)
    assert_same_ids(tok, lambda t: raw.encode(t, add_special_tokens=False).ids, TRICKY)
    assert tok.decode(raw.encode("emoji 🦙 and  spaces\n").ids) == "emoji 🦙 and  spaces\n"


def test_built_tokenizer_returned_unchanged(trained, tmp_path):
    tok = load_tokenizer(_save_json_folder(trained["metaspace_bpe"], tmp_path / "t", None))
    assert load_tokenizer(tok) is tok


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_stable_and_distinct(trained, tmp_path):
    folder = _save_json_folder(trained["metaspace_bpe"], tmp_path / "a", CONFIGS["metaspace_bpe"])
    first, second = load_tokenizer(folder), load_tokenizer(folder)
    fp = tokenizer_fingerprint(first)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(second) == fp

    second.backend_tokenizer.enable_truncation(16)  # per-call setting: ids of a text are unchanged
    assert tokenizer_fingerprint(second) == fp

    fps = {tokenizer_fingerprint(load_tokenizer(_save_json_folder(raw, tmp_path / n, CONFIGS[n])))
           for n, raw in trained.items()}
    assert len(fps) == len(trained) and fp in fps

    other_pad = dict(CONFIGS["metaspace_bpe"], pad_token="</s>")
    padded = load_tokenizer(_save_json_folder(trained["metaspace_bpe"], tmp_path / "pad", other_pad))
    assert tokenizer_fingerprint(padded) != fp


def test_fingerprint_needs_fast_tokenizer():
    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenizer_fingerprint(object())


# ---------------------------------------------------------------- bad input


def test_missing_folder_and_files(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(FileNotFoundError, match=str(afile)):
        load_tokenizer(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no tokenizer files in {empty}"):
        load_tokenizer(empty)
    with pytest.raises(TypeError, match="folder path or a tokenizer"):
        load_tokenizer(42)


@pytest.mark.parametrize(
    "name, content",
    [
        ("tokenizer.json", b"{not json"),
        ("tokenizer.model", b"\x00garbage\xff" * 10),
        ("tokenizer.model", b""),
        ("vocab.json", b"[1, 2]"),
        ("merges.txt", b"#version: 0.2\nnot-a-merge-line\n"),
    ],
)
def test_unreadable_file_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    if name == "vocab.json":
        (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    if name == "merges.txt":
        (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
        load_tokenizer(tmp_path)


def test_bad_config_named(trained, tmp_path):
    folder = _save_json_folder(trained["metaspace_bpe"], tmp_path / "a", None)
    (folder / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=str(folder / "tokenizer_config.json")):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": 5}))
    with pytest.raises(ValueError, match=r"'bos_token'.*5"):
        load_tokenizer(folder)


def test_module_does_not_import_jax():
    import subprocess

    code = "import sys, fusejax.tokenizer; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- real tokenizers (shared data)

# test vector file -> tokenizer folder
VECTORS = {"llama-spm": "llama2", "gpt-2": "gpt2", "mpt": "gpt-neox-20b"}


def read_vectors(shared_data, name):
    """llama.cpp vectors: every string is followed by the separator; one line of ids (no BOS) per string."""
    folder = shared_data / "tokenizers" / "testvectors"
    inp = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts) - 1 == len(ids) == 46
    return list(zip(texts[:-1], ids, strict=True))


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_hf_test_vectors(shared_data, name):
    tok = load_tokenizer(shared_data / "tokenizers" / VECTORS[name])
    vectors = read_vectors(shared_data, name)
    # the vectors hold no BOS and cover leading spaces and whitespace runs
    assert all(ids[:1] != [tok.bos_token_id] for _, ids in vectors if name == "llama-spm")
    assert any(text.startswith(" ") for text, _ in vectors) and any("   " in text for text, _ in vectors)
    for text, ids in vectors:
        assert tok.encode(text, add_special_tokens=False) == ids, f"ids differ on {text!r}"


def test_llama_vectors_are_sentencepiece_without_bos(shared_data):
    """The llama-spm vectors are exactly sentencepiece's encode (no BOS): the comparison above is honest."""
    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "llama2" / "tokenizer.model"))
    for text, ids in read_vectors(shared_data, "llama-spm"):
        assert sp.encode(text) == ids
    assert sp.encode(" Hello") == [29871, 15043] and sp.encode("  ") == [1678]


def test_llama2_equals_sentencepiece(shared_data):
    folder = shared_data / "tokenizers" / "llama2"
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token) == (1, 2, 0, None)
    assert len(tok) == 32000
    assert tok.encode("Hello") == [1, 15043]  # add_bos_token from tokenizer_config.json
    assert_same_ids(tok, sp.encode, TRICKY + WHITESPACE_RUNS)
    for ids in (sp.encode(text) for text in TRICKY[8:]):
        assert tok.decode(ids) == sp.decode(ids)
    for path in sorted((shared_data / "corpora").glob("*.txt")):
        chunks = corpus_chunks(path.read_text(encoding="utf-8", errors="strict"), 3001)
        got = tok(chunks, add_special_tokens=False)["input_ids"]
        expected = sp.encode(chunks)
        bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        assert not bad, f"{path.name}: {len(bad)} of {len(chunks)} chunks differ, first {chunks[bad[0]][:80]!r}"


def test_openllama_equals_tokenizer_json(shared_data):
    folder = shared_data / "tokenizers" / "openllama-v1"
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    # tokenizer_config.json wins; its null pad_token falls back to special_tokens_map.json
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "[PAD]")
    assert (tok.bos_token_id, tok.pad_token_id, len(tok)) == (1, 32000, 32001)
    text = (shared_data / "corpora" / "pytorch-examples-python.txt").read_text(encoding="utf-8")
    assert_same_ids(tok, lambda t: raw.encode(t, add_special_tokens=False).ids, TRICKY + corpus_chunks(text, 5003))
    assert tok.encode("Hello") == raw.encode("Hello").ids == [1, 16644]


def test_real_fingerprints(shared_data):
    folders = [shared_data / "tokenizers" / name for name in ("llama2", "gpt2", "gpt-neox-20b", "openllama-v1")]
    fps = [tokenizer_fingerprint(load_tokenizer(f)) for f in folders]
    assert len(set(fps)) == len(fps)
    assert tokenizer_fingerprint(load_tokenizer(folders[0])) == fps[0]


# ---------------------------------------------------------------- 128k+ vocabularies: Llama 3 and DeepSeek-V4

# Meta's pre-tokenizer pattern for Llama 3 (meta-llama/llama3, llama/tokenizer.py)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fuse <|eot_id|> two models?"}]


@pytest.fixture(scope="module")
def large(shared_data):
    """{name: (load_tokenizer's tokenizer, raw tokenizers.Tokenizer)} and every 4th 3001-character chunk of each
    shared corpus (the whole corpora agree too; a quarter keeps the test fast)."""
    folders = {name: shared_data / "tokenizers" / name for name in ("llama3", "deepseek-v4")}
    toks = {name: (load_tokenizer(f), Tokenizer.from_file(str(f / "tokenizer.json"))) for name, f in folders.items()}
    chunks = [c for path in sorted((shared_data / "corpora").glob("*.txt"))
              for c in corpus_chunks(path.read_text(encoding="utf-8"), 3001)[::4]]
    return toks, chunks


@pytest.mark.parametrize("name,size,specials", [
    ("llama3", 128256, ("<|begin_of_text|>", "<|eot_id|>", None, None)),
    ("deepseek-v4", 129280, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", None, "<｜end▁of▁sentence｜>")),
])
def test_large_vocab_equals_tokenizer_json(large, name, size, specials):
    (tok, raw), chunks = large[0][name], large[1]
    assert len(tok) == size and (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == specials
    texts = TRICKY + chunks + [tok.bos_token + "Hi" + tok.eos_token]
    got = tok(texts, add_special_tokens=False)["input_ids"]
    expected = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first {texts[bad[0]][:80]!r}"
    assert tok.encode("Hello world") == raw.encode("Hello world").ids  # neither adds a BOS


def test_llama3_equals_tiktoken_and_chat_template(large, shared_data):
    """Meta's tiktoken files and pattern give the same ids; the chat template of tokenizer_config.json is kept."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    (tok, _), chunks = large[0]["llama3"], large[1]
    ranks = load_tiktoken_bpe(str(shared_data / "tokenizers" / "llama3" / "tokenizer.model"))
    specials = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    assert len(ranks) == 128000 and len(specials) == 256
    assert (specials["<|begin_of_text|>"], specials["<|eot_id|>"], specials["<|start_header_id|>"]) == (
        128000, 128009, 128006)
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nFuse <|eot_id|> two models?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    texts = TRICKY + chunks + [chat]
    got = tok(texts, add_special_tokens=False)["input_ids"]
    expected = enc.encode_batch(texts, allowed_special="all")
    bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first {texts[bad[0]][:80]!r}"
    assert got[-1][:3] == [128000, 128006, 9125]  # <|begin_of_text|><|start_header_id|>system


def test_tiktoken_model_alone_refused(shared_data, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((shared_data / "tokenizers" / "llama3" / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer\.model: a tiktoken BPE file .* needs the tokenizer\.json"):
        load_tokenizer(tmp_path)
