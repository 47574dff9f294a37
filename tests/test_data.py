"""Training rows: next-token labels and masks, and CLM rows from a corpus store."""

import numpy as np
import pydoc_data.topics
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusejax.corpus import prepare_corpus
from fusejax.data import TokenBatches, next_token_targets


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
