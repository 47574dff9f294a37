"""The lm-evaluation-harness backend: :class:`FusejaxLM` runs lm-eval tasks on a fusejax model (needs the
``eval`` extra: ``pip install fusejax[eval]``).

lm-eval 0.4.13 finds models only in its own registry (no entry points), so the model is registered as
``fusejax`` when this module is imported. Its command line with the registration done:

    python -m fusejax.harness --model fusejax --model_args path=FOLDER --tasks arc_easy --batch_size 8

takes every ``lm_eval`` argument. ``path`` is a Hugging Face folder (``fusejax.load_pretrained``) or a training
run, checkpoints or step folder (``fusejax.checkpoint.load_trained``; no export needed, the tokenizer comes
from the run config's target). Other model args: ``tokenizer`` (folder), ``max_length`` (context tokens;
default ``max_position_embeddings``), ``max_gen_toks`` (256), ``add_bos_token``, ``dtype`` (float32),
``step`` (checkpoint step), ``seed`` (sampling). ``fusejax eval CONFIG eval.tasks=[...]`` calls :func:`run_tasks`.

Requests are scored as lm-eval's Hugging Face backend (``--model hf``) scores them: the same tokenization,
left truncation, rolling windows (:func:`lm_eval.utils.get_rolling_token_windows`) and stop handling; batches
of ``batch_size`` length-sorted requests (:class:`lm_eval.models.utils.Collator`) are padded to power-of-two
lengths so that a run compiles a few programs, and log-probabilities are computed only at the continuation's
positions, ``LOGIT_CHUNK`` positions at a time (never the whole ``[B, T, V]`` float32 logits).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from fusejax.checkpoint import load_trained
from fusejax.data import bucket
from fusejax.generation import generate_ids
from fusejax.models import load_pretrained
from fusejax.tokenizer import load_tokenizer

LOGIT_CHUNK = 256  # continuation positions whose [B, chunk, V] float32 logits exist at one time
MIN_BUCKET = 16  # shortest padded length


@nnx.jit  # one compiled program per model architecture and padded shape, shared by every FusejaxLM
def _continuation_logprobs(model, ids, mask, positions, targets):
    """Log-probabilities of ``targets`` [B, C] int32 predicted at ``positions`` [B, C] int32 of the rows ``ids``,
    ``mask`` [B, T] int32: ``(logp [B, C] float32, greedy [B, C] bool)`` (the target is the argmax). ``C`` is a
    power of two, so that ``LOGIT_CHUNK`` (or ``C``) divides it."""
    hidden = model.hidden_states(ids, mask)  # [B, T, D]
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, C, D]
    B, C, D = hidden.shape
    chunk = min(C, LOGIT_CHUNK)

    def score(args):
        h, t = args  # [B, chunk, D], [B, chunk]
        logits = model.logits(h)  # [B, chunk, V] float32
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

    split = (hidden.reshape(B, C // chunk, chunk, D).swapaxes(0, 1),
             targets.reshape(B, C // chunk, chunk).swapaxes(0, 1))
    logp, greedy = jax.lax.map(score, split)  # [C // chunk, B, chunk]
    return logp.swapaxes(0, 1).reshape(B, C), greedy.swapaxes(0, 1).reshape(B, C)


def load_model(path: str | Path, *, tokenizer=None, step: int | None = None, dtype: str = "float32",
               mesh=None, rules=None):
    """``(model, tokenizer)`` of a Hugging Face folder (with ``config.json``) or a training run, checkpoints or
    step folder; the tokenizer is ``tokenizer`` (folder or object), else the model folder's, else the run
    config's target tokenizer."""
    path = Path(path)
    if (path / "config.json").is_file():
        return load_pretrained(path, dtype=dtype, mesh=mesh, rules=rules), load_tokenizer(tokenizer or path)
    model, _, meta = load_trained(path, step=step, mesh=mesh, rules=rules)
    if tokenizer is None:
        target = (meta.get("config") or {}).get("target") or {}
        tokenizer = target.get("tokenizer") or target.get("path")
        if tokenizer is None:
            raise ValueError(f"{path}: the checkpoint's run config names no target tokenizer; pass tokenizer=FOLDER")
    return model, load_tokenizer(tokenizer)


