"""A toy chat fusion, FuseChat style, offline: ``python -m fusejax.chat_toy [CONFIG] [key=value ...]`` (CONFIG
defaults to ``configs/chat-toy.yaml``; about a minute on 2 CPU cores).

1. **Conversations.** Question/answer pairs made from Python's documentation topics (``pydoc_data``): per
   topic, "What does the Python documentation say about X?" answered by the topic's first paragraphs, then
   "Tell me more." answered by the next ones; written as ``{"messages": [...]}`` JSONL to ``corpus.inputs[0]``
   (rewritten only when its content changes).
2. **Models.** The target and each source (recipes in :data:`RECIPES`, keyed by name) get their own tokenizer
   kind and chat template (ChatML, Llama-3-style headers, "User:/Assistant:") and are pre-trained by fusejax
   (CLM on assistant tokens of the training conversations rendered with their own template); saved at their
   ``path`` with a ``recipe.json`` hash, reused while it matches.
3. **Fusion.** ``fusejax run`` with ``run.pairwise``: each source fused alone into the target
   (``pairs/<name>``), then the exports merged (``merge`` section) into ``merge/``; for comparison the same
   config without ``run.pairwise`` fuses every source in one run into ``multi/``.
4. **Report.** ``<out>/report/results.json`` and ``report.md``: held-out assistant-token bits per byte of the
   sources alone (each with its own template), the target, each pair, the merged model and the multi-source run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

from fusejax.config import CONFIGS, Config, config_to_dict, load_config
from fusejax.files import write_json
from fusejax.schema import RunLayout

log = logging.getLogger(__name__)

DEFAULT_CONFIG = CONFIGS / "chat-toy.yaml"
MULTI = "multi"  # folder of the single-run multi-source fusion, beside pairs/ and merge/

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADERS = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
           "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
           "{% endif %}")
PLAIN = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n{% elif m['role'] == "
         "'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% else %}{{ m['content'] }}\n\n{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
TEMPLATES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]),
             "headers": (HEADERS, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
             "plain": (PLAIN, [])}

# name -> recipe: arch (ModelConfig fields), tokenizer (kind, vocab size), template, pre-training steps (0: none,
# the random initialization) and lr
RECIPES: dict[str, dict] = {
    "target": {"arch": {"arch": "llama", "hidden_size": 48, "intermediate_size": 128, "num_layers": 2,
                        "num_heads": 4, "max_position_embeddings": 512},
               "tokenizer": ("byte_bpe", 512), "template": "chatml", "steps": 20, "lr": 3e-3},
    "alpha": {"arch": {"arch": "llama", "hidden_size": 64, "intermediate_size": 172, "num_layers": 2,
                       "num_heads": 4, "max_position_embeddings": 1024},
              "tokenizer": ("metaspace_bpe", 768), "template": "headers", "steps": 80, "lr": 3e-3},
    "beta": {"arch": {"arch": "gpt_neox", "hidden_size": 64, "intermediate_size": 256, "num_layers": 2,
                      "num_heads": 4, "max_position_embeddings": 1024, "norm": "layer", "norm_bias": True,
                      "parallel_residual": True, "mlp": "plain", "activation": "gelu", "attention_bias": True,
                      "mlp_bias": True, "rotary_dim": 8, "norm_eps": 1e-5},
             "tokenizer": ("byte_bpe", 768), "template": "plain", "steps": 80, "lr": 3e-3},
}
PRETRAIN = {"block_size": 255, "batch_size": 8}


def conversations(max_topics: int | None = None, answer_chars: int = 200) -> list[dict]:
    """Two-turn conversations about the documentation topics (sorted; the first ``max_topics``), each answer
    at most ``answer_chars`` characters cut at a paragraph end."""
    from pydoc_data.topics import topics

    def paragraphs(text: str, start: int) -> tuple[str, int]:
        end = text.rfind("\n\n", start, start + answer_chars)
        end = start + answer_chars if end <= start else end
        return text[start:end].strip(), end

    out = []
    for key in sorted(topics)[:max_topics]:
        first, end = paragraphs(topics[key], 0)
        second, _ = paragraphs(topics[key], end)
        if not first or not second:
            continue
        out.append({"messages": [
            {"role": "system", "content": "You answer questions about Python."},
            {"role": "user", "content": f"What does the Python documentation say about {key}?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Tell me more."},
            {"role": "assistant", "content": second},
        ]})
    return out


def write_conversations(path: Path, records: list[dict]) -> None:
    """``records`` as JSONL at ``path``, written only when the content differs (keeps stage fingerprints)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def pretrain_model(name: str, recipe: dict, folder: Path, cfg: Config, mesh) -> None:
    """Train ``recipe``'s tokenizer (with its chat template) and model (CLM on the assistant tokens of the
    training conversations) and save both as a Hugging Face folder at ``folder``."""
    from fusejax.config import TrainConfig
    from fusejax.corpus import prepare_corpus
    from fusejax.data import TokenBatches
    from fusejax.embedded import train_tokenizer
    from fusejax.models import ModelConfig, save_pretrained
    from fusejax.tokenizer import load_tokenizer
    from fusejax.train import Trainer, build_target

    data_file = Path(cfg.corpus.inputs[0])
    texts = [m["content"] for line in data_file.read_text("utf-8").splitlines()
             for m in json.loads(line)["messages"]]
    work = folder / ".work"
    template, markers = TEMPLATES[recipe["template"]]
    tok = train_tokenizer(*recipe["tokenizer"], texts)
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.chat_template = template
    tok.save_pretrained(work / "tokenizer")
    tok = load_tokenizer(work / "tokenizer")
    config = ModelConfig(**recipe["arch"], vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    tc = TrainConfig(steps=recipe["steps"] or None, batch_size=PRETRAIN["batch_size"],
                     seq_len=PRETRAIN["block_size"] + 1, lr=recipe["lr"], warmup_ratio=0.05, lm_weight=1.0,
                     log_every=max(1, recipe["steps"] // 5), eval_every=0, checkpoint_every=0, keep_checkpoints=1)
    model = build_target(tc, mesh, config=config, seed=cfg.run.seed)
    if recipe["steps"]:  # 0: the random initialization (tests)
        prepare_corpus(data_file, tok, work / "corpus", block_size=PRETRAIN["block_size"], fmt="chat",
                       holdout_fraction=cfg.corpus.holdout_fraction, seed=cfg.run.seed)
        data = TokenBatches(work / "corpus", tok, seq_len=PRETRAIN["block_size"] + 1)
        trainer = Trainer(model, data, tc, work / "train", mesh=mesh, seed=cfg.run.seed)
        trainer.fit()
        trainer.close()
        model = trainer.model()
    save_pretrained(model, folder)
    tok.save_pretrained(folder)
    shutil.rmtree(work)


def build_assets(cfg: Config, recipes: dict[str, dict] | None = None, max_topics: int | None = None
                 ) -> dict[str, str]:
    """Write the conversations (of the first ``max_topics`` topics) and build (or reuse) the target and every
    source; ``{name: "reused" | "built"}``."""
    from fusejax.sharding import make_mesh

    recipes = RECIPES if recipes is None else recipes
    data_file = Path(cfg.corpus.inputs[0])
    write_conversations(data_file, conversations(max_topics))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    out = {}
    for name, path in [("target", cfg.target.path)] + [(s.name, s.path) for s in cfg.sources]:
        folder, recipe = Path(path), recipes[name]
        key = hashlib.sha256(json.dumps([recipe, PRETRAIN, cfg.run.seed, cfg.corpus.holdout_fraction,
                                         hashlib.sha256(data_file.read_bytes()).hexdigest()],
                                        default=list).encode()).hexdigest()
        stamp = folder / "recipe.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("hash") == key:
            out[name] = "reused"
            continue
        shutil.rmtree(folder, ignore_errors=True)
        pretrain_model(name, recipe, folder, cfg, mesh)
        write_json(stamp, {"hash": key, "recipe": recipe})
        out[name] = "built"
    return out


def multi_config(cfg: Config) -> Config:
    """``cfg`` as one multi-source fusion (no ``run.pairwise``) in ``<output_dir>/multi``, reading the pairs'
    corpus store."""
    raw = config_to_dict(cfg)
    raw["run"].update(output_dir=str(Path(cfg.run.output_dir) / MULTI), pairwise=False, pairwise_target=False,
                      corpus_dir=str(RunLayout.of(cfg).corpus))
    raw["export"]["path"] = None
    return load_config(data=raw)


def heldout_bits_per_byte(cfg: Config, models: dict[str, tuple[str, str | None, str | None]]) -> dict:
    """Held-out assistant-token bits per byte (and loss) of each ``name: (model folder, tokenizer folder or
    None, chat template file or None)``, each rendering the held-out conversations with its own template."""
    from fusejax.data import TokenBatches
    from fusejax.evaluation import evaluate
    from fusejax.models import load_pretrained
    from fusejax.sharding import make_mesh

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    out = {}
    for name, (path, tokenizer, template) in models.items():
        data = TokenBatches(RunLayout.of(cfg).corpus, tokenizer or path, seq_len=2 * cfg.train.seq_len, split="heldout",
                            chat_template=template)
        result = evaluate(load_pretrained(path, mesh=mesh), data, batch_size=cfg.eval.batch_size, domains=[])
        out[name] = {key: result[key] for key in ("bits_per_byte", "loss", "tokens", "bytes", "blocks")}
    return out


def write_report(out: Path, results: dict) -> Path:
    """``out/report/results.json`` and ``report.md`` (a table of held-out assistant bits per byte)."""
    folder = out / "report"
    write_json(folder / "results.json", results)
    lines = ["# Toy chat fusion (FuseChat style)", "",
             "Held-out conversations, assistant tokens and ends of turn only (each model renders them with its own "
             "chat template).",
             "", "| model | bits per byte | loss per token | tokens | bytes |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['bits_per_byte']:.4f} | {r['loss']:.4f} | {r['tokens']} | {r['bytes']} |"
              for name, r in results["eval"].items()]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "report.md"


def main(config: str | Path | None = None, overrides: list[str] | None = None, *,
         recipes: dict | None = None, max_topics: int | None = None) -> dict:
    """Build the assets, run the pairwise fusion and merge, the multi-source fusion and the report; returns
    the results (also in ``<out>/report/results.json``). ``recipes``, ``max_topics``: see :func:`build_assets`."""
    from fusejax import pipeline
    from fusejax.stages import pair_merge_config

    cfg = load_config(config or DEFAULT_CONFIG, overrides or [])
    if not cfg.run.pairwise:
        raise ValueError("the toy chat fusion compares pairwise fusion with one run: set run.pairwise: true")
    assets = build_assets(cfg, recipes, max_topics)
    stages = pipeline.run(cfg)
    multi = multi_config(cfg)
    stages[MULTI] = pipeline.run(multi)
    layout = RunLayout.of(cfg)
    models = {f"source {s.name}": (s.path, s.tokenizer, s.chat_template) for s in cfg.sources}
    target = (cfg.target.path, cfg.target.tokenizer, cfg.target.chat_template)
    models["target"] = target
    for s in cfg.sources:
        models[f"pair {s.name}"] = (str(layout.pair(s.name) / "export"), *target[1:])
    models["pairwise + merge"] = (str(layout.merge), *target[1:])
    models["one run, all sources"] = (str(RunLayout.of(multi).export), *target[1:])
    merge = config_to_dict(pair_merge_config(cfg).merge)
    results = {"assets": assets, "stages": stages, "merge": {**merge, "path": str(layout.merge)},
               "eval": heldout_bits_per_byte(cfg, models)}
    print(write_report(layout.root, results).read_text())
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fusejax").setLevel(logging.INFO)
    args = sys.argv[1:]
    first = args[0] if args and "=" not in args[0] else None
    main(first, args[1:] if first else args)
