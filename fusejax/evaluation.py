"""Held-out evaluation of a target model: causal-LM loss (nats per token) and bits per byte, per domain.

:func:`evaluate` runs a jitted forward pass over fixed-shape batches of any :class:`fusejax.data.Batches`
(e.g. :class:`fusejax.data.TokenBatches` of the held-out split), holding a fusejax model's float32 logits for
a chunk of positions at a time, and sums, per row, the cross-entropy of every scored position
(``loss_mask``) and the row's UTF-8 bytes (``n_bytes``):

    loss          = sum CE / number of scored tokens                  (nats per token)
    bits_per_byte = sum CE / ln 2 / sum n_bytes                        (tokenizer-independent)

A block's first token is not predicted (nothing precedes it) while its EOS is; the byte count is the
block's text. A block's *domain* is the stem of the input file its document came from
(``prose.jsonl:17`` -> ``prose``), see :func:`domain_of`.

The stage (:func:`run`) evaluates the target before training and the trained model of ``<out>/train``
(its latest checkpoint) on the held-out blocks and writes ``<out>/eval/results.json``.
"""

from __future__ import annotations

import functools
import math
from pathlib import PurePosixPath

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusejax.checkpoint import load_trained
from fusejax.config import Config, save_resolved
from fusejax.data import TokenBatches
from fusejax.distributed import is_main_process
from fusejax.files import write_json
from fusejax.fusion import sparse_cross_entropy
from fusejax.models import Transformer, load_pretrained
from fusejax.models.transformer import head_logits
from fusejax.schema import RunLayout
from fusejax.sharding import make_mesh
from fusejax.tokenizer import load_tokenizer


def domain_of(doc_id: str) -> str:
    """The domain of a corpus document id: the stem of its input file name (``data/code.jsonl:3`` -> ``code``)."""
    name = doc_id.rpartition(":")[0] or doc_id
    return PurePosixPath(name).stem or name


def block_domains(batches) -> list[str]:
    """The domain of every row of a corpus-backed ``batches`` (``TokenBatches`` / ``AlignedBatches``)."""
    store = getattr(batches, "store", None)
    positions = getattr(batches, "positions", None)
    if store is None or positions is None:
        raise TypeError(f"{type(batches).__name__} has no corpus store/positions: pass domains= explicitly")
    if any(f.name == "doc_id" for f in store.fields):
        return [domain_of(store.row(int(p))["doc_id"]) for p in positions]
    raise ValueError(f"store {store.path} (kind {store.kind!r}) has no 'doc_id' field to derive domains from")


@functools.partial(nnx.jit, static_argnames="chunk")  # one compile per model architecture and batch shape
def _row_sums(model, input_ids, attention_mask, labels, loss_mask, *, chunk: int):
    """Per row: summed next-token CE over scored positions [B] float32 and the number of them [B] int32.

    A :class:`Transformer`'s logits are computed ``chunk`` positions of every row at a time
    (:func:`fusejax.fusion.sparse_cross_entropy` on its hidden states, padded to a multiple of the chunk), so
    no float32 ``[B,T,V]`` is held; any other model (e.g. an output ensemble) is scored from its whole
    ``model(input_ids, attention_mask)`` [B,T,V] logits."""
    safe = jnp.where(loss_mask > 0, labels, 0)
    scored = loss_mask > 0
    if isinstance(model, Transformer):
        T = input_ids.shape[1]
        c = min(chunk, T)
        pad = ((0, 0), (0, -T % c))
        hidden = jnp.pad(model.hidden_states(input_ids, attention_mask), (*pad, (0, 0)))
        ids = jnp.pad(safe, pad)[..., None]
        head = functools.partial(head_logits, model.config)
        _, lse, picked = sparse_cross_entropy(head, model.head_weight, hidden, ids, jnp.zeros(ids.shape), c)
        ce = (lse - picked[..., 0])[:, :T]
    else:
        logp = jax.nn.log_softmax(model(input_ids, attention_mask).astype(jnp.float32), axis=-1)
        ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(scored, ce, 0.0).sum(-1), scored.sum(-1).astype(jnp.int32)


