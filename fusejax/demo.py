"""The main job of ``make demo``: a small real run on text every Python installation carries.

Trains a byte-level BPE tokenizer on Python's documentation topics (``pydoc_data``), writes a tiny random
Llama-style model as a Hugging Face folder, loads it back onto a mesh of all local devices, scores held-out
topics (cross-entropy per token and bits per byte, via :func:`fusejax.extract_topk`) and writes
``results.json``. Works offline in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def _texts() -> tuple[list[str], list[str]]:
    import pydoc_data.topics

    texts = [t for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 200]
    return texts[::5][1:] + [t for i, t in enumerate(texts) if i % 5], texts[::5][:1] + texts[::5][1:4]


def main(output_dir: str | Path = "runs/demo") -> int:
    """Run the demo into ``output_dir``; prints a summary and returns 0."""
    import jax
    import transformers
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fusejax.models import ModelConfig, Transformer, load_pretrained, save_pretrained
    from fusejax.represent import extract_topk
    from fusejax.sharding import make_mesh
    from fusejax.tokenizer import load_tokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, heldout = _texts()

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")

    config = ModelConfig(arch="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id)
    save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), out / "model")
    model = load_pretrained(out / "model", mesh=make_mesh(data=1, fsdp=-1, tensor=1))

    nats, tokens, n_bytes = 0.0, 0, 0
    for text in heldout:
        ids = tok.encode(text, add_special_tokens=False)[:512]
        _, _, token_ce, _ = extract_topk(model, np.asarray([ids], np.int32), None, k=1)
        nats += float(np.sum(token_ce))
        tokens += len(ids) - 1
        n_bytes += len(tok.decode(ids[1:]).encode("utf-8"))
    results = {
        "model": str(out / "model"), "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model)))),
        "heldout_tokens": tokens, "ce_per_token": nats / tokens, "bits_per_byte": nats / math.log(2) / n_bytes,
        "uniform_ce_per_token": math.log(len(tok)), "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"tokenizer: {out / 'tokenizer'} ({len(tok)} tokens)")
    print(f"model:     {out / 'model'} ({results['parameters']:,} parameters, random weights)")
    print(f"held-out:  {tokens} tokens, CE {results['ce_per_token']:.3f} nats/token "
          f"(uniform: {results['uniform_ce_per_token']:.3f}), {results['bits_per_byte']:.3f} bits/byte")
    print(f"results:   {out / 'results.json'}")
    return 0