@register_model("fusejax")
class FusejaxLM(TemplateLM):
    """An lm-eval model backed by a fusejax ``Transformer``: from ``path`` (see :func:`load_model`), or from
    ``model`` and ``tokenizer`` objects already loaded (as ``fusejax eval`` passes them)."""

    def __init__(self, path: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 dtype: str = "float32", step: int | None = None, seed: int = 0, device=None, max_batch_size=None):
        """Model args as ``lm_eval --model_args`` parses them (numbers and booleans converted); ``device`` and
        ``max_batch_size``, which lm-eval always passes, are not used (the model's mesh decides placement)."""
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("FusejaxLM: pass either path=FOLDER or model= and tokenizer= (not both)")
        if model is None:
            model, tokenizer = load_model(path, tokenizer=tokenizer, dtype=dtype, step=step)
        elif tokenizer is None:
            raise ValueError("FusejaxLM: model= needs tokenizer=")
        if str(batch_size).startswith("auto"):
            raise ValueError(f"FusejaxLM: batch_size must be a number (no 'auto'), got {batch_size!r}")
        self.model, self.tokenizer = model, load_tokenizer(tokenizer)
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks, self.seed, self.add_bos_token = int(max_gen_toks), int(seed), add_bos_token

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token before an empty context and each rolling window: BOS, else EOS (as lm-eval's HF backend)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of ``string``: special tokens as ``add_special_tokens``, else ``add_bos_token``, else the
        tokenizer's default, but none when the string already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log-probability, is_greedy)`` of each ``(key, context ids, continuation ids)``, in order."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="fusejax loglikelihood")
        for batch in collator.get_batched(n=self.batch_size):
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
            conts = [continuation for _, _, continuation in batch]
            if max(map(len, conts)) > self.max_length:
                raise ValueError(f"a continuation of {max(map(len, conts))} tokens is longer than the context "
                                 f"max_length={self.max_length}")
            T = min(bucket(max(map(len, rows)), MIN_BUCKET), self.max_length)
            C = bucket(max(map(len, conts)), MIN_BUCKET)
            ids, mask = np.zeros((self.batch_size, T), np.int32), np.ones((self.batch_size, T), np.int32)
            positions, targets = np.zeros((self.batch_size, C), np.int32), np.zeros((self.batch_size, C), np.int32)
            for i, (row, cont) in enumerate(zip(rows, conts)):
                ids[i, :len(row)], mask[i, len(row):] = row, 0
                positions[i, :len(cont)] = np.arange(len(row) - len(cont), len(row))
                targets[i, :len(cont)] = cont
            logp, greedy = map(np.asarray, _continuation_logprobs(self.model, ids, mask, positions, targets))
            for i, (key, _, cont) in enumerate(batch):
                answer = (float(logp[i, :len(cont)].sum()), bool(greedy[i, :len(cont)].all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                out.append(answer)
            bar.update(len(batch))
        bar.close()
        return collator.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, over disjoint windows of ``max_length`` tokens that each
        condition on the token before them (the first on the prefix token)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owners, np.int64), [logp for logp, _ in scores])
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation (``fusejax.generation.generate_ids``: ends at the model's EOS ids, as
        transformers' ``generate`` does), cut before the first stop string (the task's ``until`` and the EOS
        text); greedy unless the task samples."""
        collator = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="fusejax generate_until")
        for batch in collator.get_batched(n=self.batch_size):
            contexts, gen_kwargs = [context for context, _ in batch], batch[0][1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be below the context length "
                                 f"max_length={self.max_length}")
            sample = kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            new = generate_ids(self.model, prompts, max_new_tokens=max_new,
                               temperature=float(kwargs["temperature"]) if sample else 0.0,
                               top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                               seed=self.seed, stop=tuple(until), tokenizer=self.tokenizer, batch_size=self.batch_size)
            for context, ids in zip(contexts, new):
                text = postprocess_generated_text(self.tokenizer.decode(ids, skip_special_tokens=True), until, None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            bar.update(len(batch))
        bar.close()
        return collator.get_original(out)


def task_manager(tasks, include_path: str | None = None):
    """lm-eval's ``TaskManager`` for ``tasks`` (names of tasks or groups): the tasks under ``include_path`` alone
    when they hold all of them (indexing lm-eval's own 14k task files takes about half a minute), else those
    and lm-eval's own. Raises ValueError naming the unknown tasks."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"eval.include_path={include_path} is not a folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"eval.tasks: unknown lm-eval task(s) {unknown}"
                         + (f" (also looked in eval.include_path={include_path})" if include_path else "")
                         + "; `lm_eval ls tasks` lists them")
    return manager


def run_tasks(model, tokenizer, tasks, manager, *, num_fewshot: int | None = None, limit: float | None = None,
              batch_size: int = 8, seed: int = 0) -> dict:
    """lm-eval ``tasks`` on a loaded fusejax ``model`` and ``tokenizer`` (folder or object), found by ``manager``
    (:func:`task_manager`); returns the JSON-safe part of lm-eval's results: ``{"results", "groups", "n-shot",
    "versions", "higher_is_better"}`` (per task, as ``lm_eval`` prints them)."""
    from lm_eval import simple_evaluate

    lm = FusejaxLM(model=model, tokenizer=tokenizer, batch_size=batch_size, seed=seed)
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=None,
                              fewshot_random_seed=seed, bootstrap_iters=0)
    keys = ("results", "groups", "n-shot", "versions", "higher_is_better")
    return {key: _json_safe(results.get(key, {})) for key in keys}


def _json_safe(obj):
    """``obj`` with non-finite floats as None and values JSON cannot hold as strings."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return str(obj)


def main() -> None:
    """``lm_eval``'s command line with the ``fusejax`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
