"""Training rows: next-token labels and masks, CLM rows from a corpus store, fusion rows from an aligned store."""

import ml_dtypes
import numpy as np
import pydoc_data.topics
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusejax.corpus import prepare_corpus
from fusejax.data import AlignedBatches, TokenBatches, next_token_targets
from fusejax.fusion import fusion_loss
from fusejax.schema import (ALIGNED_KIND, TOPK_KIND, StoreFormatError, aligned_fields, check_existing, format_meta,
                            pack_tables, topk_fields,
                            unpack_tables)
from fusejax.store import StoreError, StoreWriter
from fusejax.testing import SyntheticTables


def test_next_token_targets_shift_and_mask():
    ids = np.array([[5, 6, 7, 0], [8, 0, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
    out = next_token_targets(ids, mask)
    np.testing.assert_array_equal(out["labels"], [[6, 7, -100, -100], [-100, -100, -100, -100]])
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 300][:20]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    (root / "docs").mkdir()
    for i, t in enumerate(texts):
        (root / "docs" / f"{i}.txt").write_text(t)
    prepare_corpus(root / "docs", tok, root / "corpus", block_size=40, holdout_fraction=0.5)
    return root / "corpus", tok


def test_token_batches_rows(corpus):
    path, tok = corpus
    data = TokenBatches(path, tok, seq_len=48)
    rows = data.rows(np.array([0, data.num_rows - 1]))
    for b, i in enumerate([0, data.num_rows - 1]):
        block = data.store.row(int(data.positions[i]))
        expected = tok.encode(block["text"].decode(), add_special_tokens=False) + [tok.eos_token_id]
        n = len(expected)
        np.testing.assert_array_equal(rows["input_ids"][b, :n], expected)
        assert rows["attention_mask"][b].sum() == n and rows["loss_mask"][b].sum() == n - 1
        np.testing.assert_array_equal(rows["labels"][b, : n - 1], expected[1:])
        assert rows["n_bytes"][b] == len(block["text"])
    # plain causal-LM rows: no fusion tables (the train step treats missing tables as empty ones)
    assert set(rows) == {"input_ids", "attention_mask", "labels", "loss_mask", "n_bytes"}
    heldout = TokenBatches(path, tok, seq_len=48, split="heldout")
    assert heldout.num_rows > 0 and heldout.num_rows + data.num_rows == len(data.store)


def test_token_batches_refuse_truncation(corpus):
    path, tok = corpus
    with pytest.raises(ValueError, match="more than seq_len=8"):
        TokenBatches(path, tok, seq_len=8).rows(np.array([0]))


def test_pack_tables_round_trip_and_refuse_gaps():
    rng = np.random.default_rng(0)
    T, S, k = 7, 3, 5
    counts = rng.integers(0, k + 1, (T, S))
    ids = np.where(np.arange(k) < counts[..., None], rng.integers(0, 1000, (T, S, k)), -1).astype(np.int32)
    logits = np.where(ids >= 0, rng.normal(size=(T, S, k)), 0).astype(np.float32)
    packed = pack_tables(ids, logits)
    assert packed["table_ids"].shape == (counts.sum(),)  # no entry stored for an empty slot
    np.testing.assert_array_equal(packed["table_counts"], counts)
    back_ids, back_logits = unpack_tables(packed["table_counts"], packed["table_ids"], packed["table_logits"], k)
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_logits, logits)
    ids[0, 0, :2] = [-1, 5]
    with pytest.raises(ValueError, match="filled entries first"):
        pack_tables(ids, logits)


@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce"])
def test_fused_loss_from_the_compact_store_within_bfloat16_rounding(tmp_path, fusion):
    """Rows written to an aligned store (uint16 ids, bfloat16 logits, no empty entries) and read back by
    AlignedBatches give the float32 tables' ids exactly, their logits rounded to bfloat16, and a fused loss
    within the bound that rounding allows: logits x_i moved by at most eps = max|x| * 2**-8 (bfloat16's unit
    roundoff) change each teacher probability by a factor within exp(+-2 eps); the fusion term
    sum_v P(v) (-log q(v)) then moves by at most expm1(2 eps) times itself, the loss by (1 - lambda) times that."""
    T, S, k, V, lam = 24, 3, 10, 1000, 0.25
    rows = SyntheticTables(6, T, V, num_sources=S, k=k, token_level_ce=True).rows(np.arange(6))
    rows.update(next_token_targets(rows["input_ids"], rows["attention_mask"]))  # a block's last token: no label
    rows["source_ce_token"] *= rows["attention_mask"][..., None]  # padding: CE 0, as the reader gives it
    rng = np.random.default_rng(1)
    fill = np.arange(k) < rng.integers(0, k + 1, (6, T, S))[..., None]  # partly filled rows
    rows["table_ids"] = np.where(fill, rows["table_ids"], -1)
    meta = format_meta(ALIGNED_KIND, sources=["a", "b", "c"], k=k)
    with StoreWriter(tmp_path / "aligned", kind=ALIGNED_KIND, meta=meta, fields=aligned_fields(S, k, V, "bfloat16"),
                     rows_per_shard=4) as w:
        for i in range(6):
            m = int(rows["attention_mask"][i].sum())
            w.add(i, input_ids=rows["input_ids"][i, :m],
                  **pack_tables(rows["table_ids"][i, :m], rows["table_logits"][i, :m]),
                  seq_ce=np.ones(S), token_ce=rows["source_ce_token"][i, :m], byte_ce=np.ones(S), n_bytes=1,
                  split=0, skip=False, align_counts=np.zeros((S, 5), np.int32))
    data = AlignedBatches(tmp_path / "aligned", seq_len=T, ce_level="token")
    back = data.rows(np.arange(6))
    assert data.store.fields[2].np_dtype == np.uint16 and data.store.fields[3].dtype == "bfloat16"
    for name in ("input_ids", "attention_mask", "labels", "loss_mask", "table_ids", "source_ce_token"):
        np.testing.assert_array_equal(back[name], rows[name], err_msg=name)
    valid = rows["table_ids"] >= 0
    rounded = np.where(valid, rows["table_logits"].astype(ml_dtypes.bfloat16).astype(np.float32), 0)
    np.testing.assert_array_equal(back["table_logits"], rounded)

    student = 3 * rng.normal(size=(6, T, V)).astype(np.float32)
    kw = dict(fusion=fusion, lm_weight=lam)
    ref, metrics = fusion_loss(student, rows["labels"], rows["loss_mask"], rows["table_ids"], rows["table_logits"],
                               rows["source_ce_token"], **kw)
    got, _ = fusion_loss(student, back["labels"], back["loss_mask"], back["table_ids"], back["table_logits"],
                         back["source_ce_token"], **kw)
    eps = np.abs(rows["table_logits"][valid]).max() * 2.0**-8
    bound = (1 - lam) * np.expm1(2 * eps) * float(metrics["fusion_loss"]) + 1e-5  # + float32 summation noise
    assert 0 < abs(float(got) - float(ref)) <= bound, (float(got), float(ref), bound)


@pytest.mark.parametrize("version", [None, 2])
def test_aligned_store_of_an_older_format_is_refused(tmp_path, version):
    """A store without ``format_version`` (version 1) or of version 2 (with the copy of the target's own top-k):
    refused by the train reader and before align writes."""
    meta = {"sources": ["a"], "k": 2} | ({"format_version": version} if version else {})
    with StoreWriter(tmp_path / "old", kind=ALIGNED_KIND, meta=meta,
                     fields=aligned_fields(1, 2, 10, "bfloat16"), rows_per_shard=1) as w:
        w.add(0, input_ids=[1, 2], table_counts=[[1], [0]], table_ids=[3], table_logits=[0.5], seq_ce=[1.0],
              token_ce=[[1.0], [1.0]], byte_ce=[1.0], n_bytes=2, split=0, skip=False,
              align_counts=np.zeros((1, 5), np.int32))
    old = tmp_path / "old"
    match = rf"old has format version {version or 1} of 'aligned' stores.*version 3"
    for call in (lambda: AlignedBatches(old, seq_len=4), lambda: check_existing(old, ALIGNED_KIND)):
        with pytest.raises(StoreFormatError, match=match):
            call()


def test_aligned_store_whose_sources_all_have_the_target_tokenizer(tmp_path):
    """Every source copied (meta ``copied``): the aligned store holds no table entry at all, and the rows' tables
    and token CE are the top-k stores' rows as they are, also through a link to the store; a top-k row of another
    length is refused naming it."""
    k, V, lengths = 3, 50, [5, 7]
    rng = np.random.default_rng(0)
    tops = {}
    for name in ("a", "b"):
        with StoreWriter(tmp_path / "represent" / name, kind=TOPK_KIND, meta=format_meta(TOPK_KIND, k=k),
                         fields=topk_fields(k, "bfloat16", V), rows_per_shard=1) as w:
            for i, T in enumerate(lengths + [4 if name == "b" else 5]):
                row = dict(input_ids=rng.integers(0, V, T), topk_ids=rng.integers(0, V, (T, k)),
                           topk_logits=rng.normal(size=(T, k)).astype(ml_dtypes.bfloat16),
                           token_ce=rng.uniform(1, 3, T).astype(np.float32))
                w.add(i, **row, seq_ce=1.0, nonfinite=0)
                tops[name, i] = row
    meta = format_meta(ALIGNED_KIND, sources=["a", "b"], copied=["a", "b"], k=k)
    with StoreWriter(tmp_path / "aligned", kind=ALIGNED_KIND, meta=meta, rows_per_shard=2,
                     fields=aligned_fields(2, k, V, "bfloat16", copied=2)) as w:
        for i, T in enumerate(lengths + [5]):
            w.add(i, input_ids=tops["a", i]["input_ids"],
                  **pack_tables(np.full((T, 0, k), -1, np.int32), np.zeros((T, 0, k), np.float32)),
                  seq_ce=np.ones(2), token_ce=np.zeros((T, 0), np.float32), byte_ce=np.ones(2), n_bytes=1, split=0,
                  skip=False, align_counts=np.zeros((2, 5), np.int32))
    data = AlignedBatches(tmp_path / "aligned", seq_len=8, ce_level="token")
    rows = data.rows(np.arange(2))
    for i, T in enumerate(lengths):
        for n, name in enumerate(("a", "b")):
            np.testing.assert_array_equal(rows["table_ids"][i, :T, n], tops[name, i]["topk_ids"])
            logits = tops[name, i]["topk_logits"].astype(np.float32)
            np.testing.assert_array_equal(rows["table_logits"][i, :T, n], logits)
            np.testing.assert_array_equal(rows["source_ce_token"][i, :T, n], tops[name, i]["token_ce"])
        assert np.all(rows["table_ids"][i, T:] == -1)
    with pytest.raises(StoreError, match=r"represent/b: block 2 has 4 input_ids; the aligned store has 5"):
        data.rows(np.array([2]))
    (tmp_path / "variant").mkdir()  # a link to the store (a study variant): the top-k stores of its real run
    (tmp_path / "variant" / "aligned").symlink_to(tmp_path / "aligned", target_is_directory=True)
    linked = AlignedBatches(tmp_path / "variant" / "aligned", seq_len=8, ce_level="token").rows(np.arange(2))
    for name, value in rows.items():
        np.testing.assert_array_equal(linked[name], value, err_msg=name)
