"""Text generation with a KV cache: ``fusejax generate CONFIG``, :func:`generate` (text) and :func:`generate_ids`.

Prompts are sorted by length and cut into batches of ``batch_size``; each batch is left-padded to a bucket
(rows: a power of two up to ``batch_size``, a multiple of the mesh's batch shards; prompt length: a power of
two, at least :data:`MIN_BUCKET`), prefilled in one call (:meth:`Transformer.extend` on an empty
:class:`KVCache` of a power-of-two length) and then decoded :data:`CHUNK` tokens per jitted call (a
``lax.while_loop`` that stops early once every row has ended). A run compiles once per bucket, not per prompt.
Between calls the host checks stop strings; EOS is checked on the device.

Greedy when ``temperature == 0``; otherwise the logits are divided by the temperature, cut to the ``top_k``
highest (0: off) and then to the smallest set whose probability reaches ``top_p`` (1: off), and sampled with a
key folded from ``seed``, the batch and the step: the same seed gives the same output.

The model may be sharded on a mesh: call inside ``jax.set_mesh(mesh)``; the cache is laid out by its logical
axes (:data:`fusejax.models.transformer.CACHE_AXES`) under the model's rules.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusejax.checkpoint import load_trained
from fusejax.config import Config
from fusejax.data import bucket
from fusejax.files import atomic_write
from fusejax.models import Transformer, load_pretrained
from fusejax.models.transformer import KVCache
from fusejax.schema import RunLayout
from fusejax.sharding import logical_to_spec, make_mesh
from fusejax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # the shortest prompt bucket (tokens)
CHUNK = 32  # decoding steps per jitted call (stop strings are checked between calls)


class Sampling(NamedTuple):
    """How the next token is chosen: greedy when ``temperature == 0``; ``top_k`` 0 and ``top_p`` 1 are off.
    Traced under jit (a pytree), so that only greedy or not changes the compiled program."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [..., V] float32 divided by the temperature, -inf outside the top-k and then outside the smallest
    set of highest-probability tokens whose probability reaches top_p (ties at a threshold are kept)."""
    logits = logits / s.temperature
    desc = -jnp.sort(-logits, axis=-1)
    V = logits.shape[-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (*desc.shape[:-1], 1)), axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    desc = jnp.where(jnp.arange(V) < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the higher-ranked tokens
    threshold = jnp.min(jnp.where(before < s.top_p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((s.top_p < 1) & (logits < threshold), -jnp.inf, logits)


def next_token(logits: jax.Array, key: jax.Array, s: Sampling, greedy: bool) -> jax.Array:
    """The next token [B] int32 of logits [B, V] float32: argmax, or a sample of :func:`filter_logits`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "greedy"))
