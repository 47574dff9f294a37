"""fusejax: FuseLLM knowledge fusion in JAX/Flax NNX.

Where things live (read top-down):
  config.py           typed, frozen run configuration; YAML with `base:` inheritance; dotted overrides
  cli.py, errors.py   the `fusejax` console command (one subcommand per stage); which errors are the user's
  distributed.py      multi-host start-up (jax.distributed) and per-process slices of the blocks
  sharding.py         logical axis names -> mesh axes (`data`, `fsdp`, `tensor`): the one rules table
  tokenizer.py        load_tokenizer (ids equal to each model's own tokenizer), tokenizer fingerprints
  models/             Flax NNX decoder models (Llama family, GPT-NeoX, MPT, GPT-2) and HF checkpoint I/O
  store.py            the resumable, checksummed shard store every stage writes
  corpus.py           stage prepare: documents -> blocks of target tokens
  represent.py        stage represent: top-k logits and cross-entropy of each source model on the corpus
  align.py            stages vocab-map, align: MinED/exact vocab maps and token alignment (DTW), numpy only
  data.py             training rows (fixed-shape padded numpy) from the aligned or corpus store
  fusion.py           the sparse fusion loss (MinCE / AvgCE) inside jax.jit
  train.py            stage train: jitted sharded donated step, deterministic data, Orbax checkpoints
  evaluate.py         stage eval: held-out loss and bits per byte, per domain
  export.py           stage export: a checkpoint as a Hugging Face folder
  pipeline.py         `fusejax run`: every stage in order, fingerprinted, resumable, validated up front
  plan.py             `fusejax plan`: per-device memory of the train step without allocating the model
  embedded.py         the embedded default (`make demo`); study.py: the miniature reproduction study

Public names are imported lazily so that host-only modules (tokenizer, alignment) never pull in JAX.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_pretrained": "fusejax.models.hf_io",
    "save_pretrained": "fusejax.models.hf_io",
    "load_tokenizer": "fusejax.tokenizer",
    "make_mesh": "fusejax.sharding",
    "prepare_corpus": "fusejax.corpus",
    "open_store": "fusejax.store",
    "evaluate": "fusejax.evaluate",
    "load_config": "fusejax.config",
    "fusion_loss": "fusejax.fusion",
    "lm_weight_schedule": "fusejax.fusion",
    "extract_topk": "fusejax.represent",
    "vocab_map": "fusejax.align",
    "vocab_map_summary": "fusejax.align",
    "align_tokens": "fusejax.align",
    "align_topk": "fusejax.align",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusejax' has no attribute {name!r}")
