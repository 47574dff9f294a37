"""Every stage through the `fusejax` command on tiny models: prepare -> represent -> vocab-map -> align ->
train -> export, with three sources of different families and tokenizers (the target is one of them), saved by
transformers; the export loads in transformers with our logits. The tokenizers are tiny ones trained on the
corpus, or the real ones of ../shared/data where it is present (Llama 3's 128k vocabulary for the target,
Llama 2's and GPT-NeoX-20B's for the sources; the 128k x 128k maps are tests/test_align_real.py's)."""

import json
import shutil

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
from tiny import bpe_tokenizer, read_events

# five documents of 779-1000 characters (about 200 tokens each with the real tokenizers, whose 128k-row heads make
# every token cost: the represent stage scores each block with every source)
TEXTS = [t[:1000] for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 600][:5]


# tiny random models of three of today's families, as transformers builds and saves them: a Llama-3.x-style
# target (llama3 RoPE scaling, tied embeddings) that is also a source, a Gemma-2 source (soft-capping, sliding
# and global layers, (1 + w) norms) and a Phi-3 source (fused qkv / gate_up tensors, partial rotary, LongRoPE)
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
FAMILIES = [
    ("target", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64})),
    ("gemma2", transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=8, query_pre_attn_scalar=8, sliding_window=16, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    ("phi3", transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]})),
]
# per family: a BPE trained on TEXTS (kind, vocabulary size), or a folder of ../shared/data/tokenizers (Llama 3's
# with its chat template; Gemma 2 soft-caps its logits, so it gets the smaller vocabulary)
TOKENIZERS = {
    "trained": [("metaspace", 320), ("bytelevel", 400), ("metaspace", 300)],
    "real": ["llama3", "llama2", "gpt-neox-20b"],
}


def _save_tokenizer(folder, spec, request):
    """The tokenizer ``spec`` of :data:`TOKENIZERS` saved into ``folder``: trained here, or the shared folder's
    files copied as they are (skips when ../shared/data is absent); returned as transformers loads it."""
    if isinstance(spec, tuple):
        bpe_tokenizer(*spec, TEXTS).save_pretrained(folder)
    else:
        shutil.copytree(request.getfixturevalue("shared_data") / "tokenizers" / spec, folder, dirs_exist_ok=True)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("tokenizers", list(TOKENIZERS))
def test_all_stages_through_the_cli(tmp_path, capsys, request, tokenizers):
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(text)
    sources = []
    for seed, ((name, config_class, model_class, options), spec) in enumerate(zip(FAMILIES, TOKENIZERS[tokenizers])):
        folder = tmp_path / name
        tok = _save_tokenizer(folder, spec, request)
        torch.manual_seed(seed)
        config = config_class(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=None, **SIZE, **options)
        model_class(config).save_pretrained(folder)
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
    assert len(aligned) == len(corpus) > 0 and aligned.meta["sources"] == ["target", "gemma2", "phi3"]
    row = aligned.row(0)
    # the target's own row (source 0, same tokenizer) is its top-k store's, not stored here
    assert aligned.meta["copied"] == ["target"]
    assert unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], 4)[0].shape == (
        len(row["input_ids"]), 2, 4)
    summary = json.loads((out / "aligned_summary.json").read_text())
    assert summary["sources"]["target"]["one_to_one_rate"] == 1.0
    assert 0 < summary["sources"]["gemma2"]["one_to_one_rate"] < 1

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