def evaluate(model, batches, *, batch_size: int, max_batches: int | None = None,
             domains: list[str] | None = None, chunk: int = 256) -> dict:
    """Loss and bits per byte of ``model`` (a fusejax ``Transformer``) over the rows of ``batches``.

    ``batches``: rows with ``input_ids``, ``attention_mask``, ``labels``, ``loss_mask`` [n, T] and ``n_bytes``
    [n], read in order in batches of ``batch_size`` rows (the last one padded with masked rows, so one
    compiled shape); ``max_batches`` caps the batches read. ``domains``: a label per row (default: from the
    corpus store, :func:`block_domains`; ``[]`` for none). ``chunk``: positions of every row whose float32
    logits are held at a time (a fusejax ``Transformer``; see :func:`_row_sums`). Returns ``{"loss",
    "bits_per_byte", "tokens", "bytes", "blocks", "domains": {name: {the same keys}}}``.
    """
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    n = batches.num_rows if max_batches is None else min(batches.num_rows, max_batches * batch_size)
    domains = block_domains(batches) if domains is None else list(domains)
    if domains and len(domains) < n:
        raise ValueError(f"evaluate: {len(domains)} domain labels for {n} rows")
    if chunk < 1:
        raise ValueError(f"evaluate: chunk must be >= 1, got {chunk}")
    ce, tokens, n_bytes = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for first in range(0, n, batch_size):
        real = np.arange(first, min(first + batch_size, n))
        indices = np.concatenate([real, np.full(batch_size - len(real), real[0])])  # pad rows: masked below
        rows = batches.rows(indices)
        keep = (np.arange(batch_size) < len(real)).astype(np.int32)
        loss_mask = np.asarray(rows["loss_mask"], np.int32) * keep[:, None]
        sums, counts = _row_sums(model, np.asarray(rows["input_ids"], np.int32),
                                 np.asarray(rows["attention_mask"], np.int32), np.asarray(rows["labels"], np.int32),
                                 loss_mask, chunk=chunk)
        ce[real] = np.asarray(sums, np.float64)[: len(real)]
        tokens[real] = np.asarray(counts)[: len(real)]
        n_bytes[real] = np.asarray(rows["n_bytes"])[: len(real)]
    out = _summary(ce, tokens, n_bytes)
    labels = np.asarray(domains[:n], dtype=object)
    out["domains"] = {d: _summary(ce[labels == d], tokens[labels == d], n_bytes[labels == d])
                      for d in sorted(set(domains[:n]))}
    return out


def _summary(ce: np.ndarray, tokens: np.ndarray, n_bytes: np.ndarray) -> dict:
    total, n_tok, n_b = float(ce.sum()), int(tokens.sum()), int(n_bytes.sum())
    return {"loss": total / n_tok if n_tok else math.nan,
            "bits_per_byte": total / math.log(2) / n_b if n_b else math.nan,
            "tokens": n_tok, "bytes": n_b, "blocks": len(ce)}


def heldout_batches(cfg: Config, tokenizer=None) -> TokenBatches:
    """``TokenBatches`` of the held-out blocks of ``<out>/corpus`` with the target tokenizer and ``train.seq_len``."""
    tok = load_tokenizer(cfg.target.tokenizer_path if tokenizer is None else tokenizer)
    return TokenBatches(RunLayout.of(cfg).corpus, tok, seq_len=cfg.train.seq_len, split="heldout",
                        chat_template=cfg.target.chat_template)


def run(cfg: Config) -> dict:
    """Stage ``eval``: the target before training and the trained model (``<out>/train``) on the held-out
    blocks; writes and returns ``<out>/eval/results.json`` as ``{"target": {...}, "trained": {...}}``. With
    ``eval.tasks``, also runs those lm-eval tasks on both models (:func:`fusejax.harness.run_tasks`) and writes
    ``<out>/eval/tasks.json`` in the same shape."""
    layout = RunLayout.of(cfg)
    if cfg.eval.tasks:  # before any model is loaded: fail fast
        harness = harness_module()
        manager = harness.task_manager(cfg.eval.tasks, cfg.eval.include_path)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = cfg.mesh.rules
    data = heldout_batches(cfg)
    domains = block_domains(data)
    kw = dict(batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches, domains=domains)
    models = {"target": lambda: load_pretrained(cfg.target.path, mesh=mesh, rules=rules),
              "trained": lambda: load_trained(layout.train, mesh=mesh, rules=rules)[0]}
    results, tasks = {}, {}
    for name, load in models.items():  # one model in memory at a time
        model = load()
        results[name] = evaluate(model, data, **kw)
        if cfg.eval.tasks:
            tasks[name] = harness.run_tasks(model, cfg.target.tokenizer_path, cfg.eval.tasks, manager,
                                            num_fewshot=cfg.eval.num_fewshot, limit=cfg.eval.limit,
                                            batch_size=cfg.eval.batch_size, seed=cfg.run.seed)
        del model
    if is_main_process():
        write_json(layout.eval / "results.json", results)
        if tasks:
            write_json(layout.eval / "tasks.json", tasks)
        save_resolved(cfg, layout.eval)
    return results


def harness_module():
    """The ``fusejax.harness`` module; ImportError saying how to install lm-eval when it is missing."""
    try:
        from fusejax import harness
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "lm_eval":
            raise
        raise ImportError("eval.tasks needs lm-evaluation-harness, which is not installed: "
                          "pip install fusejax[eval]") from e
    return harness
