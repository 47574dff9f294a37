"""The miniature reproduction study: every variant of ``configs/study/`` for several seeds, then tables and plots.

``python -m fusejax.study [CONFIG ...] [--seeds 0 1 2] [--out runs/study] [--docs docs]``
(CONFIG defaults to every ``configs/study/*.yaml``; the variant name is the file stem).
``python -m fusejax.study --same-arch [--seeds ...]``: the same-architecture comparison instead
(:func:`same_arch`: domain sources continued from the target vs output ensembling, weight averaging, FuseLLM).

Stores are shared, not recomputed: every variant's ``prepare`` .. ``align`` outputs run once per distinct
alignment fingerprint, always with ``run.seed = 0`` (the embedded models were pre-trained without the seed-0
held-out documents, so the held-out split must stay the seed-0 one), in ``<out>/stores/<align fp[:12]>``.
The corpus and the per-source top-k stores of the first config (which must list every source used anywhere)
are linked into every other store, so ``represent`` runs once; a variant with fewer sources gets a
``represent/stage.json`` with its own fingerprint over those links (each source's store is computed alone).
Each (variant, seed) then trains and evaluates in ``<out>/runs/<variant>/seed<k>`` (``corpus`` and
``aligned`` are links to its store) with ``run.seed = k``: the seed changes only the order of the training
blocks (the target is loaded from its folder; nothing is randomly initialized). One JSON line per finished
run goes to ``<out>/results.jsonl`` (reruns skip finished runs); :func:`write_docs` writes ``study.md`` tables
and PNG plots from those lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusejax.config import CONFIGS, Config
from fusejax.schema import RunLayout

log = logging.getLogger(__name__)

STUDY_CONFIGS = CONFIGS / "study"
SAME_ARCH_CONFIG = STUDY_CONFIGS / "same_arch" / "fusellm.yaml"


def _link(src: Path, dest: Path) -> None:
    """``dest`` -> ``src`` as a symlink (absolute), unless it already exists."""
    if not dest.exists() and not dest.is_symlink():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src.resolve(), target_is_directory=True)


def build_store(cfg: Config, root: Path, shared: Path | None) -> Path:
    """Run ``prepare`` .. ``align`` for ``cfg`` (seed 0) in ``root/<align fingerprint[:12]>``, reusing the
    corpus and per-source represent folders of the store ``shared`` (None: compute them). Returns the store."""
    from fusejax import pipeline
    from fusejax.config import replace

    cfg = replace(cfg, "run.seed", 0)
    store = root / pipeline.fingerprints(cfg)["align"][:12]
    cfg = replace(cfg, "run.output_dir", str(store))
    layout = RunLayout.of(cfg)
    if shared is not None and shared != store:
        reused = RunLayout.at(shared)
        _link(reused.corpus, layout.corpus)
        for src in cfg.sources:
            _link(reused.topk(src.name), layout.topk(src.name))
        record = {"stage": "represent", "fingerprint": pipeline.fingerprints(cfg)["represent"], "status": "complete",
                  "started": time.time(), "finished": time.time()}
        if pipeline.read_record(layout.represent) is None:
            (layout.represent / pipeline.RECORD).write_text(json.dumps(record))
    aligned = pipeline.read_record(layout.aligned) or {}
    if aligned.get("status") != "complete" or aligned.get("fingerprint") != pipeline.fingerprints(cfg)["align"]:
        pipeline.run(cfg, stop_after="align")  # (its stop_after is not reached when align is skipped)
    return store


def train_and_eval(cfg: Config, store: Path, run_dir: Path, seed: int) -> dict:
    """Train ``cfg`` on ``store``'s aligned data with ``run.seed = seed`` in ``run_dir`` and evaluate it;
    returns ``fusejax.evaluation.run``'s ``{"target": ..., "trained": ...}`` (bits per byte per domain)."""
    from fusejax import evaluation, train
    from fusejax.config import replace

    cfg = replace(replace(cfg, "run.output_dir", str(run_dir)), "run.seed", seed)
    reused, layout = RunLayout.at(store), RunLayout.of(cfg)
    _link(reused.corpus, layout.corpus)
    _link(reused.aligned, layout.aligned)
    if cfg.align.on_the_fly:  # training reads the top-k stores and vocab maps instead of an aligned store
        _link(reused.represent, layout.represent)
        _link(reused.vocab_maps, layout.vocab_maps)
    train.run(cfg)
    return evaluation.run(cfg)


