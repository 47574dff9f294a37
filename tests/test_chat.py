"""Conversations (`corpus.format: chat`): rendering with each model's chat template, assistant spans, cutting at
turn boundaries, and the alignment of chat blocks across tokenizers (template tokens never paired with content).
Real Llama 3 (own template) and DeepSeek-V4 (configured template) tokenizers when ../shared/data is present;
tiny trained tokenizers otherwise."""

import json

import numpy as np
import pytest
from pydoc_data.topics import topics

from fusejax import align, chat
from fusejax.config import load_config
from fusejax.corpus import prepare_corpus
from fusejax.data import AlignedBatches, TokenBatches
from fusejax.schema import format_meta, topk_fields, unpack_tables
from fusejax.store import StoreWriter, open_store
from fusejax.tokenizer import tokenizer_fingerprint
from tiny import bpe_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEEPSEEK = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
            "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
            "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}")
DROPS = "{% for m in messages %}<{{ m['role'] }}>{% endfor %}"  # renders no content at all
EOT = {"meta": "<|im_end|>", "bytes": None, "llama3": "<|eot_id|>", "deepseek-v4": None}  # None: the EOS token
KEYS = ("assignment", "if", "while", "for", "with", "try", "class", "function")


def conversation(key: str) -> dict:
    text = topics[key]
    return {"messages": [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": f"What is the {key} statement?"},
        {"role": "assistant", "content": text[:120]},
        {"role": "user", "content": "Tell me more."},
        {"role": "assistant", "content": "  " + text[120:220] + " \n"},  # padded: Llama 3's template trims
    ]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toks(tmp_path_factory, request):
    """name -> (tokenizer folder, template file or None): two tiny BPEs, and the real ones when present."""
    root = tmp_path_factory.mktemp("toks")
    texts = [topics[k] for k in KEYS]
    out = {}
    for name, kind, vocab, template in (("meta", "metaspace", 300, CHATML), ("bytes", "bytelevel", 400, DEEPSEEK)):
        bpe_tokenizer(kind, vocab, texts).save_pretrained(root / name)
        (root / f"{name}.jinja").write_text(template)
        out[name] = (str(root / name), str(root / f"{name}.jinja"))
    (root / "deepseek.jinja").write_text(DEEPSEEK)
    try:
        shared = request.getfixturevalue("shared_data")
        out["llama3"] = (str(shared / "tokenizers" / "llama3"), None)
        out["deepseek-v4"] = (str(shared / "tokenizers" / "deepseek-v4"), str(root / "deepseek.jinja"))
    except pytest.skip.Exception:
        pass
    return out


def overlaps_content(tok, text: str, messages, ids_len: int):
    """Brute force: per token, the index of the assistant message whose content (as found in the rendered
    text, stripped) its characters overlap, else -1; and per assistant message, the index of the first token
    that starts at or after the content's end (its end of turn; None when no token does)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == ids_len
    owner, ends = np.full(ids_len, -1), {}
    cursor = 0
    for n, m in enumerate(messages):
        needle = m["content"] if m["content"] in text[cursor:] else m["content"].strip()
        at = text.index(needle, cursor)
        cursor = at + len(needle)
        if m["role"] == "assistant":
            for i, (s, e) in enumerate(enc["offset_mapping"]):
                if e > s and e > at and s < cursor:
                    owner[i] = n
            ends[n] = next((i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s >= cursor), None)
    return owner, ends


@pytest.mark.parametrize("name", ["meta", "bytes", "llama3", "deepseek-v4"])
def test_assistant_spans(toks, name):
    if name not in toks:
        pytest.skip("real tokenizers absent")
    tok = chat.chat_tokenizer(*toks[name], name)
    messages = chat.messages_of(conversation("while"), "x")
    ids, spans = chat.encode(tok, messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    owner, ends = overlaps_content(tok, text, messages, len(ids))
    assert [(a, b) for a, b in spans] == [(np.flatnonzero(owner == n)[0], np.flatnonzero(owner == n)[-1] + 1)
                                          for n in (2, 4)]
    for (a, b), n in zip(spans, (2, 4)):
        assert messages[n]["content"].strip() in tok.decode(ids[a:b])
        assert ids[a:b].tolist() != []
    content = chat.scored_positions(len(ids), spans, end_of_turn=False)
    assert np.array_equal(content[:-1], owner[1:] >= 0) and not content[-1]
    # the end of turn: the token that follows each assistant content in the rendered text is scored as well
    assert set(ends) == {2, 4} and None not in ends.values()
    scored = chat.scored_positions(len(ids), spans)
    assert np.array_equal(np.flatnonzero(scored & ~content), [ends[2] - 1, ends[4] - 1])
    eot = EOT[name] or tok.eos_token
    for n in (2, 4):
        assert text[:text.index(eot, text.index(messages[n]["content"].strip()))].rstrip().endswith(
            messages[n]["content"].strip()), "the template's end of turn follows the content"
        assert eot.startswith(tok.decode(ids[ends[n]])) and tok.decode(ids[ends[n]])
    if name == "llama3":
        assert tok.convert_ids_to_tokens(int(ids[ends[4]])) == "<|eot_id|>"


def test_nothing_scored_after_the_last_message_when_the_template_adds_nothing(toks, tmp_path):
    """A template that ends with the last message's content: the first assistant message's end of turn is the
    separator the template puts there, the last one has none."""
    bare = tmp_path / "bare.jinja"
    bare.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if not loop.last %}\n{% endif %}"
                    "{% endfor %}")
    tok = chat.chat_tokenizer(toks["meta"][0], str(bare), "bare")
    messages = chat.messages_of(conversation("while"), "x")
    messages[-1]["content"] = messages[-1]["content"].strip()
    ids, spans = chat.encode(tok, messages)
    assert spans[-1, 1] == len(ids)
    scored, content = chat.scored_positions(len(ids), spans), chat.scored_positions(len(ids), spans, end_of_turn=False)
    assert np.flatnonzero(scored & ~content).tolist() == [spans[0, 1] - 1]


def test_sharegpt_is_the_same_conversation():
    share = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                "value": m["content"]} for m in conversation("if")["messages"]]}
    assert chat.messages_of(share, "x") == chat.messages_of(conversation("if"), "x")


@pytest.fixture(scope="module")
def chat_run(toks, tmp_path_factory):
    """A chat corpus cut for the target (first tokenizer), and fake top-k stores of the sources (the target
    itself as "self", the others) that name, in each row's first logit, the source position it was taken at."""
    root = tmp_path_factory.mktemp("chat")
    target = "meta"
    models = {"self": toks[target], **{n: toks[n] for n in ("bytes", "llama3") if n in toks}}  # DeepSeek-V4: spans
    sources = list(models)
    data = write_jsonl(root / "chat.jsonl", [conversation(k) for k in KEYS])
    out = root / "run"
    prepare_corpus(data, toks[target][0], out / "corpus", block_size=200, fmt="chat", chat_template=toks[target][1],
                   holdout_fraction=0.25, seed=1)
    corpus = open_store(out / "corpus")
    for n, name in enumerate(sources):
        tok = chat.chat_tokenizer(*models[name], name)
        meta = format_meta("topk", source=name, tokenizer_fingerprint=tokenizer_fingerprint(tok),
                           vocab_size=len(tok), k=3, logits_dtype="float32", corpus=corpus.meta,
                           eos_appended=False, chat_template=chat.template_hash(tok))
        rng = np.random.default_rng(n)
        with StoreWriter(out / "represent" / name, kind="topk", meta=meta,
                         fields=topk_fields(3, "float32", len(tok)), rows_per_shard=8) as w:
            for p in range(len(corpus)):
                row = corpus.row(p)
                ids, _ = chat.encode(tok, chat.block_messages(row["text"]))
                topk = rng.integers(0, len(tok), (ids.size, 3))
                topk[:-1, 0] = ids[1:]
                logits = np.stack([np.arange(ids.size), -np.ones(ids.size), -2 * np.ones(ids.size)], 1)
                ce = np.arange(ids.size, dtype=np.float32)
                w.add(int(row["id"]), input_ids=ids, topk_ids=topk, topk_logits=logits.astype(np.float32),
                      token_ce=ce, seq_ce=np.float32(ce.mean()), nonfinite=0)
    cfg = load_config(data={
        "run": {"output_dir": str(out)},
        "corpus": {"format": "chat", "block_size": 200},
        "target": {"tokenizer": toks[target][0], "chat_template": toks[target][1]},
        "sources": [{"name": s, "tokenizer": models[s][0], "chat_template": models[s][1]} for s in sources],
        "represent": {"k": 3, "logits_dtype": "float32"},
        "align": {"use_vocab_map": False},
    })
    return cfg, corpus


def test_corpus_cut_at_turn_boundaries(chat_run):
    cfg, corpus = chat_run
    tok = chat.chat_tokenizer(cfg.target.tokenizer_path, cfg.target.chat_template, "target")
    by_doc = {}
    for p in range(len(corpus)):
        row = corpus.row(p)
        messages = chat.block_messages(row["text"])
        ids, _ = chat.encode(tok, messages)
        assert len(ids) == row["n_tokens"] <= 200
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        assert row["n_bytes"] == sum(len(m["content"].encode()) for m in messages if m["role"] == "assistant")
        by_doc.setdefault(row["doc_id"], []).append(tuple(row["span"]))
    assert any(len(v) > 1 for v in by_doc.values())  # some conversations did not fit one block
    for spans in by_doc.values():  # the runs of messages follow each other
        assert spans[0][0] == 1 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_aligned_chat_rows(chat_run):
    """Every filled table row of a source comes from a source position predicting a token of the same
    assistant message, or the end of turn of the same message (when spelled alike, else the one-hot of the
    target's); positions predicting template tokens are never scored and have empty tables."""
    cfg, corpus = chat_run
    aligner = align.BlockAligner(cfg, maps="require", verify=False)
    copied = total = ends_copied = 0
    for p in range(4):
        row = aligner.row(p)
        messages = chat.block_messages(corpus.row(p)["text"])
        tgt_ids, tgt_spans = chat.encode(aligner.target.tok, messages)
        assert np.array_equal(row["input_ids"], tgt_ids)
        scored = row["scored"]
        assert np.array_equal(scored, chat.scored_positions(len(tgt_ids), tgt_spans))
        ids, logits = unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], 3)
        assert (ids[~scored] == -1).all() and (ids[scored, :, 0] >= 0).all()
        tgt_owner = np.searchsorted(tgt_spans[:, 1], np.arange(len(tgt_ids)), side="right")  # message of a token
        tgt_end = {int(b): m for m, b in enumerate(tgt_spans[:, 1]) if b < len(tgt_ids)}  # end of turn -> message
        assert len(tgt_end) == len(tgt_spans) and scored[[b - 1 for b in tgt_end]].all()  # ChatML: <|im_end|>
        for n, (name, vocab) in enumerate(zip(aligner.names, aligner.vocabs)):
            src_ids, src_spans = chat.encode(vocab.tok, messages)
            src_owner = np.searchsorted(src_spans[:, 1], np.arange(len(src_ids)), side="right")
            # the per-source CE (MinCE / AvgCE) is over the positions predicting content tokens only
            content = [j for j in range(len(src_ids) - 1) if any(a <= j + 1 < b for a, b in src_spans)]
            assert row["seq_ce"][n] == pytest.approx(np.mean(content))  # the fake CE of position j is j
            assert row["byte_ce"][n] == pytest.approx(np.sum(content) / corpus.row(p)["n_bytes"])
            for t in np.flatnonzero(scored):
                total += 1
                j = int(logits[t, n, 0])
                if name == "self":  # the target's own rendering: every position is its own partner
                    assert j == t and row["token_ce"][t, n] == t
                if t + 1 in tgt_end:  # the end of turn: the source's own, if spelled alike, else the target's
                    m = tgt_end[t + 1]
                    if logits[t, n, 1] == -1:
                        ends_copied += 1
                        assert j + 1 == src_spans[m, 1] and vocab.texts[src_ids[j + 1]] == \
                            aligner.target.texts[tgt_ids[t + 1]]
                    else:
                        assert ids[t, n, 0] == tgt_ids[t + 1] and logits[t, n, 0] == 1
                elif logits[t, n, 1] == -1:  # copied from the source position its first logit names
                    copied += 1
                    assert src_spans[src_owner[j + 1], 0] <= j + 1 < src_spans[src_owner[j + 1], 1]
                    assert src_owner[j + 1] == tgt_owner[t + 1]
                    assert vocab.texts[src_ids[j + 1]].strip() == aligner.target.texts[tgt_ids[t + 1]].strip() or \
                        aligner.target.tok.decode(tgt_ids[t + 1]).strip() in vocab.tok.decode(src_ids[j + 1])
                    assert row["token_ce"][t, n] == j  # the CE of the partner's position
    assert copied > 0.1 * total  # exact spellings only (no vocab map), across very different tokenizers
    assert ends_copied >= 4  # at least the target's own ends of turn ("self")


