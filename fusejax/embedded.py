"""The embedded default: a miniature FuseLLM run on text every Python installation carries, offline.

``python -m fusejax.embedded [CONFIG] [key=value ...]`` (CONFIG defaults to ``configs/embedded.yaml``):

1. **Corpus.** Python's documentation topics (``pydoc_data``, prose) and the standard library's own source
   (code) are written as ``prose.jsonl`` / ``code.jsonl`` at the paths of ``corpus.inputs`` (rewritten only
   when their content changes, so later runs keep their fingerprints). The held-out documents are those of
   ``fusejax.corpus.is_heldout(doc id, run.seed, corpus.holdout_fraction)``, exactly as the prepare stage
   splits them; nothing below trains on them.
2. **Models.** For the target and each source a recipe in :data:`RECIPES` (keyed by the source's ``name``)
   gives an architecture (Llama-, GPT-NeoX- or MPT-style), a tokenizer kind trained here with the
   ``tokenizers`` library (``▁`` Metaspace BPE, ``Ġ`` byte-level BPE, or character level with ``▁`` for a
   space), the corpus mix it learns from and its steps. Each model is pre-trained by fusejax itself (CLM only:
   :class:`fusejax.train.Trainer` on :class:`fusejax.data.TokenBatches`) and saved as a Hugging Face folder at
   its ``path``, with ``recipe.json`` holding the hash of recipe + corpus; a folder whose hash matches is
   reused, otherwise it is rebuilt (logged).
3. **FuseLLM.** :func:`fusejax.pipeline.run` runs every stage (prepare ... eval, export).
4. **CLM-only baseline.** The same continual training of the target without fusion (``lm_weight=1``) on the
   same training blocks, into ``<out>/baseline_clm`` (resumable through its checkpoints).
5. **Report.** ``<out>/report/``: ``results.json``, ``report.md`` (held-out bits per byte per domain of the
   target before training, CLM-only and FuseLLM) and PNG plots; the paths are printed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import struct
import sys
import time
from pathlib import Path

from fusejax.config import Config
from fusejax.files import write_json
from fusejax.schema import TENSORBOARD, RunLayout

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml"
ASSET_VERSION = 1  # bump to rebuild every cached model
DOMAINS = ("prose", "code")
BASELINE = "baseline_clm"  # folder of the CLM-only baseline run, beside the pipeline's folders

# name -> recipe. arch: ModelConfig fields; tokenizer: (kind, vocab size); mix: corpus files it learns from.
RECIPES: dict[str, dict] = {
    "target": {"arch": {"arch": "llama", "hidden_size": 64, "intermediate_size": 172, "num_layers": 2,
                        "num_heads": 4, "max_position_embeddings": 512},
               "tokenizer": ("byte_bpe", 512), "mix": DOMAINS, "steps": 60, "lr": 3e-3},
    "llama": {"arch": {"arch": "llama", "hidden_size": 96, "intermediate_size": 256, "num_layers": 3,
                       "num_heads": 4, "max_position_embeddings": 1024},
              "tokenizer": ("metaspace_bpe", 1024), "mix": ("prose",), "steps": 150, "lr": 3e-3},
    "neox": {"arch": {"arch": "gpt_neox", "hidden_size": 96, "intermediate_size": 384, "num_layers": 3,
                      "num_heads": 4, "max_position_embeddings": 1024, "norm": "layer", "norm_bias": True,
                      "parallel_residual": True, "mlp": "plain", "activation": "gelu", "attention_bias": True,
                      "mlp_bias": True, "rotary_dim": 8, "norm_eps": 1e-5},
             "tokenizer": ("byte_bpe", 768), "mix": ("code",), "steps": 150, "lr": 3e-3},
    "mpt": {"arch": {"arch": "mpt", "hidden_size": 96, "intermediate_size": 384, "num_layers": 3, "num_heads": 4,
                     "max_position_embeddings": 4096, "norm": "layer", "position": "alibi", "mlp": "plain",
                     "activation": "gelu", "tie_embeddings": True, "norm_eps": 1e-5},
            "tokenizer": ("char", 0), "mix": DOMAINS, "steps": 150, "lr": 3e-3},
}
# shared by every recipe; max_chars per domain, each document cut at max_doc_chars (more documents to hold out)
PRETRAIN = {"block_size": 255, "batch_size": 8, "max_chars": 150_000, "max_doc_chars": 5_000}


# --------------------------------------------------------------------------------------------------- corpus


def corpus_documents(max_chars: int, max_doc_chars: int | None = None) -> dict[str, list[str]]:
    """``{"prose": pydoc topics, "code": stdlib modules}``, sorted by name, each document cut at
    ``max_doc_chars`` and each domain at ``max_chars`` characters in total (the last document shortened)."""
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
            if left <= 0:
                break
            if text.strip():
                docs.append(text[: min(left, max_doc_chars or left)])
                left -= len(docs[-1])
        out[domain] = docs
    return out


def write_corpus(paths: list[Path], max_chars: int, max_doc_chars: int | None = None) -> dict[str, list[str]]:
    """Write each domain's documents as jsonl to the path of ``paths`` named ``<domain>.jsonl`` (only when
    the content differs); returns the documents by domain."""
    docs = corpus_documents(max_chars, max_doc_chars)
    by_name = {p.name: p for p in paths}
    missing = [f"{d}.jsonl" for d in DOMAINS if f"{d}.jsonl" not in by_name]
    if missing or len(paths) != len(DOMAINS):
        raise ValueError(f"corpus.inputs {[str(p) for p in paths]}: the embedded default needs exactly the files "
                         f"{[f'{d}.jsonl' for d in DOMAINS]}")
    for domain in DOMAINS:
        text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs[domain])
        path = by_name[f"{domain}.jsonl"]
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return docs


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


def _recipe_hash(recipe: dict, corpus_files: list[Path], cfg: Config) -> str:
    payload = {"recipe": recipe, "pretrain": PRETRAIN, "version": ASSET_VERSION, "seed": cfg.run.seed,
               "holdout": cfg.corpus.holdout_fraction,
               "corpus": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in corpus_files}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def pretrain_model(name: str, recipe: dict, folder: Path, corpus_files: list[Path], docs: dict, cfg: Config,
                   mesh) -> None:
    """Train ``recipe``'s tokenizer and model (CLM only, training documents of its mix) and save both as a
    Hugging Face folder at ``folder`` (work files under ``folder/.work``, removed at the end)."""
    from fusejax.config import TrainConfig
    from fusejax.corpus import is_heldout, prepare_corpus
    from fusejax.data import TokenBatches
    from fusejax.models import ModelConfig, save_pretrained
    from fusejax.tokenizer import load_tokenizer
    from fusejax.train import Trainer, build_target

    seed, fraction = cfg.run.seed, cfg.corpus.holdout_fraction
    train_texts = [t for d in DOMAINS for i, t in enumerate(docs[d])
                   if not is_heldout(f"{d}.jsonl:{i}", seed, fraction)]
    kind, vocab = recipe["tokenizer"]
    work = folder / ".work"
    train_tokenizer(kind, vocab, train_texts).save_pretrained(work / "tokenizer")
    tok = load_tokenizer(work / "tokenizer")
    mix = [p for p in corpus_files if p.stem in recipe["mix"]]
    prepare_corpus(mix, tok, work / "corpus", block_size=PRETRAIN["block_size"], holdout_fraction=fraction, seed=seed)
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
    """Write the corpus and build (or reuse) the target and every source at their config paths.

    ``recipes``: name -> recipe (default :data:`RECIPES`); ``"target"`` and every source name need one.
    Returns ``{name: "reused" | "built"}``.
    """
    from fusejax.sharding import make_mesh

    recipes = RECIPES if recipes is None else recipes
    models = [("target", cfg.target.path)] + [(s.name, s.path) for s in cfg.sources]
    unknown = [name for name, _ in models if name not in recipes]
    if unknown:
        raise ValueError(f"embedded: no recipe for {unknown}; recipes exist for {sorted(recipes)}")
    corpus_files = [Path(p) for p in cfg.corpus.inputs]
    docs = write_corpus(corpus_files, PRETRAIN["max_chars"], PRETRAIN.get("max_doc_chars"))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    out = {}
    for name, path in models:
        folder = Path(path)
        key = _recipe_hash(recipes[name], corpus_files, cfg)
        stamp = folder / "recipe.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("hash") == key:
            out[name] = "reused"
            continue
        if folder.exists():
            log.warning("embedded: %s was built from another recipe or corpus; rebuilding it", folder)
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        pretrain_model(name, recipes[name], folder, corpus_files, docs, cfg, mesh)
        write_json(stamp, {"hash": key, "recipe": recipes[name], "seconds": time.perf_counter() - t0})
        out[name] = "built"
        print(f"[embedded] {name}: pre-trained in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- baseline


def clm_baseline(cfg: Config) -> dict:
    """Continual training of the target without fusion (``lm_weight=1``) on the training blocks of
    ``<out>/corpus`` into ``<out>/baseline_clm``; same steps (one pass unless ``train.steps``), batch and
    learning rate as the fused run. Returns its held-out :func:`fusejax.evaluation.evaluate` result."""
    from fusejax.data import TokenBatches
    from fusejax.evaluation import evaluate, heldout_batches
    from fusejax.sharding import make_mesh
    from fusejax.tokenizer import load_tokenizer
    from fusejax.train import Trainer, build_target

    layout = RunLayout.of(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tok = load_tokenizer(cfg.target.tokenizer_path)
    tc = dataclasses.replace(cfg.train, lm_weight=1.0, schedule="hard")
    data = TokenBatches(layout.corpus, tok, seq_len=tc.seq_len, split="train")
    model = build_target(tc, mesh, path=cfg.target.path, rules=cfg.mesh.rules)
    trainer = Trainer(model, data, tc, layout.root / BASELINE, mesh=mesh, seed=cfg.run.seed, config=cfg)
    trainer.fit()
    trainer.close()
    return evaluate(trainer.model(), heldout_batches(cfg, tok), batch_size=cfg.eval.batch_size,
                    max_batches=cfg.eval.max_batches)


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


def write_report(out: Path, results: dict, curves: dict[str, dict]) -> list[Path]:
    """``report/results.json``, ``report/report.md`` and PNG plots under ``out/report``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", results)
    methods = [m for m in ("target", "clm_only", "fusellm") if m in results["eval"]]
    names = {"target": "target before training", "clm_only": "CLM-only continual training", "fusellm": "FuseLLM"}
    domains = sorted({d for m in methods for d in results["eval"][m]["domains"]})
    lines = ["# Embedded default: held-out bits per byte (lower is better)", "",
             "| method | all | " + " | ".join(domains) + " | loss (nats/token) |",
             "|---|---|" + "---|" * len(domains) + "---|"]
    for m in methods:
        r = results["eval"][m]
        cells = [f"{r['bits_per_byte']:.4f}"] + [f"{r['domains'][d]['bits_per_byte']:.4f}" for d in domains]
        lines.append(f"| {names[m]} | " + " | ".join(cells) + f" | {r['loss']:.4f} |")
    lines += ["", f"Held-out: {results['eval'][methods[0]]['blocks']} blocks, {results['eval'][methods[0]]['bytes']} "
              f"bytes. Wall time: {results['seconds']:.0f} s.", "", "![bits per byte](bits_per_byte.png)",
              "![loss curves](loss_curves.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    groups = ["all", *domains]
    for i, m in enumerate(methods):
        r = results["eval"][m]
        values = [r["bits_per_byte"]] + [r["domains"][d]["bits_per_byte"] for d in domains]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=names[m])
    ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("held-out bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "bits_per_byte.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, scalars in curves.items():
        for tag, style in (("clm_loss", "-"), ("fusion_loss", "--")):
            if scalars.get(tag) and any(v for _, v in scalars[tag]):  # CLM-only has no fusion term
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, style, label=f"{label}: {tag}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=120)
    plt.close(fig)
    return [folder / n for n in ("results.json", "report.md", "bits_per_byte.png", "loss_curves.png")]


# --------------------------------------------------------------------------------------------------- main


def main(config: str | Path | None = None, overrides: list[str] | None = None, *, recipes: dict | None = None,
         stop_after: str | None = None) -> int:
    """Build the assets, run the pipeline, the CLM-only baseline and the report (see the module docstring).

    ``stop_after``: the last pipeline stage to run (tests); the baseline and report need the whole pipeline.
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
    results = {"assets": assets, "stages": stages, "eval": {}}
    fused = json.loads((layout.eval / "results.json").read_text())
    results["eval"]["target"], results["eval"]["fusellm"] = fused["target"], fused["trained"]
    results["eval"]["clm_only"] = clm_baseline(cfg)
    results["seconds"] = time.perf_counter() - t0
    curves = {"FuseLLM": read_scalars(layout.train / TENSORBOARD),
              "CLM-only": read_scalars(layout.root / BASELINE / TENSORBOARD)}
    paths = write_report(layout.root, results, curves)
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