def run_study(configs: list[Path], seeds: list[int], out: Path) -> list[dict]:
    """Every (config, seed) not yet in ``out/results.jsonl``; returns all result lines."""
    from fusejax.config import load_config

    results_file = out / "results.jsonl"
    done = {(r["variant"], r["seed"]) for r in read_results(results_file)}
    cfgs = {path.stem: load_config(path) for path in configs}
    stores: dict[str, Path] = {}
    for seed in seeds:  # seed-major: every variant gets its first seed before any gets a second
        for name, cfg in cfgs.items():
            if name not in stores:
                stores[name] = build_store(cfg, out / "stores", next(iter(stores.values()), None))
            if (name, seed) in done:
                continue
            t0 = time.perf_counter()
            ev = train_and_eval(cfg, stores[name], out / "runs" / name / f"seed{seed}", seed)
            line = {"variant": name, "seed": seed, "store": stores[name].name, "seconds": time.perf_counter() - t0,
                    "target": _bpb(ev["target"]), "trained": _bpb(ev["trained"])}
            with results_file.open("a") as f:
                f.write(json.dumps(line) + "\n")
            log.info("study: %s seed %d: %s", name, seed, line["trained"])
    return read_results(results_file)


def _bpb(result: dict) -> dict[str, float]:
    """``{"all": bits/byte, <domain>: bits/byte, ...}`` of one ``fusejax.evaluation.evaluate`` result."""
    return {"all": result["bits_per_byte"], **{d: r["bits_per_byte"] for d, r in result["domains"].items()}}


