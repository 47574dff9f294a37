"""Source representations: top-k next-token logits and cross-entropy of a source model on the corpus.

``extract_step`` is the jitted core: one forward pass to the hidden states, then, a chunk of positions at
a time, the head, top-k and per-token cross-entropy on the device: no ``[B, T, V]`` logits are ever held
whole. The stage (``run``) streams corpus blocks through it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fusejax import chat
from fusejax.config import Config
from fusejax.data import bucket
from fusejax.models.transformer import head_logits


_CHUNK = 64  # vocabulary entries per chunk in ``top_k``
CHUNK = 64  # positions of each row whose logits ``extract_step`` holds at once (a few float32 copies)


def top_k(logits: jax.Array, k: int):
    """``jax.lax.top_k`` over the last axis, exactly (values, ids and tie order), in two cheap stages.

    The vocabulary is cut into chunks of ``_CHUNK`` entries; each of the k largest logits lies in one of the
    k chunks with the largest maxima (a chunk outside them has k chunks above it, each holding a larger logit),
    so a max per chunk, a top-k over the V/64 chunk maxima and a top-k over the k*64 logits of the winning
    chunks (gathered in vocabulary order, so ties keep the lowest id, as ``lax.top_k`` does) give the same
    result. XLA:CPU's ``top_k`` over all of V is ~4x slower than this; small vocabularies use it directly.
    logits [..., V] -> (values [..., k], ids [..., k] int32).
    """
    vocab = logits.shape[-1]
    if vocab < 4 * k * _CHUNK:
        return jax.lax.top_k(logits, k)
    pad = -vocab % _CHUNK
    chunks = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    chunks = chunks.reshape(*logits.shape[:-1], -1, _CHUNK)
    _, best = jax.lax.top_k(chunks.max(axis=-1), k)
    best = jnp.sort(best, axis=-1)
    candidates = jnp.take_along_axis(chunks, best[..., None], axis=-2).reshape(*logits.shape[:-1], k * _CHUNK)
    values, where = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(best, where // _CHUNK, axis=-1) * _CHUNK + where % _CHUNK


def position_stats(logits: jax.Array, next_ids: jax.Array, k: int):
    """Per position of logits [..., Vp] float32 (padded vocabulary ids hold -inf, so they count for nothing and
    are never among the top k <= vocab_size; no sliced copy is made) and the next token next_ids [...] int:
    (top-k logits [..., k] f32, their ids [..., k] i32, the next token's logit [...], the logsumexp [...],
    NaN or +inf where any logit is NaN or +inf)."""
    values, ids = top_k(logits, k)
    target = jnp.take_along_axis(logits, next_ids[..., None], axis=-1)[..., 0]
    return values, ids.astype(jnp.int32), target, jax.nn.logsumexp(logits, axis=-1)


@functools.partial(nnx.jit, static_argnames=("k", "chunk"))
def extract_step(model, input_ids, attention_mask, k, chunk=CHUNK):
    """The jitted core of :func:`extract_topk`: input_ids [B,T] int32, attention_mask [B,T] (1 = token).

    The head is applied to ``chunk`` positions of every row at a time (:func:`position_stats` in a
    ``lax.map``; T is padded up to a multiple of it), so no ``[B,T,V]`` float32 logits are held beyond one
    chunk. Position t scores token t+1. Returns (topk_logits [B,T,k] f32, topk_ids [B,T,k] i32, token_ce
    [B,T] f32 (0 where t+1 is padding or past the end), seq_ce [B] f32 (mean over scored positions, 0 for a
    sequence with none), nonfinite [B] int32 (real positions whose logits hold a NaN or +inf, read off the
    logsumexp at no extra cost)).
    """
    mask = attention_mask.astype(bool)
    scored = mask & jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_ids = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    t = input_ids.shape[1]
    chunk = min(chunk, t)
    pad = -t % chunk
    hidden = jnp.pad(model.hidden_states(input_ids, attention_mask), ((0, 0), (0, pad), (0, 0)))
    head, weight = functools.partial(head_logits, model.config), model.head_weight

    def chunks(x):  # [B,T+pad,...] -> [chunks, B, chunk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)

    def one(xs):
        return position_stats(head(weight, xs[0]), xs[1], k)

    stats = jax.lax.map(one, (chunks(hidden), chunks(jnp.pad(next_ids, ((0, 0), (0, pad))))))
    topk_logits, topk_ids, target, lse = (jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :t]
                                          for x in stats)
    token_ce = jnp.where(scored, lse - target, 0.0)
    n_scored = scored.sum(axis=-1)
    seq_ce = token_ce.sum(axis=-1) / jnp.maximum(n_scored, 1)
    nonfinite = jnp.sum(~jnp.isfinite(lse) & mask, axis=1).astype(jnp.int32)
    return topk_logits, topk_ids, token_ce, seq_ce, nonfinite


def extract_topk(model, input_ids, attention_mask, k: int = 10):
    """Top-k logits/ids and cross-entropies of ``model`` on a padded batch.

    model: a fusejax ``Transformer``; input_ids [B,T] int32; attention_mask [B,T] (1 = token, 0 = pad).
    Returns ``(topk_logits [B,T,k] float32, topk_ids [B,T,k] int32, token_ce [B,T] float32,
    seq_ce [B] float32)``: position t scores token t+1; padding and the last real token get CE 0 and are
    excluded from ``seq_ce``.
    """
    vocab = model.config.vocab_size
    if not 0 < k <= vocab:
        raise ValueError(f"k={k} must be between 1 and the model's vocabulary size {vocab}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return extract_step(model, input_ids, attention_mask, k)[:4]


def device_layout(sharding: jax.sharding.Sharding) -> dict:
    """What a top-k store records of the devices it was computed on (logits differ in their last bits on
    another layout): ``{"mesh": {axis: size} or None, "devices": count, "platform": e.g. "cpu"}``."""
    mesh = getattr(sharding, "mesh", None)
    devices = sharding.device_set
    return {"mesh": dict(mesh.shape) if mesh is not None else None, "devices": len(devices),
            "platform": next(iter(devices)).platform}


def represent_source(
    model,
    tokenizer,
    corpus_dir,
    out_dir,
    *,
    name: str,
    model_fingerprint: str,
    k: int = 10,
    batch_size: int = 8,
    logits_dtype: str = "bfloat16",
    rows_per_shard: int = 1024,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    chat_template: str | None = None,
) -> dict:
    """Write the top-k store of one source model over a prepared corpus store; resumable, deterministic.

    Each corpus block's text is tokenized with the source's own tokenizer (+ EOS), run through ``model`` in
    fixed-shape padded batches, and stored as one row keyed by the block id with fields ``input_ids [T]``,
    ``topk_ids [T,k]`` (the narrowest ids of the vocabulary, :func:`fusejax.schema.index_dtype`),
    ``topk_logits [T,k]`` ``logits_dtype``, ``token_ce [T]`` float32,
    ``seq_ce`` float32 and ``nonfinite`` int32 (positions of the block with NaN/inf logits; the fusion stage skips
    blocks where it is non-zero). Process ``process_index`` of ``num_processes`` handles a contiguous slice
    of the blocks and writes its own shards. A chat corpus's blocks are rendered with the source's own chat
    template (``chat_template``: a Jinja file for a tokenizer without one; :func:`fusejax.chat.encode`, no EOS
    appended) and the meta records the template's hash.

    ``model_fingerprint``: :func:`fusejax.models.hf_io.model_fingerprint` of the folder ``model`` was loaded from.
    The store meta records it with the tokenizer fingerprint, k, dtype, the corpus meta, the store's format
    version and the :func:`device_layout` of the model's parameters; a rerun with any of them changed (e.g.
    other weights saved into the same folder, or another mesh) is refused with one line naming the source, the
    store and the differing key (remove the store, or use ``fusejax run``, which moves it aside), never resumed
    on top of rows of the old model. Refused, not redone: a store never deletes rows.

    Returns ``{"blocks", "tokens", "nonfinite_blocks"}`` computed by this call, ``"resumed_blocks"`` (found
    complete in the store and kept), ``"stored_blocks"`` (this process's slice, all stored now) and ``"seconds"``.
    """
    import time

    import numpy as np
    from tqdm import tqdm

    from fusejax.distributed import process_slice
    from fusejax.schema import CORPUS_KIND, TOPK_KIND, check_existing, format_meta, open_checked, topk_fields
    from fusejax.store import StoreError, StoreMismatchError, StoreWriter
    from fusejax.tokenizer import encode_block, load_tokenizer, tokenizer_fingerprint

    corpus = open_checked(corpus_dir, CORPUS_KIND, verify=True)  # a corrupted corpus shard is named, never read
    is_chat = chat.is_chat(corpus.meta)
    tok = chat.chat_tokenizer(tokenizer, chat_template, f"source {name!r}") if is_chat else load_tokenizer(tokenizer)
    vocab = model.config.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"source {name!r}: tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}")
    if not 0 < k <= vocab:
        raise ValueError(f"represent.k={k} must be between 1 and the vocabulary size {vocab} of source {name!r}")
    # shards hold whole batches, so a resumed run batches (and pads) exactly like an uninterrupted one
    rows_per_shard = -(-rows_per_shard // batch_size) * batch_size
    context = model.config.max_position_embeddings
    start, stop = process_slice(len(corpus), process_index, num_processes)
    fields = topk_fields(k, logits_dtype, vocab)
    devices = device_layout(jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding)
    meta = format_meta(
        TOPK_KIND,
        source=name,
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        vocab_size=vocab,
        k=k,
        logits_dtype=logits_dtype,
        corpus=corpus.meta,
        eos_appended=tok.eos_token_id is not None and not is_chat,
        device_layout=devices,
        **({"chat_template": chat.template_hash(tok)} if is_chat else {}),
    )
    check_existing(out_dir, TOPK_KIND, device_layout=devices)
    stats = {"blocks": 0, "tokens": 0, "nonfinite_blocks": 0}
    t0 = time.perf_counter()
    try:
        writer = StoreWriter(out_dir, kind=TOPK_KIND, meta=meta, fields=fields, rows_per_shard=rows_per_shard,
                             process_index=process_index)
    except StoreMismatchError as e:
        raise StoreMismatchError(f"source {name!r}: {e}; remove {out_dir} to redo it, or use `fusejax run`, "
                                 f"which moves it aside") from None
    with writer:
        done = writer.completed_ids()
        stats["resumed_blocks"] = len(done)
        if len(done) and not np.array_equal(done, [corpus.row(i)["id"] for i in range(start, start + len(done))]):
            raise StoreError(f"{out_dir}: stored blocks of source {name!r} do not follow corpus {corpus_dir}")
        # a with block closes the bar on errors too, so that an error message starts on its own line
        with tqdm(total=stop - start, initial=len(done), disable=not progress, unit="block",
                  desc=f"represent {name}") as bar:
            for first in range(start + len(done), stop, batch_size):
                rows = [corpus.row(i) for i in range(first, min(first + batch_size, stop))]
                seqs = [chat.encode(tok, chat.block_messages(row["text"]), f"block {row['id']}")[0] if is_chat
                        else encode_block(tok, row["text"].decode("utf-8")) for row in rows]
                longest = max(len(s) for s in seqs)
                if longest > context:
                    bad = rows[[len(s) for s in seqs].index(longest)]["id"]
                    raise ValueError(
                        f"block {bad} has {longest} tokens for source {name!r}, more than its context of {context}; "
                        f"lower corpus.block_size"
                    )
                length = min(bucket(longest, 16), context)  # a few shapes, capped at the context
                ids = np.zeros((batch_size, length), np.int32)  # fixed batch size: short last batch padded
                mask = np.zeros((batch_size, length), np.int32)
                for b, s in enumerate(seqs):
                    ids[b, : len(s)], mask[b, : len(s)] = s, 1
                out = jax.device_get(extract_step(model, jnp.asarray(ids), jnp.asarray(mask), k))
                tk_logits, tk_ids, token_ce, seq_ce, nonfinite = out
                for b, (row, s) in enumerate(zip(rows, seqs)):
                    n = len(s)
                    writer.add(
                        int(row["id"]), input_ids=np.asarray(s, np.int32), topk_ids=tk_ids[b, :n],
                        topk_logits=tk_logits[b, :n], token_ce=token_ce[b, :n], seq_ce=seq_ce[b],
                        nonfinite=nonfinite[b],
                    )
                    stats["blocks"] += 1
                    stats["tokens"] += n
                    stats["nonfinite_blocks"] += int(nonfinite[b] > 0)
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{stats['tokens'] / (time.perf_counter() - t0):.0f}")
    stats["seconds"] = time.perf_counter() - t0
    stats["stored_blocks"] = stop - start
    if stats["nonfinite_blocks"]:
        import logging

        logging.getLogger(__name__).warning(
            "source %s: %d blocks had NaN/inf logits; they are flagged (field 'nonfinite') and skipped by fusion",
            name, stats["nonfinite_blocks"],
        )
    return stats


def run(cfg: Config) -> dict:
    """Stage ``represent``: a top-k store per source at ``<run.output_dir>/represent/<name>``.

    Reads the corpus store at ``<run.output_dir>/corpus`` (stage ``prepare``). Each source model is loaded
    onto this process's local devices; in a multi-process run each process handles its slice of the blocks.
    Returns ``{source name: summary}`` (also written to ``represent/summary.json`` by process 0).
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from fusejax.config import save_resolved
    from fusejax.distributed import is_main_process
    from fusejax.files import write_json
    from fusejax.models import load_pretrained
    from fusejax.models.hf_io import model_fingerprint
    from fusejax.schema import TOPK_KIND, RunLayout, check_existing
    from fusejax.sharding import make_mesh

    layout = RunLayout.of(cfg)
    if not cfg.sources:
        raise ValueError("the config lists no sources: add entries under 'sources:'")
    # each process runs its own slice on its own devices: no cross-host traffic in this stage
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
    layout_now = device_layout(NamedSharding(mesh, PartitionSpec()))
    for src in cfg.sources:  # every source's store checked before any is extended: a refusal writes nothing
        check_existing(layout.topk(src.name), TOPK_KIND, logits_dtype=cfg.represent.logits_dtype,
                       device_layout=layout_now)
    summaries = {}
    for src in cfg.sources:
        model = load_pretrained(src.path, mesh=mesh, rules=cfg.mesh.rules)
        summaries[src.name] = represent_source(
            model, src.tokenizer_path, layout.corpus, layout.topk(src.name), name=src.name,
            model_fingerprint=model_fingerprint(src.path),
            k=cfg.represent.k, batch_size=cfg.represent.batch_size, logits_dtype=cfg.represent.logits_dtype,
            rows_per_shard=cfg.represent.shard_size, process_index=jax.process_index(),
            num_processes=jax.process_count(), chat_template=src.chat_template,
        )
    if is_main_process():
        save_resolved(cfg, layout.represent)
        write_json(layout.represent / "summary.json", summaries)
    return summaries
