"""The embedded default: a miniature FuseLLM run on text every Python installation carries, offline.

``python -m fusejax.embedded [CONFIG] [key=value ...]`` (CONFIG defaults to ``configs/embedded.yaml``):

1. **Corpus.** Python's documentation topics (``pydoc_data``, prose) and the standard library's own source
   (code), cut into documents of at most ``PRETRAIN["max_doc_chars"]`` characters. Every
   ``PRETRAIN["fusion_stride"]``-th document forms the fusion corpus, written as ``prose.jsonl`` /
   ``code.jsonl`` at the paths of ``corpus.inputs`` (rewritten only when their content changes, so later runs
   keep their fingerprints); the others are the sources' own data, which the target never sees (the paper's
   sources were trained on other data). The held-out documents are those of the fusion corpus with
   ``fusejax.corpus.is_heldout(doc id, run.seed, corpus.holdout_fraction)``, exactly as the prepare stage
   splits them; no model trains on them.
2. **Models.** For the target and each source a recipe in :data:`RECIPES` (keyed by the source's ``name``)
   gives an architecture (Llama-, GPT-NeoX- or MPT-style), a tokenizer kind trained here with the
   ``tokenizers`` library (``▁`` Metaspace BPE, ``Ġ`` byte-level BPE, or character level with ``▁`` for a
   space), the domains it learns from, whether it also learns from the sources' own data, and its steps: the
   target has seen only prose, the sources their domains' own data. Each model is pre-trained by fusejax
   itself (CLM only: :class:`fusejax.train.Trainer` on :class:`fusejax.data.TokenBatches`) and saved as a
   Hugging Face folder at its ``path``, with ``recipe.json`` holding the hash of recipe + texts; a folder whose
   hash matches is reused, otherwise it is rebuilt (logged).
3. **FuseLLM.** :func:`fusejax.pipeline.run` runs every stage (prepare ... eval, export) with ``run.seed``.
4. **Seeds.** FuseLLM and CLM-only (``lm_weight=1``: the same continual training without fusion, on the same
   rows) for every seed of :data:`SEEDS` (:func:`seed_runs`); a seed only changes the order of the training
   blocks, so the two runs of one seed are paired. Each run scores the held-out blocks every
   ``train.eval_every`` steps (the token-efficiency curve).
5. **Report.** ``<out>/report/``: ``results.json``, ``report.md`` (the result in words; held-out bits per byte
   per domain of the target before training, CLM-only, FuseLLM and their paired difference; how many tokens
   FuseLLM needs to reach CLM-only's final score) and PNG plots; the paths are printed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import struct
import sys
import time
from pathlib import Path

from fusejax.config import CONFIGS, Config
from fusejax.files import write_json
from fusejax.schema import SUMMARY, TENSORBOARD, RunLayout

log = logging.getLogger(__name__)

DEFAULT_CONFIG = CONFIGS / "embedded.yaml"
ASSET_VERSION = 1  # bump to rebuild every cached model
DOMAINS = ("prose", "code")

# name -> recipe. arch: ModelConfig fields; tokenizer: (kind, vocab size); mix: the domains it learns from;
# own_data: whether it also learns from the documents left out of the fusion corpus (the sources' "other data",
# as in the paper); the target learns only from the fusion corpus's training documents of its mix.
RECIPES: dict[str, dict] = {
    "target": {"arch": {"arch": "llama", "hidden_size": 64, "intermediate_size": 172, "num_layers": 2,
                        "num_heads": 4, "max_position_embeddings": 512},
               "tokenizer": ("byte_bpe", 512), "mix": ("prose",), "own_data": False, "steps": 60, "lr": 3e-3},
    "llama": {"arch": {"arch": "llama", "hidden_size": 96, "intermediate_size": 256, "num_layers": 3,
                       "num_heads": 4, "max_position_embeddings": 1024},
              "tokenizer": ("metaspace_bpe", 1024), "mix": ("prose",), "own_data": True, "steps": 150, "lr": 3e-3},
    "neox": {"arch": {"arch": "gpt_neox", "hidden_size": 96, "intermediate_size": 384, "num_layers": 3,
                      "num_heads": 4, "max_position_embeddings": 1024, "norm": "layer", "norm_bias": True,
                      "parallel_residual": True, "mlp": "plain", "activation": "gelu", "attention_bias": True,
                      "mlp_bias": True, "rotary_dim": 8, "norm_eps": 1e-5},
             "tokenizer": ("byte_bpe", 768), "mix": ("code",), "own_data": True, "steps": 150, "lr": 3e-3},
    "mpt": {"arch": {"arch": "mpt", "hidden_size": 96, "intermediate_size": 384, "num_layers": 3, "num_heads": 4,
                     "max_position_embeddings": 4096, "norm": "layer", "position": "alibi", "mlp": "plain",
                     "activation": "gelu", "tie_embeddings": True, "norm_eps": 1e-5},
            "tokenizer": ("char", 0), "mix": DOMAINS, "own_data": True, "steps": 150, "lr": 3e-3},
}
# shared by every recipe. max_chars per domain of text read, cut into documents of <= max_doc_chars; every
# fusion_stride-th document goes to the fusion corpus (corpus.inputs), the others only to sources with own_data.
PRETRAIN = {"block_size": 255, "batch_size": 8, "max_chars": 600_000, "max_doc_chars": 2_000, "fusion_stride": 4}


# --------------------------------------------------------------------------------------------------- corpus


def corpus_documents(max_chars: int, max_doc_chars: int | None = None) -> dict[str, list[str]]:
    """``{"prose": pydoc topics, "code": stdlib modules}``, sorted by name, each text cut into documents of at
    most ``max_doc_chars`` characters, at most ``max_chars`` characters per domain (the last one shortened)."""
    import pydoc_data.topics

    stdlib = Path(shutil.__file__).parent
    sources = {
        "prose": [text for _, text in sorted(pydoc_data.topics.topics.items())],
        "code": [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))],
    }
    out = {}
    for domain, texts in sources.items():
        docs, left = [], max_chars
        for text in texts:
            size = max_doc_chars or len(text)
            for start in range(0, len(text), size):
                if left > 0 and text[start:start + size].strip():
                    docs.append(text[start:start + min(size, left)])
                    left -= len(docs[-1])
        out[domain] = docs
    return out


def fusion_documents(docs: dict[str, list[str]], stride: int) -> dict[str, list[str]]:
    """Every ``stride``-th document of each domain: the fusion corpus (the others are the sources' own data)."""
    return {d: texts[::stride] for d, texts in docs.items()}


def write_corpus(paths: list[Path], docs: dict[str, list[str]], domains: tuple[str, ...] = DOMAINS) -> None:
    """Write each of ``domains``' documents as jsonl to the path of ``paths`` named ``<domain>.jsonl`` (only
    when the content differs)."""
    by_name = {p.name: p for p in paths}
    missing = [f"{d}.jsonl" for d in domains if f"{d}.jsonl" not in by_name]
    if missing or len(paths) != len(domains):
        raise ValueError(f"corpus.inputs {[str(p) for p in paths]}: the embedded default needs exactly the files "
                         f"{[f'{d}.jsonl' for d in domains]}")
    for domain in domains:
        text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs[domain])
        path = by_name[f"{domain}.jsonl"]
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def pretraining_texts(docs: dict[str, list[str]], recipe: dict, stride: int, seed: int,
                      fraction: float) -> dict[str, list[str]]:
    """``{domain: texts}`` a model of ``recipe`` may learn from: the training documents of the fusion corpus
    (never its held-out ones: ``fusejax.corpus.is_heldout`` as the prepare stage splits them), plus, with
    ``own_data``, every document left out of the fusion corpus."""
    from fusejax.corpus import is_heldout

    out = {}
    for d, texts in docs.items():
        fusion = texts[::stride]
        out[d] = [t for i, t in enumerate(fusion) if not is_heldout(f"{d}.jsonl:{i}", seed, fraction)]
        if recipe["own_data"]:
            out[d] += [t for j, t in enumerate(texts) if j % stride]
    return out


