"""Held-out evaluation: loss and bits per byte against a direct numpy computation from the model's logits."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pydoc_data.topics
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusejax.corpus import prepare_corpus
from fusejax.data import TokenBatches
from fusejax.evaluation import _row_sums, block_domains, domain_of, evaluate
from fusejax.models import ModelConfig, Transformer

SEQ = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prose = [t[:500] for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 500][:4]
    code = [p.read_text()[:500] for p in sorted(Path(json.__file__).parent.glob("*.py"))[:3]]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(prose + code, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    for name, docs in (("prose", prose), ("code", code)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare_corpus([root / "prose.jsonl", root / "code.jsonl"], tok, root / "corpus", block_size=SEQ - 1)
    config = ModelConfig(arch="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, max_position_embeddings=SEQ)
    return TokenBatches(root / "corpus", tok, seq_len=SEQ), tok, Transformer(config, rngs=nnx.Rngs(0))


def _naive(model, tok, data, n):
    """CE sum, scored-token count, bytes and domain of each of the first ``n`` blocks, from one forward pass
    over all of them (tokenized here) and a float64 numpy log-softmax."""
    blocks = [data.store.row(int(data.positions[i])) for i in range(n)]
    seqs = [tok.encode(b["text"].decode(), add_special_tokens=False) + [tok.eos_token_id] for b in blocks]
    ids, mask = np.zeros((n, SEQ), np.int32), np.zeros((n, SEQ), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    logits = np.asarray(model(ids, mask), np.float64)[..., : len(tok)]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    out = []
    for i, (b, s) in enumerate(zip(blocks, seqs)):
        ce = -sum(logp[i, t, s[t + 1]] for t in range(len(s) - 1))
        out.append((ce, len(s) - 1, len(b["text"]), b["doc_id"].split(".jsonl")[0]))
    return out


@pytest.mark.parametrize("chunk", [256, 10])  # one chunk of all 48 positions; chunks of 10 with padding
def test_loss_and_bits_per_byte_match_numpy(setup, chunk):
    data, tok, model = setup
    n = data.num_rows
    assert n % 4, "the test needs a padded last batch"
    got = evaluate(model, data, batch_size=4, chunk=chunk)
    naive = _naive(model, tok, data, n)
    ce, tokens, n_bytes = (sum(r[j] for r in naive) for j in range(3))
    assert got["tokens"] == tokens and got["bytes"] == n_bytes and got["blocks"] == n
    assert got["loss"] == pytest.approx(ce / tokens, rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(ce / math.log(2) / n_bytes, rel=1e-4)
    assert set(got["domains"]) == {"prose", "code"}
    for domain, res in got["domains"].items():
        rows = [r for r in naive if r[3] == domain]
        assert res["blocks"] == len(rows)
        assert res["bits_per_byte"] == pytest.approx(
            sum(r[0] for r in rows) / math.log(2) / sum(r[2] for r in rows), rel=1e-4)


def test_no_whole_logits_in_the_compiled_evaluation(setup):
    """The lowered evaluation of a batch holds float32 logits of 16 positions per row, never of all 48."""
    data, _, model = setup
    rows = data.rows(np.arange(4))
    graphdef, state = nnx.split(model)

    def row_sums(state, *args):
        return _row_sums(nnx.merge(graphdef, state), *args, chunk=16)

    args = [np.asarray(rows[k], np.int32) for k in ("input_ids", "attention_mask", "labels", "loss_mask")]
    text = jax.jit(row_sums).lower(state, *args).as_text()
    vp = model.config.padded_vocab_size
    assert f"4x16x{vp}xf32" in text and f"4x{SEQ}x{vp}xf32" not in text


def test_max_batches_and_explicit_domains(setup):
    data, tok, model = setup
    got = evaluate(model, data, batch_size=3, max_batches=2, domains=[])
    naive = _naive(model, tok, data, 6)
    assert got["blocks"] == 6 and got["domains"] == {}
    assert got["loss"] == pytest.approx(sum(r[0] for r in naive) / sum(r[1] for r in naive), rel=1e-4)
    with pytest.raises(ValueError, match="2 domain labels for 6 rows"):
        evaluate(model, data, batch_size=3, max_batches=2, domains=["a", "b"])


def test_domains():
    assert domain_of("prose.jsonl:17") == "prose"
    assert domain_of("corpus/stdlib/code.txt:0") == "code"
    assert domain_of("minipile/train:5") == "train"


def test_block_domains_need_a_corpus_store():
    with pytest.raises(TypeError, match="pass domains= explicitly"):
        block_domains(object())
