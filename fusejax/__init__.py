"""fusejax: FuseLLM knowledge fusion in JAX/Flax NNX.

Where things live, one home each, in import order (a module imports only from the groups above it):

  files.py            atomic file writes (every summary, manifest, config copy and model file)
  config.py           typed, frozen run configuration; YAML with `base:` inheritance; dotted overrides; the
                      sharding rules table (DEFAULT_RULES)
  store.py            the resumable, checksummed shard store every stage writes
  schema.py           declared once: each store's fields, the training batch layout, a run's folder layout
  distributed.py      multi-host start-up (jax.distributed), process slices; errors.py: which errors are the user's

  sharding.py         logical axis names -> mesh axes (`data`, `fsdp`, `tensor`), mesh construction
  tokenizer.py        load_tokenizer (ids equal to each model's own tokenizer), tokenizer fingerprints
  models/             Flax NNX decoder models (Llama family, GPT-NeoX, MPT, GPT-2) and HF checkpoint I/O

  corpus.py           stage prepare: documents -> blocks of target tokens
  represent.py        stage represent: top-k logits and cross-entropy of each source model on the corpus
  vocab.py            token spellings of one tokenizer (strings, word-start marker, spelled bytes)
  dtw.py              DTW token alignment of two sequences (align_kernels.py: its numba kernels)
  vocab_maps.py       stage vocab-map: MinED/exact maps of each source vocabulary onto the target's
  align.py            stage align: every source's top-k projected onto the target's tokens and vocabulary
  data.py             training rows (fixed-shape padded numpy) and their deterministic order
  fusion.py           the sparse fusion loss (MinCE / AvgCE) inside jax.jit

  step.py             the train step: options, optimizer, loss, jitted step and its shardings, FLOPs
  checkpoint.py       Orbax checkpoints: save, restore, load a trained model

  train.py            stage train: the Trainer (state, data stream, checkpoints, logging)
  evaluation.py       stage eval: held-out loss and bits per byte, per domain
  export.py           stage export: a checkpoint as a Hugging Face folder
  plan.py             `fusejax plan`: per-device memory of the train step without allocating the model
  merging.py          `fusejax merge`: models of one architecture merged in parameter space, tensor by tensor
  generation.py       `fusejax generate`, generate / generate_ids: batched decoding with a KV cache
  harness.py          the lm-evaluation-harness backend on generation.py (`python -m fusejax.harness`; eval.tasks,
                      imported by the eval stage only then)

  stages.py           the one registry of stages and commands, read by the pipeline and the CLI
  pipeline.py         `fusejax run`: every stage in order, fingerprinted, resumable, validated up front
  cli.py              the `fusejax` console command (one subcommand per stage)
  embedded.py         the embedded default (`make demo`); study.py: the miniature reproduction study
  testing.py          synthetic training rows for tests and benchmarks

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
    "evaluate": "fusejax.evaluation",
    "load_config": "fusejax.config",
    "fusion_loss": "fusejax.fusion",
    "lm_weight_schedule": "fusejax.fusion",
    "extract_topk": "fusejax.represent",
    "vocab_map": "fusejax.vocab_maps",
    "vocab_map_summary": "fusejax.vocab_maps",
    "align_tokens": "fusejax.dtw",
    "align_topk": "fusejax.align",
    "merge": "fusejax.merging",
    "generate": "fusejax.generation",
    "generate_ids": "fusejax.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusejax' has no attribute {name!r}")