def _prefill(graphdef, state, ids, mask, key, sampling: Sampling, *, length: int, greedy: bool):
    """The left-padded prompts ids, mask [B, T] into an empty cache of ``length`` slots: (cache, first new
    token [B] int32)."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config, ids.shape[0], length, model.rules)
    hidden, cache = model.extend(ids, mask, cache)
    return cache, next_token(model.logits(hidden[:, -1]), jax.random.fold_in(key, 0), sampling, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "eos_ids"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, token, done, key, step, limit, sampling: Sampling, *, greedy: bool,
            eos_ids: tuple[int, ...]):
    """Up to ``limit`` (<= CHUNK) decoding steps from ``token`` [B]: each writes the last token into the cache
    and picks the next (new token number ``step``, ``step + 1``, ...); stops early once every row is ``done``
    [B] bool (EOS seen or stopped). Returns (cache, tokens [B, CHUNK] int32 (the first ``steps`` valid),
    steps, last token, done)."""
    model = nnx.merge(graphdef, state)
    B = token.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)

    def body(carry):
        cache, token, done, tokens, i = carry
        hidden, cache = model.extend(token[:, None], jnp.ones((B, 1), jnp.int32), cache)
        token = next_token(model.logits(hidden[:, 0]), jax.random.fold_in(key, step + i), sampling, greedy)
        done = done | jnp.isin(token, eos)
        return cache, token, done, tokens.at[:, i].set(token), i + 1

    def cond(carry):
        return (carry[4] < limit) & ~jnp.all(carry[2])

    carry = (cache, token, done, jnp.zeros((B, CHUNK), jnp.int32), jnp.zeros((), jnp.int32))
    cache, token, done, tokens, steps = jax.lax.while_loop(cond, body, carry)
    return cache, tokens, steps, token, done


def _batch_shards(rules) -> int:
    """How many ways the current mesh (``jax.set_mesh``) splits the batch axis under ``rules`` (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = logical_to_spec(("batch",), rules=dict(rules))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def model_eos_ids(model: Transformer, folder: str | Path | None = None) -> tuple[int, ...]:
    """The model's EOS ids: ``eos_token_id`` of its config (int or list) and, given the model ``folder``, of
    its ``generation_config.json`` if present (transformers' ``generate`` stops at these)."""
    ids = [model.config.eos_token_id]
    if folder is not None and (Path(folder) / "generation_config.json").is_file():
        ids.append(json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id"))
    flat = [i for x in ids if x is not None for i in (x if isinstance(x, (list, tuple)) else [x])]
    return tuple(dict.fromkeys(int(i) for i in flat))


def _stop_at(tokenizer, ids: list[int], checked: int, stop: Sequence[str]) -> int | None:
    """The fewest of ``ids`` (more than ``checked``, whose text had no stop string) whose text contains a stop
    string, or None."""
    if not any(s in tokenizer.decode(ids) for s in stop):
        return None
    return next(n for n in range(checked + 1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stop))


def _check(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, tokenizer, batch_size) -> None:
    """One clear ValueError for a setting or prompt that cannot work."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: expected temperature >= 0, "
                         "top_k >= 0 and top_p in (0, 1]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    if stop and tokenizer is None:
        raise ValueError(f"stop={list(stop)} needs a tokenizer (to read the text of the new tokens)")
    c = model.config
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if c.position == "learned" and len(p) + max_new_tokens > c.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceed the model's "
                             f"max_position_embeddings={c.max_position_embeddings} (learned positions)")
        if not all(0 <= t < c.vocab_size for t in p):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {c.vocab_size})")


def generate_ids(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, eos_ids=None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop=(),
                 tokenizer=None, batch_size: int = 8) -> list[list[int]]:
    """The new token ids of each prompt (lists of ids), at most ``max_new_tokens``: cut before the first of
    ``eos_ids`` (None: the model's own, :func:`model_eos_ids`; () none) and after the token that completes one of
    the ``stop`` strings (read through ``tokenizer``). Sampling: see the module docstring."""
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, tokenizer, batch_size)
    eos_ids = model_eos_ids(model) if eos_ids is None else tuple(int(i) for i in eos_ids)
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    graphdef, state = nnx.split(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    key = jax.random.key(seed)
    for b, first in enumerate(range(0, len(order), batch_size)):
        rows = order[first:first + batch_size]
        new = _generate_batch(graphdef, state, model, [prompts[i] for i in rows], max_new_tokens, eos_ids,
                              sampling, jax.random.fold_in(key, b), stop, tokenizer)
        for i, ids in zip(rows, new):
            out[i] = ids
    return out


def _generate_batch(graphdef, state, model, prompts, max_new_tokens, eos_ids, sampling, key, stop, tokenizer):
    """:func:`generate_ids` of one batch of prompts (at most batch_size)."""
    shards = _batch_shards(model.rules)
    B = -(-bucket(len(prompts)) // shards) * shards
    T = bucket(max(map(len, prompts)), MIN_BUCKET)
    ids, mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    mask[:, -1] = 1  # rows past the prompts: one token, done from the start
    for r, p in enumerate(prompts):
        ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
    greedy = sampling.temperature == 0
    cache, token = _prefill(graphdef, state, ids, mask, key, sampling, length=bucket(T + max_new_tokens),
                            greedy=greedy)
    new: list[list[int]] = [[] for _ in prompts]
    ended = np.ones(B, bool)
    ended[:len(prompts)] = False

    def add(tokens: np.ndarray) -> None:  # [B, n] new tokens: cut at EOS and stop strings, mark ended rows
        for r, ids_r in enumerate(new):
            if ended[r]:
                continue
            more = tokens[r].tolist()
            eos = next((i for i, t in enumerate(more) if t in eos_ids), None)
            checked = len(ids_r)
            ids_r += more[:eos]
            n = _stop_at(tokenizer, ids_r, checked, stop) if stop else None
            if n is not None:
                del ids_r[n:]
            ended[r] = eos is not None or n is not None

    add(np.asarray(token)[:, None])
    produced = 1
    while produced < max_new_tokens and not ended.all():
        limit = min(CHUNK, max_new_tokens - produced)
        cache, tokens, steps, token, _ = _decode(graphdef, state, cache, token, ended, key, produced, limit,
                                                 sampling, greedy=greedy, eos_ids=eos_ids)
        add(np.asarray(tokens)[:, :int(steps)])
        produced += int(steps)
    return new


def generate(model: Transformer, tokenizer, prompts: list[str], **options) -> list[str]:
    """The text of the new tokens of each prompt (encoded with ``tokenizer``, special tokens added as the
    tokenizer does), cut before the first of the ``stop`` strings; ``options``: those of :func:`generate_ids`."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    stop = tuple(options.get("stop", ()))
    texts = [tokenizer.decode(new, skip_special_tokens=True)
             for new in generate_ids(model, ids, tokenizer=tokenizer, **options)]
    return [min((t.split(s, 1)[0] for s in stop if s in t), key=len, default=t) for t in texts]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file: .jsonl, one object with a string ``prompt`` per line; otherwise one prompt per
    non-empty line. Errors (not UTF-8, a bad line, no prompt at all) name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generate.prompts: {path} is not a file")
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"generate.prompts: {path}:{line}: not UTF-8 (byte {data[err.start]:#04x} at offset "
                         f"{err.start})") from None
    prompts = ([_jsonl_prompt(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
               if path.suffix == ".jsonl" else [line for line in lines if line.strip()])
    if not prompts:
        raise ValueError(f"generate.prompts: {path} holds no prompts")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    """The string ``prompt`` of a JSON object line."""
    try:
        prompt = json.loads(line).get("prompt")
    except (json.JSONDecodeError, AttributeError):
        prompt = None
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: expected a JSON object with a string field 'prompt'")
    return prompt


def run(cfg: Config) -> dict:
    """``fusejax generate``: the completions of ``generate.prompts`` by ``generate.model`` (or the run's latest
    training checkpoint) on the configured mesh, written to ``generate.output`` as JSONL (atomically)."""
    g = cfg.generate
    if g.prompts is None:
        raise ValueError("generate.prompts is not set: give a .jsonl or text file of prompts")
    prompts = read_prompts(g.prompts)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if g.model is not None:
        model = load_pretrained(g.model, mesh=mesh, rules=cfg.mesh.rules)
        tokenizer, eos_ids = load_tokenizer(g.tokenizer or g.model), model_eos_ids(model, g.model)
    else:
        model = load_trained(RunLayout.of(cfg).train, mesh=mesh, rules=cfg.mesh.rules)[0]
        tokenizer, eos_ids = load_tokenizer(g.tokenizer or cfg.target.tokenizer_path), None
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        completions = generate(model, tokenizer, prompts, max_new_tokens=g.max_new_tokens, eos_ids=eos_ids,
                               temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed, stop=g.stop,
                               batch_size=g.batch_size)
    seconds = time.perf_counter() - start
    out = Path(g.output or Path(cfg.run.output_dir) / "generate.jsonl")
    if jax.process_index() == 0:
        atomic_write(out, "".join(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n"
                                  for p, c in zip(prompts, completions)).encode())
    log.info("wrote %d completions to %s in %.1f s", len(prompts), out, seconds)
    return {"output": str(out), "prompts": len(prompts), "seconds": round(seconds, 3)}