# ------------------------------------------------------------------------------------------------- tokenizers


def train_tokenizer(kind: str, vocab_size: int, texts: list[str]):
    """A fast tokenizer trained on ``texts``: ``metaspace_bpe`` (SentencePiece-style ``▁`` BPE with <unk>),
    ``byte_bpe`` (GPT-2 style ``Ġ`` byte-level BPE) or ``char`` (one token per character, ``▁`` for space)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "byte_bpe":
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        specials = {"eos_token": "<|endoftext|>"}
    elif kind == "metaspace_bpe":
        raw = Tokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
        specials = {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
    elif kind == "char":
        raw = Tokenizer(models.BPE(unk_token="<unk>"))
        raw.normalizer, raw.decoder = normalizers.Replace(" ", "▁"), decoders.Replace("▁", " ")
        trainer = trainers.BpeTrainer(vocab_size=1, special_tokens=["<unk>", "<eos>"], limit_alphabet=1000)
        specials = {"eos_token": "<eos>", "unk_token": "<unk>"}
    else:
        raise ValueError(f"tokenizer kind {kind!r}: expected 'byte_bpe', 'metaspace_bpe' or 'char'")
    raw.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **specials)


# ----------------------------------------------------------------------------------------------------- models


def _recipe_hash(recipe: dict, texts: dict[str, list[str]]) -> str:
    payload = {"recipe": recipe, "pretrain": PRETRAIN, "version": ASSET_VERSION,
               "texts": hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def pretrain_model(name: str, recipe: dict, folder: Path, texts: dict[str, list[str]], seed: int, mesh) -> None:
    """Train ``recipe``'s tokenizer (on ``texts`` of every domain) and model (CLM only, ``texts`` of its mix)
    and save both as a Hugging Face folder at ``folder`` (work files under ``folder/.work``, removed at the end)."""
    from fusejax.config import TrainConfig
    from fusejax.corpus import prepare_corpus
    from fusejax.data import TokenBatches
    from fusejax.models import ModelConfig, save_pretrained
    from fusejax.tokenizer import load_tokenizer
    from fusejax.train import Trainer, build_target

    kind, vocab = recipe["tokenizer"]
    work = folder / ".work"
    train_tokenizer(kind, vocab, [t for d in DOMAINS for t in texts[d]]).save_pretrained(work / "tokenizer")
    tok = load_tokenizer(work / "tokenizer")
    mix = [work / "corpus_text" / f"{d}.jsonl" for d in recipe["mix"]]
    write_corpus(mix, {d: texts[d] for d in recipe["mix"]}, recipe["mix"])
    prepare_corpus(mix, tok, work / "corpus", block_size=PRETRAIN["block_size"])
    data = TokenBatches(work / "corpus", tok, seq_len=PRETRAIN["block_size"] + 1)
    config = ModelConfig(**recipe["arch"], vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    tc = TrainConfig(steps=recipe["steps"], batch_size=PRETRAIN["batch_size"], seq_len=PRETRAIN["block_size"] + 1,
                     lr=recipe["lr"], warmup_ratio=0.05, lm_weight=1.0, log_every=max(1, recipe["steps"] // 5),
                     eval_every=0, checkpoint_every=0, keep_checkpoints=1)
    trainer = Trainer(build_target(tc, mesh, config=config, seed=seed), data, tc, work / "train", mesh=mesh, seed=seed)
    history = trainer.fit()
    trainer.close()
    save_pretrained(trainer.model(), folder)
    tok.save_pretrained(folder)
    write_json(folder / "pretrain_history.json", history)
    shutil.rmtree(work)
    log.info("pre-trained %s (%s, %d steps) into %s", name, recipe["arch"]["arch"], recipe["steps"], folder)


def build_assets(cfg: Config, recipes: dict[str, dict] | None = None) -> dict[str, str]:
    """Write the fusion corpus and build (or reuse) the target and every source at their config paths.

    ``recipes``: name -> recipe (default :data:`RECIPES`); ``"target"`` and every source name need one.
    Returns ``{name: "reused" | "built"}``.
    """
    from fusejax.sharding import make_mesh

    recipes = RECIPES if recipes is None else recipes
    models = [("target", cfg.target.path)] + [(s.name, s.path) for s in cfg.sources]
    unknown = [name for name, _ in models if name not in recipes]
    if unknown:
        raise ValueError(f"embedded: no recipe for {unknown}; recipes exist for {sorted(recipes)}")
    docs = corpus_documents(PRETRAIN["max_chars"], PRETRAIN.get("max_doc_chars"))
    write_corpus([Path(p) for p in cfg.corpus.inputs], fusion_documents(docs, PRETRAIN["fusion_stride"]))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    out = {}
    for name, path in models:
        folder = Path(path)
        texts = pretraining_texts(docs, recipes[name], PRETRAIN["fusion_stride"], cfg.run.seed,
                                  cfg.corpus.holdout_fraction)
        key = _recipe_hash(recipes[name], texts)
        stamp = folder / "recipe.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("hash") == key:
            out[name] = "reused"
            continue
        if folder.exists():
            log.warning("embedded: %s was built from another recipe or corpus; rebuilding it", folder)
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        pretrain_model(name, recipes[name], folder, texts, cfg.run.seed, mesh)
        write_json(stamp, {"hash": key, "recipe": recipes[name], "seconds": time.perf_counter() - t0,
                           "chars": {d: sum(map(len, texts[d])) for d in recipes[name]["mix"]}})
        out[name] = "built"
        print(f"[embedded] {name}: pre-trained in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ seeds


def seed_run_dir(cfg: Config, variant: str, seed: int) -> Path:
    """The run folder of ``variant`` ("clm_only" or "fusellm") with data-order ``seed``: ``<out>`` for the
    pipeline's own FuseLLM run (``run.seed``), else ``<out>/seeds/<variant>/seed<k>``."""
    root = RunLayout.of(cfg).root
    return root if variant == "fusellm" and seed == cfg.run.seed else root / "seeds" / variant / f"seed{seed}"


