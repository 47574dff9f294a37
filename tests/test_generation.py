"""Generation with a KV cache (fusejax.generation) against transformers (PyTorch) and naive references.

Greedy ids equal transformers' ``generate(do_sample=False)`` on the same tiny random Hugging Face folder for
every supported architecture and option (the cases of test_models.py and test_families.py), each prompt of a
batch of different lengths compared with transformers' generation of that prompt alone (unpadded); the
cache path's logits equal the full forward's; sampling is seeded and picks only from the top-k / top-p set
(a numpy computation); EOS and stop strings cut where they should; a run compiles once per bucket; the model
sharded on a (data, tensor) mesh gives the same ids; ``fusejax generate`` writes its file and refuses bad
settings with one line naming the field.
"""

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusejax import cli
from fusejax.generation import (Sampling, _decode, _prefill, filter_logits, generate, generate_ids,
                                model_eos_ids, next_token)
from fusejax.models import load_pretrained
from fusejax.models.transformer import KVCache
from fusejax.sharding import make_mesh
from test_families import CASES as FAMILY_CASES
from test_models import CASES as MODEL_CASES
from tiny import PARITY_VOCAB, bpe_tokenizer, save_random_hf_model, save_tiny_model

CASES = {**MODEL_CASES, **FAMILY_CASES}
# every model type once, with the options whose decoding differs from the full forward's: per-row lengths of
# dynamic RoPE and LongRoPE, sliding windows, local and global RoPE, soft-caps, ALiBi, learned positions (the
# fixed-frequency RoPE variants, llama3, yarn and linear, use the same tables in both paths)
PARITY_CASES = ["llama_gqa", "llama_dynamic", "mistral_window", "mixtral", "qwen2_window", "qwen3_qk_norm",
                "phi3_longrope_long", "gemma2", "gemma3_text", "gpt_neox_parallel", "mpt", "gpt2"]
# lengths 9 and 5 pass the sliding windows (3..5), Phi-3's original length (8) and dynamic RoPE's
# max_position_embeddings (8) while generating; 2: a short row left-padded next to them
PROMPTS = [[5, 17, 33, 40, 7], [9, 8, 7, 6, 5, 4, 3, 100, 200], [11, 12]]
NEW = 8


