"""The lm-eval backend (fusejax/harness.py) against lm-eval's own Hugging Face backend (PyTorch) on a tiny random
Llama saved by transformers, over the local tasks of tests/data/lmeval (multiple choice, rolling
log-likelihood, greedy generation); `python -m fusejax.harness` and `fusejax eval CONFIG eval.tasks=[...]`."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pydoc_data.topics
import pytest
import torch
import transformers
import yaml
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tokenizers import processors

import fusejax
from fusejax.checkpoint import checkpoint_manager, load_trained, save
from fusejax.cli import main
from fusejax.corpus import prepare_corpus
from fusejax.data import bucket
from fusejax.harness import MIN_BUCKET, FusejaxLM, task_manager
from fusejax.models import load_pretrained
from tiny import bpe_tokenizer, save_random_hf_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "lmeval"  # task YAMLs; their data_files are relative to this folder
CONTEXT = 64  # max_position_embeddings: lm-eval's context length on both backends
TOL = 1e-4
NO_DEFAULT_TASKS = (None, None, False, None)  # TaskManager.__init__ defaults without lm-eval's 14k own tasks


def _texts():
    rows = [json.loads(line) for name in ("choice", "text", "gen") for line in open(DATA / f"{name}.jsonl")]
    docs = [r.get("text") or r.get("prompt") or r.get("question") + " " + " ".join(r["choices"]) for r in rows]
    return docs + [t[:600] for _, t in sorted(pydoc_data.topics.topics.items()) if len(t) > 600][:6]


@pytest.fixture(scope="module", autouse=True)
def in_data_folder():
    """The task YAMLs name their JSONL files relative to the working directory."""
    old = os.getcwd()
    os.chdir(DATA)
    yield
    os.chdir(old)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random Llama saved by transformers and a byte-level BPE that prepends <s>, in one folder."""
    folder = tmp_path_factory.mktemp("lmeval") / "model"
    tok = bpe_tokenizer("bytelevel", 300, _texts())
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save_pretrained(folder)
    save_random_hf_model(folder, transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=bos, eos_token_id=tok.eos_token_id))
    return folder


@pytest.fixture(scope="module")
def lms(folder):
    """(ours, lm-eval's HF backend) on the same folder, float32 on CPU, different batch sizes."""
    ours = FusejaxLM(path=str(folder), batch_size=3)
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4)
    assert hf.max_length == ours.max_length == CONTEXT
    text = (DATA / "text.jsonl").read_text()
    assert ours.tok_encode(text) == hf.tok_encode(text) and ours.tok_encode(text)[0] == ours.prefix_token_id
    return ours, hf


def _evaluate(lm, tasks):
    manager = TaskManager(include_path=str(DATA), include_defaults=False)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0,
                           random_seed=0, numpy_random_seed=0, torch_random_seed=None,
                           fewshot_random_seed=0)  # as `fusejax eval` with run.seed=0 (the few-shot draw)


@pytest.fixture(scope="module")
def scored(lms):
    """lm-eval's results of the choice and perplexity tasks on (ours, HF)."""
    return tuple(_evaluate(lm, ["fj_choice", "fj_ppl"]) for lm in lms)