def test_assistant_only_loss_mask(chat_run, tmp_path):
    cfg, corpus = chat_run
    align.run(cfg)
    data = AlignedBatches(f"{cfg.run.output_dir}/aligned", seq_len=256)
    rows = data.rows(np.arange(data.num_rows))
    tokens = TokenBatches(f"{cfg.run.output_dir}/corpus", cfg.target.tokenizer_path, seq_len=256,
                          chat_template=cfg.target.chat_template)
    plain = tokens.rows(np.arange(tokens.num_rows))
    assert np.array_equal(rows["input_ids"], plain["input_ids"])
    assert np.array_equal(rows["loss_mask"], plain["loss_mask"])
    assert 0 < rows["loss_mask"].sum() < rows["attention_mask"].sum()
    tok = chat.chat_tokenizer(cfg.target.tokenizer_path, cfg.target.chat_template, "t")
    for b in range(len(rows["input_ids"])):
        text = tok.decode(rows["labels"][b][rows["loss_mask"][b] == 1])
        assert "<|im_start|>" not in text and "User:" not in text and "<|start_header_id|>" not in text
    # training and evaluation score the content tokens and each end of turn, found from the rendered text
    for b, p in enumerate(tokens.positions):
        messages = chat.block_messages(tokens.store.row(int(p))["text"])
        text = tok.apply_chat_template(messages, tokenize=False)
        owner, ends = overlaps_content(tok, text, messages, int(plain["attention_mask"][b].sum()))
        assert sorted(np.flatnonzero(plain["loss_mask"][b])) == sorted([*(np.flatnonzero(owner >= 0) - 1),
                                                                        *(i - 1 for i in ends.values())])


