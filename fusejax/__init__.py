"""fusejax: FuseLLM knowledge fusion in JAX/Flax NNX.

Where things live (read top-down):
  config.py           typed, frozen run configuration; YAML with `base:` inheritance; dotted overrides
  cli.py              the `fusejax` console command, one subcommand per stage
  sharding.py         logical axis names -> mesh axes (`data`, `fsdp`, `tensor`): the one rules table
  tokenizer.py        load_tokenizer (ids equal to each model's own tokenizer), tokenizer fingerprints
  models/             Flax NNX decoder models (Llama family, GPT-NeoX, MPT, GPT-2) and HF checkpoint I/O
  align.py            host-side vocab maps (MinED/exact) and token alignment (DTW), numpy only
  represent.py        stage: top-k logits and cross-entropy of each source model on the corpus
  fusion.py           the sparse fusion loss (MinCE / AvgCE) inside jax.jit
  train.py            fused continual training: jitted sharded step, deterministic data, Orbax checkpoints

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