def seed_runs(cfg: Config, seeds: list[int]) -> dict:
    """FuseLLM and CLM-only (``lm_weight=1``: the same continual training without fusion, same aligned rows)
    for every seed of ``seeds`` (the seed changes only the order of the training blocks, so two runs of one
    seed are paired). The FuseLLM run of ``run.seed`` is the pipeline's own (``<out>/train``, ``<out>/eval``);
    every other run trains in its :func:`seed_run_dir` on links to ``<out>``'s corpus and aligned store
    (:func:`fusejax.study.train_and_eval`). Returns ``{"target": eval result, "runs": {variant: {seed: {"eval":
    eval result, "curve": [[step, bits/byte], ...]}}}}``; the curve holds the ``train.eval_every`` evaluations
    and the final one (the eval stage's held-out blocks, ``eval.batch_size``, ``eval.max_batches``)."""
    from fusejax.config import replace
    from fusejax.study import train_and_eval

    layout = RunLayout.of(cfg)
    variants = {"clm_only": replace(cfg, "train.lm_weight", 1.0), "fusellm": cfg}
    out: dict = {"target": None, "runs": {v: {} for v in variants}}
    for seed in seeds:
        for variant, vcfg in variants.items():
            run_dir = seed_run_dir(cfg, variant, seed)
            if run_dir == layout.root:
                ev = json.loads((layout.eval / "results.json").read_text())
            else:
                ev = train_and_eval(vcfg, layout.root, run_dir, seed)
            train_dir = RunLayout.at(run_dir).train
            steps = json.loads((train_dir / SUMMARY).read_text())["steps"]
            evals = read_scalars(train_dir / TENSORBOARD).get("eval/bits_per_byte", [])
            curve = [[s, v] for s, v in evals if s < steps]
            out["target"] = ev["target"]
            final = [steps, ev["trained"]["bits_per_byte"]]
            out["runs"][variant][str(seed)] = {"eval": ev["trained"], "curve": curve + [final]}
    return out