GOOD = conversation("if")
BAD_CASES = {
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}, *GOOD["messages"][2:3]]}, None,
                     ["line 2", "messages[0].role", "unknown role 'robot'"]),
    "unknown sharegpt role": ({"conversations": [{"from": "bot", "value": "hi"}]}, None,
                              ["line 2", "conversations[0].from", "'bot'"]),
    "no assistant": ({"messages": GOOD["messages"][:2]}, None, ["line 2", "no assistant message"]),
    "empty assistant": ({"messages": [*GOOD["messages"][:2], {"role": "assistant", "content": " \n"}]}, None,
                        ["line 2", "messages[2].content", "empty assistant message"]),
    "not a message": ({"messages": [{"role": "user", "content": 3}]}, None, ["line 2", "messages[0]", "'content'"]),
    "template drops content": (GOOD, DROPS, ["line 1", "drops or rewrites the content of message 0"]),
    "no template": (GOOD, "", ["target", "has no chat_template", "chat_template"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_conversations_are_one_line_and_write_nothing(toks, tmp_path, capsys, case):
    from fusejax import cli

    record, template, fragments = BAD_CASES[case]
    folder, own = toks["meta"]
    if template is not None:  # a template file of its own, or none at all (a tokenizer without one)
        own = None if template == "" else tmp_path / "t.jinja"
        if own:
            own.write_text(template)
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD, record] if record is not GOOD else [record])
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"run": {"output_dir": str(tmp_path / "out")},
                                  "corpus": {"inputs": [str(data)], "format": "chat", "block_size": 400},
                                  "target": {"tokenizer": folder, "chat_template": own and str(own)}}))
    assert cli.main(["prepare", str(config)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("fusejax: error: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if "template" not in case:
        assert str(data) in line
    corpus = tmp_path / "out" / "corpus"
    assert not corpus.exists() or len(open_store(corpus)) == 0  # the good first conversation was not written


def test_saved_dataset_gives_the_same_blocks_as_jsonl(toks, tmp_path):
    """A save_to_disk folder (state.json + an Arrow stream of list<struct> messages, as datasets writes it)."""
    import pyarrow as pa

    records = [conversation(k) for k in KEYS[:3]]
    saved = tmp_path / "saved"
    saved.mkdir()
    table = pa.Table.from_pylist(records)
    with pa.ipc.new_stream(saved / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    blocks = []
    for name, data in (("jsonl", write_jsonl(tmp_path / "chat.jsonl", records)), ("saved", saved)):
        prepare_corpus(data, toks["meta"][0], tmp_path / name, block_size=200, fmt="chat",
                       chat_template=toks["meta"][1])
        store = open_store(tmp_path / name)
        blocks.append([(bytes(r["text"]), tuple(r["span"]), int(r["n_tokens"]))
                       for r in map(store.row, range(len(store)))])
    assert blocks[0] == blocks[1] and len(blocks[0]) >= 3


def test_turns_longer_than_the_block_are_cut_or_dropped(toks, tmp_path, caplog):
    """A long answer is cut to the longest prefix with which its turn fits (the template's end kept); a turn
    whose prompt alone does not fit is dropped; both counted in the summary and one warning line."""
    folder, template = toks["meta"]
    tok = chat.chat_tokenizer(folder, template, "target")
    long_answer, long_question = topics["while"][:1500], "Why? " * 300
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is while?"},
                      {"role": "assistant", "content": long_answer}, {"role": "user", "content": "Thanks."},
                      {"role": "assistant", "content": "You are welcome."}]},
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Because."},
                      {"role": "user", "content": "And for?"}, {"role": "assistant", "content": "It loops."}]},
    ]
    block_size = 120

    def n_tokens(messages):  # the target's rendering, tokenized independently of fusejax.chat
        return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])

    with caplog.at_level("WARNING", logger="fusejax.corpus"):
        summary = prepare_corpus(write_jsonl(tmp_path / "chat.jsonl", records), folder, tmp_path / "corpus",
                                 block_size=block_size, fmt="chat", chat_template=template)
    assert summary["cut_turns"] == 1 and summary["dropped_turns"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1 turn(s) too long" in warnings[0] and "1 turn(s) whose prompt" in warnings[0]
    store = open_store(tmp_path / "corpus")
    blocks = {(r["doc_id"].split(":")[-1], tuple(r["span"])): r for r in map(store.row, range(len(store)))}
    assert sorted(blocks) == [("0", (1, 3)), ("0", (3, 5)), ("1", (2, 4))]  # the turn of the long question dropped
    cut = chat.block_messages(blocks["0", (1, 3)]["text"])
    answer = cut[-1]["content"]
    assert cut[:-1] == records[0]["messages"][:2] and long_answer.startswith(answer) and answer.strip()
    longer = cut[:-1] + [{"role": "assistant", "content": long_answer[:len(answer) + 1]}]
    assert n_tokens(cut) <= block_size < n_tokens(longer)  # the longest prefix that fits
    assert tok.apply_chat_template(cut, tokenize=False).endswith(answer + "<|im_end|>\n")  # the end of turn kept
    assert blocks["0", (1, 3)]["n_bytes"] == len(answer.encode()) and blocks["0", (1, 3)]["n_tokens"] == n_tokens(cut)
    for key in (("0", (3, 5)), ("1", (2, 4))):  # the other turns as they were
        assert n_tokens(chat.block_messages(blocks[key]["text"])) <= block_size