def _hf_greedy(hf, prompts, max_new_tokens, eos_id=2):
    """transformers' greedy new ids of each prompt alone (a fresh copy each: dynamic RoPE keeps state), cut
    before EOS."""
    out = []
    for p in prompts:
        ids = copy.deepcopy(hf).generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                         do_sample=False, max_new_tokens=max_new_tokens)[0, len(p):].tolist()
        out.append(ids[:ids.index(eos_id)] if eos_id in ids else ids)
    return out


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory):
    """name -> (folder, transformers' greedy ids of PROMPTS), made once per module on first use."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(f"gen_{name}")
            hf = save_random_hf_model(folder, *CASES[name])
            made[name] = folder, _hf_greedy(hf, PROMPTS, NEW)
        return made[name]

    return get


@pytest.mark.parametrize("name", PARITY_CASES)
def test_greedy_ids_match_transformers(hf_cases, name):
    folder, ref = hf_cases(name)
    assert any(len(r) > 1 for r in ref)
    assert generate_ids(load_pretrained(folder), PROMPTS, max_new_tokens=NEW) == ref


def test_generation_config_eos_is_read(hf_cases, tmp_path):
    folder, _ = hf_cases("llama_gqa")
    model = load_pretrained(folder)
    assert model_eos_ids(model) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert model_eos_ids(model, tmp_path) == (2, 7)


def test_cache_logits_equal_full_forward(hf_cases):
    """Prefill of a left-padded batch, then one token at a time: every real position's logits equal the full
    forward of the right-padded batch (Gemma 3: sliding and global layers, local and global RoPE, qk-norm)."""
    model = load_pretrained(hf_cases("gemma3_text")[0])
    rows, T, prefix = [p + [21, 22, 23] for p in PROMPTS], 16, 4
    left, right = np.zeros((2, len(rows), T), np.int32), np.zeros((2, len(rows), T), np.int32)  # ids, mask
    for r, p in enumerate(rows):
        left[0, r, T - len(p):], left[1, r, T - len(p):] = p, 1
        right[0, r, :len(p)], right[1, r, :len(p)] = p, 1
    extend = nnx.jit(lambda m, i, k, c: m.extend(i, k, c))
    hidden, cache = extend(model, left[0, :, :-prefix], left[1, :, :-prefix],
                           KVCache.empty(model.config, len(rows), 32, model.rules))
    parts = [hidden]
    for t in range(T - prefix, T):
        hidden, cache = extend(model, left[0, :, t:t + 1], left[1, :, t:t + 1], cache)
        parts.append(hidden)
    logits = np.asarray(model.logits(jnp.concatenate(parts, axis=1)))[..., :PARITY_VOCAB]
    full = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, right[0], right[1]))[..., :PARITY_VOCAB]
    for r, p in enumerate(rows):
        np.testing.assert_allclose(logits[r, T - len(p):], full[r, :len(p)], atol=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_cases):
    model = load_pretrained(hf_cases("llama_gqa")[0])
    sample = dict(max_new_tokens=NEW, temperature=1.0)
    first = generate_ids(model, PROMPTS, seed=1, **sample)
    assert generate_ids(model, PROMPTS, seed=1, **sample) == first
    assert generate_ids(model, PROMPTS, seed=2, **sample) != first
    assert generate_ids(model, PROMPTS, top_k=1, **sample) == generate_ids(model, PROMPTS, max_new_tokens=NEW)


def _allowed(logits, temperature, top_k, top_p):
    """The tokens top-k then top-p sampling may pick from one row of logits (naive numpy)."""
    order = np.argsort(-logits, kind="stable")
    keep = order[:top_k] if top_k else order
    probs = np.exp((logits[keep] - logits[keep].max()) / temperature)
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    return set(keep[mass_before < top_p].tolist())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 20, 0.9), (1.0, 0, 0.05)])
def test_top_k_top_p_pick_only_the_allowed_set(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    s = Sampling(temperature, top_k, top_p)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), s)))
    allowed = [_allowed(row, temperature, top_k, top_p) for row in logits]
    assert [set(np.flatnonzero(k).tolist()) for k in kept] == allowed
    keys = jax.random.split(jax.random.key(0), 200)
    picks = np.asarray(jax.vmap(lambda k: next_token(jnp.asarray(logits), k, s, False))(keys))  # [200, 4]
    for r in range(4):
        assert set(picks[:, r].tolist()) <= allowed[r]
        assert len(allowed[r]) == 1 or len(set(picks[:, r].tolist())) > 1


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """(model, tokenizer, folder): a tiny random Llama whose vocabulary is a byte-level BPE's."""
    folder = tmp_path_factory.mktemp("tok_model")
    tok = bpe_tokenizer("bytelevel", 300, ["the quick brown fox jumps over the lazy dog " * 20])
    tok.save_pretrained(folder)
    save_tiny_model(folder, "llama", len(tok), seed=3, eos_token_id=tok.eos_token_id)
    return load_pretrained(folder), tok, folder


def test_eos_and_stop_strings_cut(tiny_with_tokenizer):
    model, tok, _ = tiny_with_tokenizer
    prompt = tok("the quick")["input_ids"]
    full = generate_ids(model, [prompt], max_new_tokens=12, eos_ids=())[0]
    assert len(full) == 12
    eos = full[4]
    assert generate_ids(model, [prompt], max_new_tokens=12, eos_ids=(eos,))[0] == full[:full.index(eos)]
    text = tok.decode(full)
    stop = text[len(tok.decode(full[:3])):len(tok.decode(full[:5]))].strip() or text[-2:]
    ids = generate_ids(model, [prompt], max_new_tokens=12, eos_ids=(), stop=[stop], tokenizer=tok)[0]
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1]) and ids == full[:len(ids)]
    [out] = generate(model, tok, ["the quick"], max_new_tokens=12, eos_ids=(), stop=[stop])
    assert out == tok.decode(full, skip_special_tokens=True).split(stop)[0]