# --------------------------------------------------------------------------------------------- toy tasks

TASKS = {"embedded_real_continuation": "multiple_choice", "embedded_code_completion": "generate_until"}
TASK_METRIC = {"multiple_choice": "acc", "generate_until": "exact_match"}  # output type -> metric (higher: better)
TASK_YAML = {
    "multiple_choice": "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                       "doc_to_target: \"{{label}}\"\ntarget_delimiter: \"\"\n",
    "generate_until": "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
                      "target_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n"
                      "  do_sample: false\n",
}


def heldout_documents(cfg: Config) -> dict[str, list[str]]:
    """``{domain: texts}`` of the held-out documents of ``corpus.inputs`` (as the prepare stage splits them)."""
    from fusejax.corpus import is_heldout

    out = {}
    for path in map(Path, cfg.corpus.inputs):
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
        out[path.stem] = [t for i, t in enumerate(texts)
                          if is_heldout(f"{path.name}:{i}", cfg.run.seed, cfg.corpus.holdout_fraction)]
    return out


def write_toy_tasks(cfg: Config, folder: Path, *, context: int = 240, continuation: int = 80, choices: int = 4,
                    per_document: int = 2) -> list[Path]:
    """Two toy downstream tasks from the held-out documents, each a JSONL file and an lm-evaluation-harness
    task YAML (``dataset_path: json``) in ``folder``; returns the YAML paths.

    * ``embedded_real_continuation`` (multiple choice, ``acc``): ``context`` characters of a held-out document;
      the choices are its real next ``continuation`` characters and ``choices - 1`` continuations of other
      held-out documents of its domain (fixed random order, ``label`` = the real one). A document gives one
      question per ``context + continuation`` characters from its start, at most ``per_document``.
    * ``embedded_code_completion`` (``generate_until`` a newline, ``exact_match``): the text of a held-out code
      document up to the last space of a line (at most ``context`` characters before the line, cut at a line
      start); the target is the rest of the line (its last word). Three lines per document: the ones at 1/4,
      1/2 and 3/4 of its lines with at least 8 non-blank characters, if they hold a space after the indentation.
    """
    import random

    docs = heldout_documents(cfg)
    rng = random.Random(cfg.run.seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {task: [] for task in TASKS}
    size = context + continuation
    for domain in DOMAINS:
        windows = [(i, text[a:a + context], text[a + context:a + size])
                   for i, text in enumerate(docs.get(domain, []))
                   for a in range(0, min(len(text) - size + 1, per_document * size), size)]
        for i, prefix, real in windows:
            others = [w[2] for w in windows if w[0] != i]
            options = [real] + rng.sample(others, min(choices - 1, len(others)))
            order = list(range(len(options)))
            rng.shuffle(order)
            rows["embedded_real_continuation"].append(
                {"domain": domain, "context": prefix, "choices": [options[k] for k in order], "label": order.index(0)})
    for text in docs.get("code", []):
        lines = text.splitlines(keepends=True)
        starts = [sum(map(len, lines[:k])) for k in range(len(lines))]
        good = [k for k in range(1, len(lines)) if len(lines[k].strip()) >= 8]
        for k in sorted({good[len(good) * q // 4] for q in (1, 2, 3)} if len(good) >= 4 else set()):
            line = lines[k].rstrip("\n")
            cut = line.rfind(" ", len(line) - len(line.lstrip()) + 1)
            prompt = text[:starts[k]]
            prompt = prompt[prompt.find("\n", max(0, len(prompt) - context - 1)) + 1:]
            if prompt and cut > 0 and line[cut:].strip():
                rows["embedded_code_completion"].append({"prompt": prompt + line[:cut], "target": line[cut:]})
    paths = []
    for task, items in rows.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
        yaml_path = folder / f"{task}.yaml"
        yaml_path.write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                             f"{json.dumps(str(data.resolve()))}\ntest_split: test\n" + TASK_YAML[TASKS[task]]
                             + f"metric_list:\n  - metric: {TASK_METRIC[TASKS[task]]}\n    aggregation: mean\n"
                             "    higher_is_better: true\n")
        paths.append(yaml_path)
    return paths


def score_toy_tasks(cfg: Config, tasks: list[Path], seeds: list[int]) -> dict:
    """The toy tasks ``tasks`` (task YAMLs in one folder, :func:`write_toy_tasks`) scored through the lm-eval
    backend (:func:`fusejax.harness.run_tasks`: greedy, ``eval.batch_size``, ``run.seed``) on the target
    before training and on the final checkpoint of CLM-only and FuseLLM for every seed of ``seeds``
    (:func:`seed_run_dir`), one model in memory at a time; the compiled programs are shared (same shapes).

    Returns ``{"metric": {task: metric}, "examples": {task: count}, "target": {task: score}, "runs": {variant:
    {seed: {task: score}}}, "seconds", "cpu_seconds"}`` (the time the scoring took), or ``{"skipped": reason}``
    when lm-eval is not installed (it is the ``eval`` extra).
    """
    from fusejax.checkpoint import load_trained
    from fusejax.evaluation import harness_module
    from fusejax.models import load_pretrained
    from fusejax.tokenizer import load_tokenizer

    try:
        harness = harness_module()
    except ImportError as e:
        return {"skipped": str(e)}
    t0, cpu0 = time.perf_counter(), time.process_time()
    names = [p.stem for p in tasks]
    manager = harness.task_manager(names, str(tasks[0].parent))
    tok = load_tokenizer(cfg.target.tokenizer_path)

    def score(model) -> dict[str, float]:
        res = harness.run_tasks(model, tok, names, manager, batch_size=cfg.eval.batch_size, seed=cfg.run.seed)
        return {t: res["results"][t][f"{TASK_METRIC[TASKS[t]]},none"] for t in names}

    out = {"metric": {t: TASK_METRIC[TASKS[t]] for t in names},
           "examples": {p.stem: len(p.with_suffix(".jsonl").read_text().splitlines()) for p in tasks},
           "target": score(load_pretrained(cfg.target.path)), "runs": {}}
    for variant in ("clm_only", "fusellm"):
        for seed in seeds:
            model = load_trained(RunLayout.at(seed_run_dir(cfg, variant, seed)).train)[0]
            out["runs"].setdefault(variant, {})[str(seed)] = score(model)
    return {**out, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


# ------------------------------------------------------------------------------------------------- report


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in ``tb_dir``: ``{tag: [(step, value), ...]}`` sorted by step."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return {tag: sorted(points) for tag, points in out.items()}


def tokens_to_reach(curve: list[list[float]], score: float) -> float | None:
    """First step at which ``curve`` ([[step, bits/byte], ...] by step) is at or below ``score``, linearly
    interpolated between evaluations; None if it never is."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= score:
            return s0 + (s1 - s0) * (v0 - score) / (v0 - v1) if v0 > score else s0
    return curve[0][0] if curve and curve[0][1] <= score else None


def summarize_results(results: dict) -> dict:
    """The report's numbers from ``results.json``: per metric (``all`` and each domain) the mean ± std over
    seeds of CLM-only and FuseLLM, the paired delta FuseLLM - CLM-only (and in % of CLM-only), how many seeds
    FuseLLM wins, and the tokens FuseLLM needs to reach CLM-only's final overall score (per seed, paired)."""
    from fusejax.study import summarize

    runs, tokens_per_step = results["runs"], results["tokens_per_step"]
    seeds = sorted(set(runs["clm_only"]) & set(runs["fusellm"]), key=int)

    def value(variant, seed, metric):
        ev = runs[variant][seed]["eval"]
        return ev["bits_per_byte"] if metric == "all" else ev["domains"][metric]["bits_per_byte"]

    out: dict = {"seeds": [int(s) for s in seeds], "metrics": {}}
    for metric in ["all", *sorted(results["target"]["domains"])]:
        clm = [value("clm_only", s, metric) for s in seeds]
        deltas = [value("fusellm", s, metric) - c for s, c in zip(seeds, clm)]
        target = results["target"]["bits_per_byte" if metric == "all" else "domains"]
        out["metrics"][metric] = {
            "target": target if metric == "all" else target[metric]["bits_per_byte"],
            "clm_only": dataclasses.asdict(summarize(clm)),
            "fusellm": dataclasses.asdict(summarize([value("fusellm", s, metric) for s in seeds])),
            "delta": dataclasses.asdict(summarize(deltas)), "deltas": deltas,
            "delta_percent": 100 * sum(deltas) / sum(clm), "wins": sum(d < 0 for d in deltas)}
    reach = []
    for s in seeds:
        clm_curve = runs["clm_only"][s]["curve"]
        step = tokens_to_reach(runs["fusellm"][s]["curve"], clm_curve[-1][1])
        reach.append(None if step is None else {"tokens": step * tokens_per_step,
                                                "ratio": clm_curve[-1][0] / step if step else math.inf})
    reached = [r for r in reach if r is not None]
    out["efficiency"] = {"per_seed": reach, "clm_tokens": runs["clm_only"][seeds[0]]["curve"][-1][0] * tokens_per_step,
                         "tokens": dataclasses.asdict(summarize([r["tokens"] for r in reached])) if reached else None,
                         "ratio": dataclasses.asdict(summarize([r["ratio"] for r in reached])) if reached else None}
    toy = results.get("toy_tasks", {})
    out["tasks"] = {}
    for task, metric in toy.get("metric", {}).items():
        clm = [toy["runs"]["clm_only"][s][task] for s in seeds]
        deltas = [toy["runs"]["fusellm"][s][task] - c for s, c in zip(seeds, clm)]
        out["tasks"][task] = {
            "metric": metric, "examples": toy["examples"][task], "target": toy["target"][task],
            "clm_only": dataclasses.asdict(summarize(clm)),
            "fusellm": dataclasses.asdict(summarize([toy["runs"]["fusellm"][s][task] for s in seeds])),
            "delta": dataclasses.asdict(summarize(deltas)), "deltas": deltas, "wins": sum(d > 0 for d in deltas)}
    return out


def report_paragraph(summary: dict) -> str:
    """The result in words, with its numbers (Markdown)."""
    m, eff, n = summary["metrics"], summary["efficiency"], len(summary["seeds"])

    def gain(metric):
        d = m[metric]
        return (f"{d['delta']['mean']:+.4f} ± {d['delta']['std']:.4f} bits/byte ({d['delta_percent']:+.2f}%, "
                f"FuseLLM better on {d['wins']} of {n} seeds)")

    domains = [k for k in m if k != "all"]
    text = (f"Over {n} paired data-order seeds, FuseLLM reaches {m['all']['fusellm']['mean']:.4f} held-out bits per "
            f"byte against {m['all']['clm_only']['mean']:.4f} for CLM-only continual training on the same tokens "
            f"(target before training: {m['all']['target']:.4f}): a paired difference of {gain('all')}. Per domain: "
            + "; ".join(f"{d} {gain(d)}" for d in domains) + ". ")
    if eff["ratio"] is None:
        return text + "FuseLLM does not reach CLM-only's final score within the run."
    missing = n - eff["ratio"]["n"]
    return text + (f"FuseLLM reaches CLM-only's final overall score after {eff['tokens']['mean'] / 1e3:.1f}k ± "
                   f"{eff['tokens']['std'] / 1e3:.1f}k of the {eff['clm_tokens'] / 1e3:.0f}k training tokens, "
                   f"{eff['ratio']['mean']:.2f} ± {eff['ratio']['std']:.2f}x fewer (the paper's Figure 2 measure)"
                   + (f"; on {missing} seed(s) it never does." if missing else "."))


def tasks_paragraph(summary: dict) -> str:
    """The toy tasks' paired differences in words: whether each exceeds the seed spread (Markdown)."""
    parts = []
    for task, d in summary["tasks"].items():
        delta, n = d["delta"], d["delta"]["n"]
        if not any(d["deltas"]):
            verdict = "the same score on every seed"
        elif n < 2:
            verdict = "one seed, so no seed spread to compare with"
        elif abs(delta["mean"]) > 2 * delta["std"]:
            verdict = "more than twice the paired seed spread"
        else:
            verdict = "within twice the paired seed spread, so not a measured difference"
        parts.append(f"`{task}` ({d['metric']} over {d['examples']} examples, one example = "
                     f"{1 / max(d['examples'], 1):.3f}) {delta['mean']:+.3f} ± {delta['std']:.3f}: {verdict}")
    return "On the toy tasks, FuseLLM − CLM-only is " + "; ".join(parts) + "."


def write_report(out: Path, results: dict) -> list[Path]:
    """``report/results.json``, ``report/report.md`` (the result in words, a table, the plots) and the PNG plots
    ``gain.png`` (paired differences to CLM-only) and ``token_efficiency.png`` under ``out/report``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", results)
    summary = summarize_results(results)
    metrics = list(summary["metrics"])

    def cell(stat):
        return f"{stat['mean']:.4f} ± {stat['std']:.4f}"

    lines = ["# Embedded default: FuseLLM vs CLM-only", "", report_paragraph(summary), "",
             "Held-out bits per byte (lower is better), mean ± sample std over seeds; Δ: FuseLLM − CLM-only of the "
             "same seed (same training data order).", "",
             "| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    rows = {"target before training": [f"{summary['metrics'][k]['target']:.4f}" for k in metrics]}
    for key, name in (("clm_only", "CLM-only"), ("fusellm", "FuseLLM"), ("delta", "Δ (paired)")):
        rows[name] = [cell(summary["metrics"][k][key]) for k in metrics]
    rows["Δ % of CLM-only"] = [f"{summary['metrics'][k]['delta_percent']:+.2f}%" for k in metrics]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    held = results["target"]
    lines += ["", f"Held-out: {held['blocks']} blocks, {held['bytes']} bytes. Seeds: {summary['seeds']}. "
              f"Wall time: {results['seconds']:.0f} s.", "", "![paired gain](gain.png)", "",
              "![token efficiency](token_efficiency.png)", ""]
    toy = results.get("toy_tasks")
    if toy:
        lines += ["## Toy downstream tasks", "", "lm-evaluation-harness tasks over the held-out documents, run "
                  "through fusejax's lm-eval backend on the final models (task YAMLs: `--include_path "
                  f"{Path(toy['paths'][0]).parent}`; higher is better).", ""]
    if toy and "skipped" in toy:
        lines += [f"Skipped: {toy['skipped']}.", ""]
    elif toy:
        lines += [tasks_paragraph(summary), "",
                  "| task (metric, examples) | target before training | CLM-only | FuseLLM | Δ (paired) | "
                  "FuseLLM better |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {task} ({d['metric']}, {d['examples']}) | {d['target']:.4f} | {cell(d['clm_only'])} | "
                  f"{cell(d['fusellm'])} | {cell(d['delta'])} | {d['wins']} of {d['delta']['n']} seeds |"
                  for task, d in summary["tasks"].items()]
        lines += ["", f"Scoring took {toy['seconds']:.0f} s ({toy['cpu_seconds']:.0f} s of CPU time).", ""]
    (folder / "report.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, k in enumerate(metrics):
        d = summary["metrics"][k]
        ax.bar(i, d["delta"]["mean"], 0.6, yerr=d["delta"]["std"], capsize=4, color="tab:blue", alpha=0.7)
        ax.plot([i] * len(d["deltas"]), d["deltas"], "k.", ms=6)
        ax.annotate(f"{d['delta_percent']:+.2f}%", (i, 0), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("FuseLLM − CLM-only (bits/byte)")
    ax.set_title("Held-out bits per byte, paired per seed (below 0: FuseLLM better)\n"
                 "bars: mean ± std over seeds, dots: seeds, labels: % of CLM-only", fontsize=10)
    lo = min(min(d["deltas"]) for d in summary["metrics"].values())
    ax.set_ylim(min(lo * 1.15, -1e-3), abs(lo) * 0.25)
    fig.tight_layout()
    fig.savefig(folder / "gain.png", dpi=120)
    plt.close(fig)

    seeds = [str(s) for s in summary["seeds"]]
    tps, start = results["tokens_per_step"], [0, results["target"]["bits_per_byte"]]
    curves = {v: np.array([[start] + results["runs"][v][s]["curve"] for s in seeds]) for v in ("clm_only", "fusellm")}
    tokens = curves["clm_only"][0, :, 0] * tps / 1e3
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    for v, name, color in (("clm_only", "CLM-only", "tab:gray"), ("fusellm", "FuseLLM", "tab:blue")):
        values = curves[v][:, :, 1]
        top.plot(tokens, values.mean(0), "o-", color=color, ms=3, label=f"{name} (mean, band: min..max over seeds)")
        top.fill_between(tokens, values.min(0), values.max(0), color=color, alpha=0.25)
    final = curves["clm_only"][:, -1, 1].mean()
    top.axhline(final, color="tab:gray", ls="--", lw=0.8, label="CLM-only final score")
    eff = summary["efficiency"]
    if eff["tokens"] is not None:
        top.axvline(eff["tokens"]["mean"] / 1e3, color="tab:blue", ls=":", lw=1,
                    label=f"FuseLLM reaches it: {eff['ratio']['mean']:.2f}x fewer tokens")
    late = curves["clm_only"][:, len(tokens) // 4:, 1]
    top.set_ylim(min(c[:, :, 1].min() for c in curves.values()) - 0.02, late.max() + 0.05)
    top.set_ylabel("held-out bits per byte")
    top.legend(fontsize=8, loc="upper right")
    delta = curves["fusellm"][:, :, 1] - curves["clm_only"][:, :, 1]
    bottom.plot(tokens, delta.mean(0), "o-", color="tab:blue", ms=3)
    bottom.fill_between(tokens, delta.mean(0) - delta.std(0, ddof=1 if len(seeds) > 1 else 0),
                        delta.mean(0) + delta.std(0, ddof=1 if len(seeds) > 1 else 0), color="tab:blue", alpha=0.25)
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylabel("FuseLLM − CLM-only\n(mean ± std over seeds)")
    bottom.set_xlabel("training tokens (thousands)")
    fig.tight_layout()
    fig.savefig(folder / "token_efficiency.png", dpi=120)
    plt.close(fig)
    return [folder / n for n in ("results.json", "report.md", "gain.png", "token_efficiency.png")]


# --------------------------------------------------------------------------------------------------- main


SEEDS = (0, 1, 2)  # data-order seeds of FuseLLM and CLM-only (paired: same seed, same order)


def main(config: str | Path | None = None, overrides: list[str] | None = None, *, recipes: dict | None = None,
         stop_after: str | None = None, seeds: tuple[int, ...] = SEEDS) -> int:
    """Build the assets, run the pipeline, FuseLLM and CLM-only for every seed and the report (see the module
    docstring).

    ``stop_after``: the last pipeline stage to run (tests); the seed runs and report need the whole pipeline.
    """
    from fusejax import pipeline
    from fusejax.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(config or DEFAULT_CONFIG, overrides or [])
    layout = RunLayout.of(cfg)
    assets = build_assets(cfg, recipes)
    stages = pipeline.run(cfg, stop_after=stop_after)
    if stop_after is not None:
        return 0
    tasks = write_toy_tasks(cfg, layout.root / "tasks")
    results = {"assets": assets, "stages": stages, "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
               **seed_runs(cfg, list(seeds))}
    results["toy_tasks"] = {"paths": [str(p) for p in tasks], **score_toy_tasks(cfg, tasks, list(seeds))}
    results["seconds"] = time.perf_counter() - t0
    paths = write_report(layout.root, results)
    print((layout.root / "report" / "report.md").read_text())
    for p in paths:
        print(f"report: {p}")
    return 0


def demo(output_dir: str | Path = "runs/embedded") -> int:
    """``fusejax demo`` (``make demo``): the embedded default with its outputs in ``output_dir``."""
    return main(None, [f"run.output_dir={output_dir}"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fusejax").setLevel(logging.INFO)
    args = sys.argv[1:]
    first = args[0] if args and "=" not in args[0] else None
    sys.exit(main(first, args[1:] if first else args))
