"""Every stage through the `fusejax` command on tiny models: prepare -> represent -> vocab-map -> align ->
train -> export, with three sources of different architectures and tokenizers (the target is one of them)."""

import json

import numpy as np
import pydoc_data.topics
import pytest
import torch
import transformers
import yaml

from fusejax.cli import main
from fusejax.models import load_pretrained
from fusejax.schema import unpack_tables
from fusejax.store import open_store
from tiny import bpe_tokenizer, read_events, save_tiny_model

TEXTS = [t for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 600][:5]


@pytest.mark.slow
def test_all_stages_through_the_cli(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(text)
    sources = []
    for seed, (name, arch, kind, vocab) in enumerate([("target", "llama", "metaspace", 320),
                                                      ("neox", "gpt_neox", "bytelevel", 400),
                                                      ("mpt", "mpt", "bytelevel", 300)]):
        folder = tmp_path / name
        tok = bpe_tokenizer(kind, vocab, TEXTS)
        save_tiny_model(folder, arch, len(tok), seed, eos_token_id=tok.eos_token_id,
                        intermediate_size=64 if arch == "llama" else 128)
        tok.save_pretrained(folder)
        sources.append({"name": name, "path": str(folder)})
    out = tmp_path / "run"
    config = {
        "run": {"output_dir": str(out)},
        "mesh": {"data": 2, "fsdp": -1},
        "corpus": {"inputs": [str(tmp_path / "docs")], "block_size": 48, "holdout_fraction": 0.4},
        "target": {"path": sources[0]["path"]},
        "sources": sources,
        "represent": {"k": 4, "batch_size": 4, "shard_size": 8},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 64, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2,
                  "eval_every": 3},
        "eval": {"batch_size": 3, "max_batches": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    for stage in ("prepare", "represent", "vocab-map", "align", "train", "eval", "export"):
        assert main([stage, str(tmp_path / "run.yaml")]) == 0, f"stage {stage} failed"

    aligned = open_store(out / "aligned")
    corpus = open_store(out / "corpus")
    assert len(aligned) == len(corpus) > 0 and aligned.meta["sources"] == ["target", "neox", "mpt"]
    row = aligned.row(0)
    assert unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], 4)[0].shape == (
        len(row["input_ids"]), 3, 4)
    # the target's own row (source 0, same tokenizer) aligns 1-to-1 with itself everywhere
    summary = json.loads((out / "aligned_summary.json").read_text())
    assert summary["sources"]["target"]["one_to_one_rate"] == 1.0
    assert 0 < summary["sources"]["neox"]["one_to_one_rate"] < 1

    train = json.loads((out / "train" / "summary.json").read_text())
    assert train["steps"] == 3 and np.isfinite(train["final"]["loss"]) and train["final"]["fusion_loss"] > 0
    # evaluation during training scores what the eval stage scores: the same held-out blocks, eval.batch_size
    # rows per batch, at most eval.max_batches batches
    results = json.loads((out / "eval" / "results.json").read_text())
    heldout = sum(int(np.count_nonzero(shard.column("split") == 1)) for shard in corpus.shards)
    assert results["trained"]["blocks"] == 3 * 2 < heldout
    events = read_events(out / "train" / "tb")
    assert [s for s, _ in events["eval/loss"]] == [3]
    np.testing.assert_allclose(events["eval/loss"][0][1], results["trained"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(events["eval/bits_per_byte"][0][1], results["trained"]["bits_per_byte"], rtol=1e-5)

    tok = transformers.AutoTokenizer.from_pretrained(out / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    ours = load_pretrained(out / "export")
    ids = np.asarray([tok.encode(TEXTS[0][:80])], np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids))[..., : ref.shape[-1]], ref, atol=1e-4)