def _responses(results, task):
    """Per document (in order), the model's responses to its requests."""
    return [[r[0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_equal_the_hugging_face_backend(scored):
    ours, hf = scored
    for task in ("fj_choice", "fj_ppl"):
        got, want = _responses(ours, task), _responses(hf, task)
        assert len(got) == len(want) > 0
        for doc_got, doc_ref in zip(got, want):
            if task == "fj_choice":  # (log-likelihood, is_greedy) per choice
                assert [g for _, g in doc_got] == [g for _, g in doc_ref]
                doc_got, doc_ref = [ll for ll, _ in doc_got], [ll for ll, _ in doc_ref]
            np.testing.assert_allclose(doc_got, doc_ref, rtol=0, atol=TOL)
        for metric, value in hf["results"][task].items():
            if isinstance(value, float) and not np.isnan(value):
                assert ours["results"][task][metric] == pytest.approx(value, rel=TOL), metric


def test_rolling_windows_cover_long_texts(lms):
    ours, _ = lms
    n = len(ours.tok_encode(json.loads((DATA / "text.jsonl").read_text().splitlines()[0])["text"]))
    assert n > 2 * CONTEXT, "the perplexity task needs a text of several windows"


def test_is_greedy_flags_and_padding_buckets(lms):
    ours, hf = lms
    context = ours.tok_encode("Question: What is two plus two?\nAnswer:")
    greedy = []
    for _ in range(3):  # the model's own greedy continuation, one token at a time
        with torch.no_grad():
            greedy.append(int(hf.model(torch.tensor([context + greedy])).logits[0, -1].argmax()))
    other = (greedy[-1] + 1) % 300
    requests = [(None, context, greedy), (None, context, greedy[:2] + [other]), (None, context, [other]),
                (None, context[:2], context[2:])]
    got, ref = ours._loglikelihood_tokens(requests), hf._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [g for _, g in ref] and [g for _, g in got][:3] == [True, False, False]
    np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in ref], rtol=0, atol=TOL)
    assert [bucket(n, MIN_BUCKET) for n in (1, 16, 17, 100, 256, 257)] == [16, 16, 32, 128, 256, 512]


def test_generate_until_equals_the_hugging_face_backend_under_greedy_decoding(lms):
    pytest.importorskip("fusejax.generation", reason="fusejax.generation (branch gen) is not merged yet")
    got, ref = (_evaluate(lm, ["fj_gen"]) for lm in lms)
    answers = _responses(got, "fj_gen")
    assert answers == _responses(ref, "fj_gen") and any(a[0] for a in answers)


def test_registered_and_the_command_line(folder, scored, tmp_path):
    assert get_model("fusejax") is FusejaxLM
    # `python -m fusejax.harness` is lm_eval's command line with the model registered; lm-eval's own task index
    # (14k files, ~35 s on 2 cores) is left out here, the local tasks suffice
    code = (f"import lm_eval.tasks as t; t.TaskManager.__init__.__defaults__ = {NO_DEFAULT_TASKS!r}; "
            "import runpy; runpy.run_module('fusejax.harness', run_name='__main__', alter_sys=True)")
    args = ["--model", "fusejax", "--model_args", f"path={folder}", "--tasks", "fj_choice", "--include_path",
            str(DATA), "--batch_size", "3", "--seed", "0", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["results"]["fj_choice"]["acc,none"] == \
        scored[1]["results"]["fj_choice"]["acc,none"]


@pytest.fixture(scope="module")
def run_config(folder, tmp_path_factory):
    """A run with a held-out corpus and a training checkpoint at step 0 (the target's own weights)."""
    root = tmp_path_factory.mktemp("run")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prepare_corpus(root / "docs.jsonl", tok, root / "out" / "corpus", block_size=31, holdout_fraction=0.5)
    model = load_pretrained(folder)  # saved as training saves a checkpoint, without building a trainer
    manager = checkpoint_manager(root / "out" / "train" / "checkpoints")
    params = nnx.to_pure_dict(nnx.state(model))
    save(manager, 0, params, {"count": np.zeros((), np.int32)}, {
        "step": 0, "data_position": 0, "seed": 0, "model": dataclasses.asdict(model.config),
        "config": {"target": {"path": str(folder)}}})
    manager.wait_until_finished()
    manager.close()
    config = {"run": {"output_dir": str(root / "out")}, "target": {"path": str(folder)},
              "train": {"seq_len": 32}, "eval": {"batch_size": 3, "include_path": str(DATA)}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root / "run.yaml", root / "out" / "eval"


def test_fusejax_eval_runs_tasks_on_the_trained_checkpoint(run_config, scored, capsys):
    path, out = run_config
    assert main(["eval", str(path), "eval.tasks=[fj_choice]"]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert json.loads((out / "results.json").read_text()).keys() == tasks.keys() == {"target", "trained"}
    ref = scored[1]["results"]["fj_choice"]
    for model in ("target", "trained"):  # the step-0 checkpoint holds the target's weights
        assert tasks[model]["results"]["fj_choice"]["acc,none"] == ref["acc,none"]
        assert tasks[model]["results"]["fj_choice"]["acc_norm,none"] == ref["acc_norm,none"]
        assert tasks[model]["n-shot"]["fj_choice"] == 1


def test_a_checkpoint_trained_with_cudnn_runs_here(folder, tmp_path):
    """A run trained on a GPU with attention_impl=cudnn (bfloat16 compute) loads and runs on CPU: the loaded
    model takes this machine's attention path, with the same logits as the model it was saved from."""
    model = load_pretrained(folder)
    manager = checkpoint_manager(tmp_path / "checkpoints")
    trained_on_gpu = dataclasses.replace(model.config, dtype="bfloat16", attention_impl="cudnn")
    save(manager, 3, nnx.to_pure_dict(nnx.state(model)), {"count": np.zeros((), np.int32)}, {
        "step": 3, "data_position": 0, "seed": 0, "model": dataclasses.asdict(trained_on_gpu), "config": {}})
    manager.wait_until_finished()
    manager.close()
    loaded, step, _ = load_trained(tmp_path)
    assert step == 3 and loaded.config == trained_on_gpu.replace(attention_impl="auto")
    ids = np.arange(2 * 9, dtype=np.int32).reshape(2, 9) % model.config.vocab_size
    reference = load_pretrained(folder, compute_dtype="bfloat16")(ids)
    np.testing.assert_array_equal(np.asarray(loaded(ids), np.float32), np.asarray(reference, np.float32))


def test_path_may_be_a_training_run(run_config, folder):
    lm = FusejaxLM(path=str(run_config[1].parent / "train"))
    assert lm.tokenizer.name_or_path == str(folder) and lm.model.config == load_trained(
        run_config[1].parent / "train")[0].config


def test_bad_input(run_config, monkeypatch, capsys):
    path, out = run_config
    monkeypatch.setattr(TaskManager.__init__, "__defaults__", NO_DEFAULT_TASKS)
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['fj_nope'\]"):
        task_manager(["fj_choice", "fj_nope"], str(DATA))
    with pytest.raises(FileNotFoundError, match="eval.include_path=nowhere is not a folder"):
        task_manager(["fj_choice"], "nowhere")
    with pytest.raises(ValueError, match="either path=FOLDER or model="):
        FusejaxLM()
    lm = FusejaxLM(path=str(path.parent / "out" / "train"), max_length=8)
    with pytest.raises(ValueError, match="continuation of 9 tokens is longer than the context max_length=8"):
        lm._loglikelihood_tokens([(None, [1], list(range(3, 12)))])
    (out / "tasks.json").unlink(missing_ok=True)
    assert main(["eval", str(path), "eval.tasks=[fj_nope]"]) == 2
    assert "unknown lm-eval task(s) ['fj_nope']" in capsys.readouterr().err and not (out / "tasks.json").exists()
    # without lm-eval installed
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "fusejax.harness")
    monkeypatch.delattr(fusejax, "harness")
    assert main(["eval", str(path), "eval.tasks=[fj_choice]"]) == 2
    assert "pip install fusejax[eval]" in capsys.readouterr().err