def read_results(path: Path) -> list[dict]:
    """The JSON lines of ``path`` ([] when absent)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for one value), min, max and count of a metric over seeds."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    def cell(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"


def summarize(values: list[float]) -> Stat:
    """:class:`Stat` of ``values`` (at least one)."""
    if not values:
        raise ValueError("summarize: no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, min(values), max(values), n)


def aggregate(results: list[dict]) -> dict[str, dict[str, Stat]]:
    """``{variant: {metric: Stat over seeds}}`` from result lines; the pseudo-variant ``target`` holds the target
    before training (the same model for every run: its first value per seed). A seed repeated for one
    variant raises ValueError (results of two runs mixed in one file)."""
    per: dict[str, dict[str, dict[int, float]]] = {}
    for r in results:
        for variant, key in ((r["variant"], "trained"), ("target", "target")):
            for metric, value in r[key].items():
                seen = per.setdefault(variant, {}).setdefault(metric, {})
                if r["seed"] in seen and variant != "target":
                    raise ValueError(f"results: variant {variant!r} has seed {r['seed']} twice")
                seen.setdefault(r["seed"], value)
    return {v: {m: summarize(list(by_seed.values())) for m, by_seed in metrics.items()} for v, metrics in per.items()}


def paired_delta(results: list[dict], a: str, b: str, metric: str = "all") -> Stat | None:
    """:class:`Stat` of ``b - a`` over the seeds both variants ran (same seed = same data order); None if none."""
    by = {(r["variant"], r["seed"]): r["trained"][metric] for r in results}
    seeds = sorted(s for (v, s) in by if v == a and (b, s) in by)
    return summarize([by[b, s] - by[a, s] for s in seeds]) if seeds else None


# (title, [variants], comparison baseline for the paired delta) of each table in docs/study.md
TABLES = (
    ("Main table: target vs CLM-only vs FuseLLM", ["target", "clm_only", "fusellm", "ce_token"], "clm_only"),
    ("Number of sources (the paper's Table 4)", ["only_llama", "only_neox", "only_mpt", "two_sources", "fusellm"],
     "clm_only"),
    ("Ablations", ["fusellm", "ce_token", "avg_ce", "mined_map", "lambda_09", "reference_align"], "fusellm"),
)


def table(stats: dict[str, dict[str, Stat]], results: list[dict], variants: list[str], baseline: str) -> list[str]:
    """Markdown rows: mean ± std (min..max) bits per byte per domain, and the paired delta against ``baseline``."""
    variants = [v for v in variants if v in stats]
    if not variants:
        return ["(no finished runs yet)"]
    metrics = ["all", *sorted(m for m in stats[variants[0]] if m != "all")]
    rows = ["| variant | n | " + " | ".join(metrics) + f" | Δ all vs {baseline} (paired) |",
            "|---|---|" + "---|" * len(metrics) + "---|"]
    for v in variants:
        cells = [f"{stats[v][m].cell()} ({stats[v][m].min:.4f}..{stats[v][m].max:.4f})" for m in metrics]
        d = paired_delta(results, baseline, v) if v not in ("target", baseline) else None
        rows.append(f"| {v} | {stats[v]['all'].n} | " + " | ".join(cells) + f" | {d.cell() if d else '-'} |")
    return rows


def plot(stats: dict[str, dict[str, Stat]], results: list[dict], variants: list[str], baseline: str,
         path: Path) -> None:
    """Bar chart of the paired delta of each variant to ``baseline`` per domain (mean ± std over seeds, one dot
    per seed; below 0: better than ``baseline``), to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in variants if v in stats and v not in ("target", baseline)]
    metrics = ["all", *sorted(m for m in stats[baseline] if m != "all")] if baseline in stats else []
    by = {(r["variant"], r["seed"]): r["trained"] for r in results}
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.use_sticky_edges = False  # a margin beyond 0, so bars that all point down do not hang from the frame
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [g + i * width for g in range(len(metrics))]
        deltas = [[by[v, s][m] - by[baseline, s][m] for (w, s) in by if w == v and (baseline, s) in by]
                  for m in metrics]
        if not deltas[0]:  # no seed in common with the baseline
            continue
        d = [summarize(x) for x in deltas]
        ax.bar(xs, [x.mean for x in d], width, yerr=[x.std for x in d], capsize=2, label=v, alpha=0.8)
        for x, values in zip(xs, deltas):
            ax.plot([x] * len(values), values, "k.", ms=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([g + width * (len(variants) - 1) / 2 for g in range(len(metrics))], metrics)
    ax.set_ylabel(f"Δ held-out bits/byte vs {baseline}\n(paired per seed; below 0: better)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(results: list[dict], docs: Path, notes: str = "") -> Path:
    """``docs/study/results.md`` (the tables) and ``docs/study/table<i>.png``; returns the Markdown path.
    ``notes`` (Markdown) goes after the tables."""
    stats = aggregate(results)
    folder = docs / "study"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Study results (generated by fusejax/study.py)", "",
             "Held-out bits per byte, mean ± sample std over seeds (min..max); Δ: per-seed difference to the",
             "baseline run with the same seed (same data order), mean ± std. Lower is better.", ""]
    for i, (title, variants, baseline) in enumerate(TABLES):
        lines += [f"## {title}", "", *table(stats, results, variants, baseline), ""]
        if baseline in stats and any(v in stats for v in variants if v not in ("target", baseline)):
            plot(stats, results, variants, baseline, folder / f"table{i}.png")
            lines += [f"![{title}](table{i}.png)", ""]
    path = folder / "results.md"
    path.write_text("\n".join(lines + [notes]))
    return path


# ------------------------------------------------------------------------------ same-architecture comparison


class Mixture(nnx.Module):
    """Output ensemble of same-vocabulary models: called like a model, returns the log of the mean of their
    next-token probabilities ``log(1/M sum_m softmax(logits_m))`` [B, T, V] float32 (already normalized, so
    :func:`fusejax.evaluation.evaluate` scores the mixture as it is)."""

    def __init__(self, models: list):
        self.models = nnx.List(models)

    def __call__(self, input_ids, attention_mask):
        logp = jnp.stack([jax.nn.log_softmax(m(input_ids, attention_mask).astype(jnp.float32), axis=-1)
                          for m in self.models])
        return jax.nn.logsumexp(logp, axis=0) - math.log(len(self.models))


def ensemble_bits_per_byte(models: list, batches, *, batch_size: int, domains: list[str] | None = None) -> dict:
    """:func:`fusejax.evaluation.evaluate` of the output ensemble (:class:`Mixture`) of ``models``."""
    from fusejax.evaluation import evaluate

    return evaluate(Mixture(models), batches, batch_size=batch_size, domains=domains)


def average_weights(models: list):
    """The first of ``models`` (same architecture) with every parameter replaced by the mean over ``models``."""
    states = [nnx.state(m, nnx.Param) for m in models]
    nnx.update(models[0], jax.tree.map(lambda *xs: sum(xs) / len(xs), *states))
    return models[0]


def build_domain_sources(cfg: Config, corpus: Path, passes: int = 2) -> None:
    """Continue ``cfg.target`` CLM-only (lm_weight 1, ``cfg.train``'s batch, lr, warmup, seed 0) on the
    training blocks of one domain of ``corpus`` each, ``passes`` passes, into every ``cfg.sources`` folder
    (the source's name is the domain); a folder with a ``config.json`` is reused."""
    from fusejax.data import TokenBatches
    from fusejax.evaluation import block_domains
    from fusejax.models import save_pretrained
    from fusejax.sharding import make_mesh
    from fusejax.store import write_json
    from fusejax.tokenizer import load_tokenizer
    from fusejax.train import Trainer, build_target

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tok = load_tokenizer(cfg.target.tokenizer_path)
    for src in cfg.sources:
        folder = Path(src.path)
        if (folder / "config.json").is_file():
            continue
        data = TokenBatches(corpus, tok, seq_len=cfg.train.seq_len, split="train")
        data.positions = data.positions[np.asarray(block_domains(data)) == src.name]
        data.num_rows = len(data.positions)
        if data.num_rows == 0:
            raise ValueError(f"{corpus}: no training blocks of domain {src.name!r} (source {src.name})")
        tc = dataclasses.replace(cfg.train, lm_weight=1.0, schedule="hard", checkpoint_every=0,
                                 steps=passes * data.num_rows // cfg.train.batch_size)
        trainer = Trainer(build_target(tc, mesh, path=cfg.target.path), data, tc, folder / ".work", mesh=mesh)
        history = trainer.fit()
        trainer.close()
        save_pretrained(trainer.model(), folder)
        tok.save_pretrained(folder)
        write_json(folder / "pretrain_history.json", history)
        shutil.rmtree(folder / ".work")
        log.info("same-arch: source %s (%d blocks, %d steps) -> %s", src.name, data.num_rows, tc.steps, folder)


SAME_ARCH_VARIANTS = ["target", "prose", "code", "ensemble", "weight_avg", "clm_only", "fusellm"]


def same_arch(seeds: list[int], out: Path, config: Path = SAME_ARCH_CONFIG) -> list[dict]:
    """The paper's Table 7 shape in ``out`` (results in ``out/results.jsonl``, reruns skip finished lines):
    the two domain sources of ``config`` (:func:`build_domain_sources`), each alone, their output ensemble and
    weight average (seed-independent: seed 0 only), then FuseLLM of them into the target (``config``) and
    CLM-only continual training on the same data (``train.lm_weight = 1``) for every seed."""
    from fusejax import corpus as corpus_stage
    from fusejax.config import load_config, replace
    from fusejax.evaluation import block_domains, evaluate, heldout_batches
    from fusejax.models import load_pretrained
    from fusejax.sharding import make_mesh

    cfg = load_config(config)
    prepared = replace(cfg, "run.output_dir", str(out))
    corpus_stage.run(prepared)  # seed-0 split: the held-out documents of every embedded model
    build_domain_sources(cfg, out / "corpus")
    results_file = out / "results.jsonl"
    done = {(r["variant"], r["seed"]) for r in read_results(results_file)}

    def record(variant: str, seed: int, target: dict, trained: dict) -> None:
        with results_file.open("a") as f:
            line = {"variant": variant, "seed": seed, "target": _bpb(target), "trained": _bpb(trained)}
            f.write(json.dumps(line) + "\n")
        log.info("same-arch: %s seed %d: %s", variant, seed, _bpb(trained))

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    data = heldout_batches(prepared)
    kw = dict(batch_size=cfg.eval.batch_size, domains=block_domains(data))
    load = lambda path: load_pretrained(path, mesh=mesh)  # noqa: E731
    base = evaluate(load(cfg.target.path), data, **kw)
    paths = [s.path for s in cfg.sources]
    single = {s.name: lambda p=s.path: evaluate(load(p), data, **kw) for s in cfg.sources}
    single["ensemble"] = lambda: ensemble_bits_per_byte([load(p) for p in paths], data, **kw)
    single["weight_avg"] = lambda: evaluate(average_weights([load(p) for p in paths]), data, **kw)
    for name, fn in single.items():
        if (name, 0) not in done:
            record(name, 0, base, fn())
    store = build_store(cfg, out / "stores", None)
    for seed in seeds:
        for name, variant in (("clm_only", replace(cfg, "train.lm_weight", 1.0)), ("fusellm", cfg)):
            if (name, seed) not in done:
                ev = train_and_eval(variant, store, out / "runs" / name / f"seed{seed}", seed)
                record(name, seed, ev["target"], ev["trained"])
    return read_results(results_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusejax.study", description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*", type=Path, help="variant configs (default: configs/study/*.yaml)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--report-only", action="store_true", help="only rewrite the docs from results.jsonl")
    p.add_argument("--same-arch", action="store_true", help="run the same-architecture comparison (configs/study/"
                   "same_arch) in <out>/same_arch and print its table instead")
    a = p.parse_args(argv)
    if a.same_arch:
        results = same_arch(a.seeds, a.out / "same_arch")
        print("\n".join(table(aggregate(results), results, SAME_ARCH_VARIANTS, "clm_only")))
        return 0
    configs = a.configs or sorted(STUDY_CONFIGS.glob("*.yaml"), key=lambda c: (c.stem != "fusellm", c.stem))
    results = read_results(a.out / "results.jsonl") if a.report_only else run_study(configs, a.seeds, a.out)
    print(f"study: {write_docs(results, a.docs)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fusejax").setLevel(logging.INFO)
    sys.exit(main())
