"""Corpus preparation: input formats, bad documents, block cutting, ids, held-out split, resume."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fusejax import corpus
from fusejax.corpus import prepare_corpus, split_document
from fusejax.schema import SPLITS
from fusejax.store import StoreMismatchError, open_store
from fusejax.tokenizer import load_tokenizer

DOCS = [topics[k] for k in sorted(topics)][:24]  # real English/code text, 24 documents of 0.3-30 kB


@pytest.fixture(scope="module")
def backend():
    """A byte-level BPE with 400 tokens trained on the pydoc topics (a `tokenizers.Tokenizer`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(DOCS, trainer)
    return tok


@pytest.fixture(scope="module")
def tok(backend):
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def read_docs(path):
    """{doc_id: (text rebuilt from its blocks, [split of each block])} from a corpus store."""
    out = {}
    for row in open_store(path, verify=True):
        text, splits = out.get(row["doc_id"], ("", []))
        out[row["doc_id"]] = (text + row["text"].decode("utf-8"), splits + [SPLITS[int(row["split"])]])
    return out


def tree_bytes(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def check_blocks(text, blocks, block_size, count_tokens, token_ends):
    """Blocks cover the text in order, respect block_size on re-tokenization, and cut at token ends."""
    assert blocks[0][0] == 0 and blocks[-1][1] == len(text)
    for (a, b, m), (a2, _, _) in zip(blocks, blocks[1:]):
        assert b == a2 and b in token_ends
    for a, b, m in blocks:
        assert a < b
        assert m == count_tokens(text[a:b]) <= block_size


def test_split_document_against_tokenizer(tok, backend):
    text = "\n\n".join(DOCS[:6])
    ref = backend.encode(text, add_special_tokens=False)
    ends = {e for _, e in ref.offsets}
    for block_size in (4, 7, 64, 500):
        blocks = split_document(text, tok, block_size)
        check_blocks(text, blocks, block_size, lambda s: len(backend.encode(s).ids), ends)
        if block_size >= 64:  # no needless short blocks: all but the last are at least half full
            assert min(m for _, _, m in blocks[:-1]) >= block_size // 2
        # tokenized in small windows instead of at once: the same blocks
        assert split_document(text, tok, block_size, piece_chars=3000) == blocks
    assert split_document("", tok, 8) == []


MEMORY_SCRIPT = """
import sys
from transformers import PreTrainedTokenizerFast
from fusejax.corpus import split_document

def peak_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024

tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read()
base = peak_mib()
blocks = split_document(text, tok, 512)
assert blocks[0][0] == 0 and blocks[-1][1] == len(text)
print(peak_mib() - base)
"""


def test_split_memory_bounded_by_piece_not_document(tmp_path, backend):
    # a 1 MiB single-line document: tokenized at once it grows the peak RSS by ~300 MiB (250x the text);
    # in windows of PIECE_CHARS code points by a few MiB whatever the document's length
    backend.save(str(tmp_path / "tok.json"))
    line = " ".join(DOCS).replace("\n", " ")
    (tmp_path / "doc.txt").write_text((line * (2**20 // len(line) + 1))[: 2**20], encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "tok.json"), str(tmp_path / "doc.txt")],
                         capture_output=True, text=True, check=True)
    growth_mib = int(out.stdout.split()[-1])
    assert growth_mib < 64, f"cutting a 1 MiB document grew the peak RSS by {growth_mib} MiB"


def test_split_prefers_newline_then_whitespace(tok, backend):
    # a newline 5 tokens before the limit wins over whitespace at the limit; without newline, whitespace wins
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
    text = words + "\n" + words
    n_first = len(backend.encode(words + "\n").ids)
    blocks = split_document(text, tok, n_first + 5, boundary_window=8)
    assert text[: blocks[0][1]] == words + "\n"
    blocks = split_document(words, tok, 11, boundary_window=8)
    assert words[blocks[0][1] - 1] == " " or words[blocks[0][1]] == " "
    # with no window the cut lands exactly at the limit, even inside a word
    blocks = split_document(words, tok, 11, boundary_window=0)
    assert len(backend.encode(words[: blocks[0][1]]).ids) == 11


def test_split_never_separates_bytes_of_one_character(tok, backend):
    text = "😀" * 20  # every emoji is several byte tokens with the same character offsets
    blocks = split_document(text, tok, 6)
    check_blocks(text, blocks, 6, lambda s: len(backend.encode(s).ids), set(range(len(text))))
    with pytest.raises(ValueError, match="block_size too small"):
        split_document(text, tok, 2)


def reference_tokenizer(folder):
    """(count_tokens(text), token_ends(text)) from an implementation independent of fusejax.tokenizer:
    SentencePiece for tokenizer.model, the raw `tokenizers` file for tokenizer.json, else AutoTokenizer."""
    if (folder / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))

        def ends(text):
            char_of_byte = np.cumsum([0] + [len(ch.encode()) for ch in text])
            return {int(np.searchsorted(char_of_byte, p.end)) for p in sp.encode_as_proto(text).pieces}

        return (lambda text: len(sp.encode(text))), ends
    if (folder / "tokenizer.json").exists():
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return (
            lambda text: len(raw.encode(text, add_special_tokens=False).ids),
            lambda text: {e for _, e in raw.encode(text, add_special_tokens=False).offsets},
        )
    hf = AutoTokenizer.from_pretrained(folder)
    return (
        lambda text: len(hf(text, add_special_tokens=False)["input_ids"]),
        lambda text: {e for _, e in hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]},
    )


@pytest.mark.parametrize("name", ["llama2", "gpt2", "gpt-neox-20b", "openllama-v1"])
def test_split_with_real_tokenizers(shared_data, name):
    folder = shared_data / "tokenizers" / name
    count, ends = reference_tokenizer(folder)
    text = (shared_data / "corpora" / "wikitext2-raw-test.txt").read_text("utf-8")[:30000]
    text += (shared_data / "corpora" / "pytorch-examples-python.txt").read_text("utf-8")[:30000]
    text += "naïve 😀 emoji 日本語のテキスト\n"
    for block_size in (64, 512):
        blocks = split_document(text, load_tokenizer(folder), block_size)
        check_blocks(text, blocks, block_size, count, ends(text))
        assert split_document(text, load_tokenizer(folder), block_size, piece_chars=4096) == blocks


def write_inputs(root):
    """One input of every local format; returns ({path: fmt}, {doc_id: text}) with the expected documents."""
    root.mkdir()
    expected = {}
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    expected["a.txt:0"] = DOCS[0]
    (root / "b.txt").write_bytes(b"first doc\nline 2\n\n \t\nsecond doc\r\n\r\n\r\nthird\n")
    blank = {"b.txt:0": "first doc\nline 2", "b.txt:1": "second doc", "b.txt:2": "third"}
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        for k, doc in enumerate(DOCS[1:4]):
            f.write(json.dumps({"id": k, "text": doc}) + "\n")
            expected[f"c.jsonl:{k}"] = doc
    pq.write_table(pa.table({"text": DOCS[4:7], "x": [1, 2, 3]}), root / "d.parquet", row_group_size=2)
    expected.update({f"d.parquet:{k}": doc for k, doc in enumerate(DOCS[4:7])})
    # a datasets.save_to_disk DatasetDict: dataset_dict.json + per split state.json and Arrow stream files
    hf = root / "hfds"
    (hf / "train").mkdir(parents=True)
    (hf / "test").mkdir()
    (hf / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split, docs in (("train", DOCS[7:10]), ("test", DOCS[10:11])):
        files = []
        for k in range(len(docs)):
            name = f"data-{k:05d}-of-{len(docs):05d}.arrow"
            table = pa.table({"text": docs[k : k + 1]})
            with pa.ipc.new_stream(hf / split / name, table.schema) as w:
                w.write_table(table)
            files.append({"filename": name})
        (hf / split / "state.json").write_text(json.dumps({"_data_files": files, "_split": split}))
        (hf / split / "dataset_info.json").write_text("{}")
        expected.update({f"hfds/{split}:{k}": doc for k, doc in enumerate(docs)})
    return expected, blank


def test_every_input_format(tmp_path, tok):
    expected, blank = write_inputs(tmp_path / "in")
    inputs = [tmp_path / "in" / n for n in ("a.txt", "c.jsonl", "d.parquet", "hfds")]
    summary = prepare_corpus(inputs, tok, tmp_path / "out", block_size=50, rows_per_shard=16)
    docs = read_docs(tmp_path / "out")
    assert {k: v[0] for k, v in docs.items()} == expected
    assert summary["documents"] == len(expected) and summary["skipped"] == {}

    # blank-line mode, and a folder input (searched recursively for known suffixes)
    prepare_corpus(tmp_path / "in" / "b.txt", tok, tmp_path / "blank", block_size=50, txt_split="blank_line")
    assert {k: v[0] for k, v in read_docs(tmp_path / "blank").items()} == blank
    prepare_corpus(tmp_path / "in", tok, tmp_path / "dir", block_size=50, fmt="txt")
    assert {k: v[0] for k, v in read_docs(tmp_path / "dir").items()} == {
        "in/a.txt:0": DOCS[0], "in/b.txt:0": (tmp_path / "in" / "b.txt").read_bytes().decode(),
    }
    # the stored fields agree with the text
    store = open_store(tmp_path / "out")
    for row in store:
        doc = expected[row["doc_id"]]
        start, end = row["span"]
        assert doc[start:end].encode("utf-8") == row["text"] and row["n_bytes"] == len(row["text"])
        assert row["n_tokens"] == len(tok(doc[start:end], add_special_tokens=False)["input_ids"]) <= 50
    assert summary["blocks"] == len(store)
    assert summary["tokens"] == sum(int(r["n_tokens"]) for r in store)
    assert summary["bytes"] == sum(len(doc.encode()) for doc in expected.values())
    assert store.meta["block_size"] == 50 and store.kind == "corpus"


def never_blocks_on(fifo, call):
    """``call()``'s exception (None if it returned), run in a thread; if it is still reading ``fifo`` after a
    minute, the FIFO gets a writer that closes at once (EOF) and the test fails instead of hanging."""
    raised = []

    def target():
        try:
            call()
        except Exception as e:
            raised.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(f"blocked reading the FIFO {fifo}")
    return raised[0] if raised else None


@pytest.mark.parametrize("inside", [False, True], ids=["given", "in a folder"])
def test_fifo_input_is_refused_not_read(tmp_path, tok, inside):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a document")
    fifo = tmp_path / "in" / "pipe.txt"
    os.mkfifo(fifo)
    error = never_blocks_on(fifo, lambda: prepare_corpus(tmp_path / "in" if inside else fifo, tok, tmp_path / "out",
                                                         block_size=16))
    assert isinstance(error, ValueError) and str(error) == (
        f"corpus input {fifo} is not a regular file (a FIFO, socket, device or broken link)")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet_file_is_named(tmp_path, tok, damage):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": DOCS[:3]}), path)
    path.write_bytes(b"PAR1 not parquet" if damage == "garbage" else path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"^{path}: not a readable parquet file: "):
        prepare_corpus(path, tok, tmp_path / "out", block_size=16)


def test_bad_documents_counted_and_named(tmp_path, tok, caplog):
    root = tmp_path / "in"
    root.mkdir()
    (root / "empty.txt").write_text("")
    (root / "space.txt").write_text(" \n\t ")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "ok.txt").write_text("fine text")
    with open(root / "j.jsonl", "wb") as f:
        f.write(json.dumps({"text": "good"}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9"}\n')  # not UTF-8
        f.write(b"{not json\n")
        f.write(b"\n")
        f.write(json.dumps({"text": None}).encode() + b"\n")
        f.write(json.dumps({"text": "\ud800 lone surrogate"}).encode() + b"\n")
    with caplog.at_level(logging.WARNING, logger="fusejax.corpus"):
        summary = prepare_corpus(root, tok, tmp_path / "out", block_size=16, max_warnings=3)
    assert summary["documents"] == 2
    assert summary["skipped"] == {"empty": 4, "invalid_json": 1, "invalid_utf8": 3}
    assert "invalid_utf8 document at " in caplog.text and "j.jsonl line 2" in caplog.text
    assert caplog.text.count("skipping") == 3 and "5 more skipped documents" in caplog.text
    assert set(read_docs(tmp_path / "out")) == {"in/j.jsonl:0", "in/ok.txt:0"}

    (root / "k.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match="k.jsonl line 1.*'text'"):
        prepare_corpus(root / "k.jsonl", tok, tmp_path / "out2", block_size=16)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(KeyError, match="x.parquet.*no column 'body'"):
        prepare_corpus(tmp_path / "x.parquet", tok, tmp_path / "out3", block_size=16, text_field="body")


def test_ids_stable_and_rerun_idempotent(tmp_path, tok):
    expected, _ = write_inputs(tmp_path / "in")
    inputs = [tmp_path / "in" / "a.txt", tmp_path / "in" / "c.jsonl"]
    first = prepare_corpus(inputs, tok, tmp_path / "one", block_size=40, rows_per_shard=8)
    prepare_corpus(inputs, tok, tmp_path / "two", block_size=40, rows_per_shard=8)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")
    for row in open_store(tmp_path / "one"):  # id = first 8 bytes (little endian) of sha256(doc \0 start \0 end)
        key = f"{row['doc_id']}\x00{row['span'][0]}\x00{row['span'][1]}".encode()
        assert row["id"] == int(np.frombuffer(hashlib.sha256(key).digest()[:8], "<i8")[0])
    before = tree_bytes(tmp_path / "one")
    again = prepare_corpus(inputs, tok, tmp_path / "one", block_size=40, rows_per_shard=8)
    assert tree_bytes(tmp_path / "one") == before
    assert again == {**first, "resumed_blocks": first["blocks"]}
    with pytest.raises(StoreMismatchError, match="block_size"):
        prepare_corpus(inputs, tok, tmp_path / "one", block_size=41, rows_per_shard=8)
    (tmp_path / "in" / "a.txt").write_text(DOCS[0] + "more")
    with pytest.raises(StoreMismatchError, match="inputs"):
        prepare_corpus(inputs, tok, tmp_path / "one", block_size=40, rows_per_shard=8)


def test_empty_corpus_store_replaced_by_fixed_inputs(tmp_path, tok, caplog):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    assert prepare_corpus(tmp_path / "empty.jsonl", tok, tmp_path / "out", block_size=40)["blocks"] == 0
    with caplog.at_level(logging.WARNING, logger="fusejax.store"):
        summary = prepare_corpus(tmp_path / "good.jsonl", tok, tmp_path / "out", block_size=40)
    assert f"{tmp_path / 'out'}: replacing an empty store" in caplog.text
    prepare_corpus(tmp_path / "good.jsonl", tok, tmp_path / "ref", block_size=40)
    assert summary["blocks"] > 0 and tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ref")
    with pytest.raises(StoreMismatchError, match="inputs"):  # a store with blocks is still never replaced
        prepare_corpus(tmp_path / "empty.jsonl", tok, tmp_path / "out", block_size=40)


def test_input_edited_to_the_same_size_and_mtime_is_refused(tmp_path, tok):
    """An edit of an early document, which a resumed run skips without reading its blocks: refused by content."""
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(DOCS[:3]))
    prepare_corpus(path, tok, tmp_path / "out", block_size=40, txt_split="blank_line")
    before, data = path.stat(), path.read_bytes()
    path.write_bytes(data[:100].swapcase() + data[100:])  # same size, other text
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(StoreMismatchError, match="inputs"):
        prepare_corpus(path, tok, tmp_path / "out", block_size=40, txt_split="blank_line")


def test_heldout_split_deterministic_by_document(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {k}: " + DOCS[k % 5][:300]}) + "\n" for k in range(200)))
    splits = {}
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        prepare_corpus(path, tok, tmp_path / out, block_size=30, holdout_fraction=0.3, seed=seed)
        docs = read_docs(tmp_path / out)
        assert all(len(set(s)) == 1 for _, s in docs.values())  # whole documents go to one side
        splits[out] = {k: s[0] for k, (_, s) in docs.items()}
    assert splits["a"] == splits["b"] and splits["a"] != splits["c"]
    held = sum(s == "heldout" for s in splits["a"].values())
    assert 35 <= held <= 85  # 200 documents at 0.3
    prepare_corpus(path, tok, tmp_path / "all", block_size=30, holdout_fraction=1.0)
    assert {s for _, ss in read_docs(tmp_path / "all").values() for s in ss} == {"heldout"}


class Killed(Exception):
    pass


def test_resume_after_kill_is_byte_identical(tmp_path, tok, monkeypatch):
    expected, _ = write_inputs(tmp_path / "in")
    inputs = [tmp_path / "in" / n for n in ("a.txt", "c.jsonl", "d.parquet", "hfds")]
    ref = prepare_corpus(inputs, tok, tmp_path / "ref", block_size=40, rows_per_shard=16)

    real_split, calls, kill_at = corpus.split_document, [], [6]

    def dying_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at[0]:
            raise Killed
        return real_split(*args, **kwargs)

    monkeypatch.setattr(corpus, "split_document", dying_split)
    with pytest.raises(Killed):
        prepare_corpus(inputs, tok, tmp_path / "run", block_size=40, rows_per_shard=16)
    done = len(open_store(tmp_path / "run"))
    assert 0 < done < ref["blocks"]
    calls.clear()
    kill_at[0] = None
    resumed = prepare_corpus(inputs, tok, tmp_path / "run", block_size=40, rows_per_shard=16)
    assert tree_bytes(tmp_path / "run") == tree_bytes(tmp_path / "ref")
    assert resumed == {**ref, "resumed_blocks": done}
    assert len(calls) < len(expected)  # documents already complete were not tokenized again


def test_processes_split_documents_and_resume_their_own_shards(tmp_path, tok, monkeypatch):
    write_inputs(tmp_path / "in")
    inputs = [tmp_path / "in" / n for n in ("a.txt", "c.jsonl", "d.parquet", "hfds")]
    prepare_corpus(inputs, tok, tmp_path / "one", block_size=40, rows_per_shard=4)
    single = {r["id"]: (r["doc_id"], r["text"]) for r in open_store(tmp_path / "one")}

    real_split, calls = corpus.split_document, []

    def dying_split(*args, **kwargs):  # process 1 dies on its 4th document
        calls.append(1)
        if len(calls) == 4:
            raise Killed
        return real_split(*args, **kwargs)

    prepare_corpus(inputs, tok, tmp_path / "two", block_size=40, rows_per_shard=4, process_index=0, num_processes=2)
    monkeypatch.setattr(corpus, "split_document", dying_split)
    with pytest.raises(Killed):
        prepare_corpus(inputs, tok, tmp_path / "two", block_size=40, rows_per_shard=4, process_index=1,
                       num_processes=2)
    monkeypatch.setattr(corpus, "split_document", real_split)
    summary = prepare_corpus(inputs, tok, tmp_path / "two", block_size=40, rows_per_shard=4, process_index=1,
                             num_processes=2)
    assert summary["resumed_blocks"] > 0
    store = open_store(tmp_path / "two", verify=True)
    assert {p.name for p in (tmp_path / "two").glob("manifest-p*.json")} == {"manifest-p0000.json",
                                                                              "manifest-p0001.json"}
    # together the two processes wrote exactly the single process's blocks, each document by one process
    assert {r["id"]: (r["doc_id"], r["text"]) for r in store} == single
    owners = {}
    for shard in store.shards:
        for i in range(len(shard.ids)):
            owners.setdefault(shard.row(i)["doc_id"], set()).add(shard.name[:11])
    assert all(len(o) == 1 for o in owners.values()) and len(set().union(*owners.values())) == 2


def test_tfds_folder(tmp_path, tok, monkeypatch):
    folder = tmp_path / "my_ds" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "features.json").write_text("{}")
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not installed
    with pytest.raises(ImportError, match=r"TFDS folder.*fusejax\[tfds\]"):
        prepare_corpus(folder, tok, tmp_path / "out", block_size=32)

    # the documented TFDS data-source API: builder_from_directory(dir).as_data_source() -> {split: records}
    records = {"train": [{"text": b"tfds one"}, {"text": "caf\xe9".encode("latin-1")}], "test": [{"text": b"two"}]}
    seen = []

    def builder_from_directory(path):
        seen.append(path)
        return types.SimpleNamespace(as_data_source=lambda: records)

    fake_tfds = types.SimpleNamespace(builder_from_directory=builder_from_directory)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
    summary = prepare_corpus(folder, tok, tmp_path / "out", block_size=32)
    assert seen == [str(folder)]
    assert summary["skipped"] == {"invalid_utf8": 1}
    docs = {k: v[0] for k, v in read_docs(tmp_path / "out").items()}
    assert docs == {"1.0.0/test:0": "two", "1.0.0/train:0": "tfds one"}