def test_compiles_once_per_bucket(hf_cases):
    """24 prompts of lengths 1..24 in batches of 4: prompt buckets 16 and 32, cache buckets 32 and 64."""
    model = load_pretrained(hf_cases("llama_gqa")[0])
    prompts = [list(range(3, 3 + n)) for n in range(1, 25)]
    before = _prefill._cache_size(), _decode._cache_size()
    out = generate_ids(model, prompts, max_new_tokens=2, batch_size=4)
    assert all(len(o) <= 2 for o in out) and any(len(o) == 2 for o in out)
    assert _prefill._cache_size() - before[0] <= 2 and _decode._cache_size() - before[1] <= 2


def test_sharded_on_a_data_tensor_mesh_matches_transformers(hf_cases):
    folder, ref = hf_cases("mixtral")
    mesh = make_mesh(2, 1, 2, devices=jax.devices()[:4])  # batch over data, kv heads and experts over tensor
    model = load_pretrained(folder, mesh=mesh)
    with jax.set_mesh(mesh):
        assert generate_ids(model, PROMPTS, max_new_tokens=NEW) == ref


@pytest.mark.parametrize("options,match", [
    (dict(max_new_tokens=-1), r"max_new_tokens=-1: expected an integer >= 0"),
    (dict(max_new_tokens=4, top_p=0.0), r"top_p in \(0, 1\]"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p in \(0, 1\]"),
    (dict(max_new_tokens=4, stop=["\n"]), r"stop=\['\\n'\] needs a tokenizer"),
])
def test_bad_settings_are_refused(tiny_with_tokenizer, options, match):
    with pytest.raises(ValueError, match=match):
        generate_ids(tiny_with_tokenizer[0], [[5, 6]], **options)


def test_empty_prompt_is_refused(tiny_with_tokenizer):
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        generate_ids(tiny_with_tokenizer[0], [[5], []], max_new_tokens=2)


def test_cli_writes_completions(tiny_with_tokenizer, tmp_path, capsys):
    _, tok, folder = tiny_with_tokenizer
    prompts = ["the quick", "lazy dog", "over"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = ["generate", f"generate.model={folder}", f"generate.prompts={tmp_path / 'prompts.jsonl'}",
            f"run.output_dir={tmp_path / 'run'}", "generate.max_new_tokens=5", "generate.stop=[' ']"]
    assert cli.main(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "generate.jsonl").read_text().splitlines()]
    mesh = make_mesh()  # the command's default mesh (all 8 devices, fsdp): the same compiled programs
    with jax.set_mesh(mesh):
        expected = generate(load_pretrained(folder, mesh=mesh), tok, prompts, max_new_tokens=5, stop=[" "])
    assert lines == [{"prompt": p, "completion": c} for p, c in zip(prompts, expected)]


@pytest.mark.parametrize("override,match", [
    ("generate.max_new_tokens=-1", r"'generate.max_new_tokens' .*must be > 0"),
    ("generate.top_p=1.5", r"'generate.top_p' .*must be in \(0, 1\]"),
    ("generate.prompts=missing.jsonl", r"generate.prompts: missing.jsonl is not a file"),
])
def test_cli_bad_input_is_one_line(tiny_with_tokenizer, override, match, capsys):
    folder = tiny_with_tokenizer[2]
    assert cli.main(["generate", f"generate.model={folder}", "generate.prompts=missing.jsonl", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


@pytest.mark.parametrize("name,content,match", [
    ("bad.txt", b"fine\n\xff\xfe bad\n", r"generate.prompts: \S*bad.txt:2: not UTF-8 \(byte 0xff at offset 5\)$"),
    ("blank.txt", b" \n\n", r"generate.prompts: \S*blank.txt holds no prompts$"),
    ("empty.jsonl", b"", r"generate.prompts: \S*empty.jsonl holds no prompts$"),
])
def test_cli_bad_prompts_file_is_one_line(tiny_with_tokenizer, tmp_path, name, content, match, capsys):
    (tmp_path / name).write_bytes(content)
    folder = tiny_with_tokenizer[2]
    args = ["generate", f"generate.model={folder}", f"generate.prompts={tmp_path / name}",
            f"run.output_dir={tmp_path / 'run'}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "run" / "generate.jsonl").exists()
