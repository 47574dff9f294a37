"""The embedded default: corpus, the three tokenizer kinds, TensorBoard reading, the report, and (slow) the
assets + pipeline end to end on tiny recipes."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from fusejax import embedded
from fusejax.vocab import word_start_marker
from fusejax.tokenizer import load_tokenizer

TEXT = "def area(r):\n    return 3.14 * r ** 2  # the circle's area\n\nThe  quick brown fox."


@pytest.mark.parametrize("kind, marker", [("metaspace_bpe", "▁"), ("byte_bpe", "Ġ"), ("char", "▁")])
def test_tokenizer_kinds_round_trip_and_have_their_marker(kind, marker, tmp_path):
    docs = embedded.corpus_documents(20_000)
    tok = embedded.train_tokenizer(kind, 400, docs["prose"] + docs["code"])
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)  # what the stages load
    assert word_start_marker(tok) == marker
    ids = tok.encode(TEXT, add_special_tokens=False)
    decoded = tok.decode(ids)
    assert decoded == TEXT if kind != "metaspace_bpe" else decoded.split() == TEXT.split()
    assert tok.eos_token_id is not None
    if kind == "char":
        assert len(ids) == len(TEXT)


def test_corpus_documents_fusion_split_and_pretraining_texts(tmp_path):
    from fusejax.corpus import is_heldout

    docs = embedded.corpus_documents(20_000, 700)
    for domain in embedded.DOMAINS:
        assert sum(map(len, docs[domain])) == 20_000 and max(map(len, docs[domain])) <= 700
    assert "def " in "".join(docs["code"])
    fusion = embedded.fusion_documents(docs, 3)
    assert fusion["prose"] == docs["prose"][::3]
    paths = [tmp_path / "prose.jsonl", tmp_path / "code.jsonl"]
    embedded.write_corpus(paths, fusion)
    for domain in embedded.DOMAINS:
        lines = (tmp_path / f"{domain}.jsonl").read_text().splitlines()
        assert [json.loads(line)["text"] for line in lines] == fusion[domain]
    mtime = paths[0].stat().st_mtime_ns
    embedded.write_corpus(paths, fusion)
    assert paths[0].stat().st_mtime_ns == mtime  # unchanged content is not rewritten
    with pytest.raises(ValueError, match="prose.jsonl"):
        embedded.write_corpus([tmp_path / "a.jsonl"], fusion)
    heldout = {t for d in embedded.DOMAINS for i, t in enumerate(fusion[d]) if is_heldout(f"{d}.jsonl:{i}", 0, 0.3)}
    assert heldout
    for own_data in (False, True):
        texts = embedded.pretraining_texts(docs, {"own_data": own_data}, 3, 0, 0.3)
        seen = {t for d in embedded.DOMAINS for t in texts[d]}
        assert not seen & heldout  # no model learns from a held-out document
        everything = {t for d in embedded.DOMAINS for t in docs[d]}
        assert seen | heldout == (everything if own_data else {t for d in fusion for t in fusion[d]})


def test_read_scalars_reads_tensorboardx_events(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, value in [(2, 0.5), (1, 1.5), (3, 0.25)]:
        writer.add_scalar("clm_loss", value, step)
    writer.close()
    assert embedded.read_scalars(tmp_path) == {"clm_loss": [(1, 1.5), (2, 0.5), (3, 0.25)]}


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [[0, 4.0], [10, 3.0], [20, 2.0], [30, 1.5]]
    assert embedded.tokens_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert embedded.tokens_to_reach(curve, 3.0) == pytest.approx(10.0)
    assert embedded.tokens_to_reach(curve, 5.0) == 0
    assert embedded.tokens_to_reach(curve, 1.0) is None


def _results():
    def ev(bpb, code, prose):
        return {"loss": 2 * bpb, "bits_per_byte": bpb, "tokens": 10, "bytes": 30, "blocks": 2,
                "domains": {"code": {"bits_per_byte": code}, "prose": {"bits_per_byte": prose}}}

    def run(final, code, prose, curve):
        return {"eval": ev(final, code, prose), "curve": [[10, curve[0]], [20, curve[1]], [30, final]]}

    toy = {"paths": ["/x/tasks/mc.yaml", "/x/tasks/gen.yaml", "/x/tasks/same.yaml"],
           "metric": {"mc": "acc", "gen": "exact_match", "same": "acc"}, "examples": {"mc": 20, "gen": 10, "same": 5},
           "target": {"mc": 0.25, "gen": 0.0, "same": 0.2}, "seconds": 3.0, "cpu_seconds": 5.0,
           "runs": {"clm_only": {"0": {"mc": 0.4, "gen": 0.1, "same": 0.2}, "1": {"mc": 0.45, "gen": 0.2, "same": 0.4}},
                    "fusellm": {"0": {"mc": 0.6, "gen": 0.1, "same": 0.2}, "1": {"mc": 0.7, "gen": 0.3, "same": 0.4}}}}
    return {"target": ev(4.0, 4.5, 3.5), "tokens_per_step": 100, "seconds": 1.0, "toy_tasks": toy,
            "runs": {"clm_only": {"0": run(3.0, 3.2, 2.8, (3.6, 3.3)), "1": run(3.1, 3.3, 2.9, (3.7, 3.4))},
                     "fusellm": {"0": run(2.9, 3.0, 2.8, (3.5, 3.0)), "1": run(3.0, 3.2, 2.8, (3.6, 3.2))}}}


def test_report_summary_paragraph_and_plots_from_results(tmp_path):
    summary = embedded.summarize_results(_results())
    all_ = summary["metrics"]["all"]
    assert all_["deltas"] == pytest.approx([-0.1, -0.1]) and all_["wins"] == 2
    assert all_["delta_percent"] == pytest.approx(-100 * 0.2 / 6.1)
    assert summary["metrics"]["prose"]["deltas"] == pytest.approx([0.0, -0.1])
    assert summary["metrics"]["prose"]["wins"] == 1
    # seed 0: CLM-only ends at 3.0, FuseLLM passes 3.0 at step 20; seed 1: 3.1, reached at step 25
    assert [r["tokens"] for r in summary["efficiency"]["per_seed"]] == pytest.approx([2000, 2500])
    assert summary["efficiency"]["ratio"]["mean"] == pytest.approx((30 / 20 + 30 / 25) / 2)
    paths = embedded.write_report(tmp_path, _results())
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "FuseLLM better on 2 of 2 seeds" in report and "1.35 ± 0.21x fewer" in report
    assert "| Δ (paired) | -0.1000 ± 0.0000 |" in report
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == _results()
    # toy tasks: paired deltas (higher is better), and whether they exceed twice the paired seed spread
    mc, gen = summary["tasks"]["mc"], summary["tasks"]["gen"]
    assert mc["deltas"] == pytest.approx([0.2, 0.25]) and mc["wins"] == 2 and mc["target"] == 0.25
    assert gen["deltas"] == pytest.approx([0.0, 0.1]) and gen["wins"] == 1
    assert "| mc (acc, 20) | 0.2500 | 0.4250 ± 0.0354 | 0.6500 ± 0.0707 | 0.2250 ± 0.0354 | 2 of 2 seeds |" in report
    assert "`mc` (acc over 20 examples, one example = 0.050) +0.225 ± 0.035: more than twice" in report
    assert "`gen` (exact_match over 10 examples, one example = 0.100) +0.050 ± 0.071: within twice" in report
    assert "`same` (acc over 5 examples, one example = 0.200) +0.000 ± 0.000: the same score on every seed." in report
    assert "--include_path /x/tasks" in report


def test_report_says_why_the_toy_tasks_were_skipped(tmp_path, monkeypatch):
    from fusejax import evaluation

    def missing():
        raise ImportError("eval.tasks needs lm-evaluation-harness, which is not installed: pip install fusejax[eval]")

    monkeypatch.setattr(evaluation, "harness_module", missing)
    results = {**_results(), "toy_tasks": {"paths": ["/x/tasks/mc.yaml"],
                                           **embedded.score_toy_tasks(None, [Path("/x/tasks/mc.yaml")], [0])}}
    assert embedded.summarize_results(results)["tasks"] == {}
    embedded.write_report(tmp_path, results)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Skipped: eval.tasks needs lm-evaluation-harness, which is not installed: pip install fusejax[eval]." \
        in report and "| mc" not in report


TINY = {"block_size": 63, "batch_size": 8, "max_chars": 12_000, "max_doc_chars": 600, "fusion_stride": 2}


def _tiny_recipes():
    recipes = {}
    for name, recipe in embedded.RECIPES.items():
        arch = dict(recipe["arch"], hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
        if "rotary_dim" in arch:
            arch["rotary_dim"] = 8
        recipes[name] = dict(recipe, arch=arch, steps=3, tokenizer=(recipe["tokenizer"][0], 300))
    return recipes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``embedded.main`` on tiny recipes and one seed: (folder holding assets/ and run/, overrides, stdout)."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    assets = tmp_path / "assets"
    overrides = [f"run.output_dir={tmp_path / 'run'}", f"corpus.inputs=[{assets}/prose.jsonl, {assets}/code.jsonl]",
                 f"target.path={assets}/target", "corpus.block_size=31", "train.seq_len=32",
                 "corpus.holdout_fraction=0.3",
                 "represent.k=4", "train.steps=4", "train.log_every=2", "train.eval_every=2"]
    overrides += [f"sources.{i}.path={assets}/{n}" for i, n in enumerate(("llama", "neox", "mpt"))]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out):
        monkeypatch.setattr(embedded, "PRETRAIN", TINY)
        assert embedded.main(None, overrides, recipes=_tiny_recipes(), seeds=(0,)) == 0  # as many runs as before
    return tmp_path, overrides, out.getvalue()


@pytest.mark.slow
def test_assets_pipeline_baseline_and_report(demo, monkeypatch):
    tmp_path, overrides, stdout = demo
    assets, recipes = tmp_path / "assets", _tiny_recipes()
    monkeypatch.setattr(embedded, "PRETRAIN", TINY)
    from fusejax.config import load_config
    from fusejax.schema import unpack_tables
    from fusejax.store import open_store

    cfg = load_config(embedded.DEFAULT_CONFIG, overrides)
    assert embedded.build_assets(cfg, recipes) == dict.fromkeys(["target", "llama", "neox", "mpt"], "reused")
    aligned = open_store(tmp_path / "run" / "aligned")
    assert aligned.meta["sources"] == ["llama", "neox", "mpt"] and len(aligned) > 0
    row = aligned.row(0)
    table_ids, _ = unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], 4)
    assert table_ids.shape[1:] == (3, 4) and np.all(table_ids[:-1, :, 0] >= 0)
    for name in ("llama", "neox", "mpt"):
        assert json.loads((assets / name / "recipe.json").read_text())["recipe"]["steps"] == 3
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert set(results["target"]["domains"]) == {"prose", "code"}
    for variant in ("clm_only", "fusellm"):
        run = results["runs"][variant]["0"]
        assert set(run["eval"]["domains"]) == {"prose", "code"} and 0 < run["eval"]["bits_per_byte"] < 20
        assert [step for step, _ in run["curve"]] == [2, 4]  # eval_every 2, then the final evaluation
        assert run["curve"][-1][1] == run["eval"]["bits_per_byte"]
        assert run["eval"]["bits_per_byte"] != results["target"]["bits_per_byte"]
    assert results["runs"]["clm_only"]["0"]["eval"] != results["runs"]["fusellm"]["0"]["eval"]
    assert (tmp_path / "run" / "export" / "config.json").is_file()
    assert "report.md" in stdout
    # the toy tasks, scored through the lm-eval backend: the target's multiple-choice accuracy is recomputed
    # with transformers (PyTorch) on its folder
    toy, tasks = results["toy_tasks"], tmp_path / "run" / "tasks"
    assert toy["paths"] == [str(tasks / f"{t}.yaml") for t in embedded.TASKS] and min(toy["examples"].values()) > 0
    assert set(toy["runs"]) == {"clm_only", "fusellm"} and all(set(r) == {"0"} for r in toy["runs"].values())
    for scores in [toy["target"], *(r["0"] for r in toy["runs"].values())]:
        assert scores.keys() == embedded.TASKS.keys() and all(0 <= v <= 1 for v in scores.values())
    mc = "embedded_real_continuation"
    assert toy["target"][mc] == pytest.approx(_choice_accuracy(assets / "target", tasks / f"{mc}.jsonl"))
    assert f"| {mc} (acc, {toy['examples'][mc]}) |" in (tmp_path / "run" / "report" / "report.md").read_text()


def _choice_accuracy(folder, data):
    """Accuracy of the transformers model in ``folder`` on a multiple-choice JSONL file: the choice with the
    highest summed log-probability, its tokens split off the whole text as lm-eval does (a context's trailing
    spaces moved to the continuation)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in open(data)]
    right = 0
    for row in rows:
        context = row["context"].rstrip()
        scores = []
        for choice in row["choices"]:
            whole = tok(row["context"] + choice)["input_ids"]
            n = len(tok(context)["input_ids"])
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(n, len(whole))))
        right += int(np.argmax(scores)) == row["label"]
    return right / len(rows)


def test_toy_tasks_come_from_heldout_documents_only(tmp_path):
    import yaml

    from fusejax.config import load_config
    from fusejax.corpus import is_heldout

    docs = embedded.fusion_documents(embedded.corpus_documents(60_000, 2_000), 2)
    paths = [tmp_path / "prose.jsonl", tmp_path / "code.jsonl"]
    embedded.write_corpus(paths, docs)
    cfg = load_config(embedded.DEFAULT_CONFIG,
                      [f"corpus.inputs=[{paths[0]}, {paths[1]}]", "corpus.holdout_fraction=0.3"])
    heldout = {d: [t for i, t in enumerate(docs[d]) if is_heldout(f"{d}.jsonl:{i}", 0, 0.3)] for d in docs}
    tasks = embedded.write_toy_tasks(cfg, tmp_path / "tasks")
    assert [p.stem for p in tasks] == list(embedded.TASKS)
    rows = {}
    for path in tasks:
        spec = yaml.safe_load(path.read_text())
        assert spec["task"] == path.stem and spec["output_type"] == embedded.TASKS[path.stem]
        data = spec["dataset_kwargs"]["data_files"]["test"]
        rows[path.stem] = [json.loads(line) for line in open(data)]
    mc = rows["embedded_real_continuation"]
    assert len(mc) == sum(min(len(t) // 320, 2) for d in heldout for t in heldout[d]) > len(heldout["code"])
    for r in mc:
        real = r["context"] + r["choices"][r["label"]]
        assert any(real in t for t in heldout[r["domain"]])  # the label is the real continuation
        assert not any(r["context"] + c in t for c in r["choices"] if c != r["choices"][r["label"]]
                       for t in heldout[r["domain"]])
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
    completion = rows["embedded_code_completion"]
    assert completion
    for r in completion:  # the last word of a line
        assert any(r["prompt"] + r["target"] + "\n" in t for t in heldout["code"]) and "\n" not in r["target"]
        assert r["target"].startswith(" ") and " " not in r["target"][1:] and r["target"].strip()


NOTEBOOK = Path(__file__).resolve().parents[1] / "launch" / "colab.ipynb"


@pytest.mark.slow
def test_colab_notebook_runs_step_by_step(demo, monkeypatch):
    """Every code cell of the Colab notebook but the install ones, in order, with the tiny settings of ``demo``
    and on its run folder (each stage finds its work done, the models their compiled programs: quick), with a
    stand-in for IPython.display that records what the notebook shows."""
    import sys
    import types

    from fusejax.schema import unpack_tables
    from fusejax.store import open_store

    tmp_path, overrides, _ = demo
    monkeypatch.setattr(embedded, "PRETRAIN", TINY)
    monkeypatch.chdir(tmp_path)
    shown = []
    display = types.ModuleType("IPython.display")
    display.display = lambda *objs: shown.extend(objs)
    display.Markdown = lambda text: ("markdown", text)
    display.Image = lambda path: ("image", Path(path))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=display))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    settings = {"OUT": str(tmp_path / "run"), "SEEDS": [0], "OVERRIDES": overrides, "RECIPES": _tiny_recipes(),
                "POSITION": 0}
    namespace, skipped = {}, 0
    for cell in cells:
        source, tags = "".join(cell["source"]), cell["metadata"].get("tags", [])
        assert not any(line.startswith("!") for line in source.splitlines()), "a shell line outside the install cells"
        if "install" in tags:
            skipped += 1
            continue
        if "parameters" in tags:  # the notebook's settings, replaced by the tiny ones
            defined = {}
            exec(compile(source, cell["id"], "exec"), defined)
            assert defined.keys() - {"__builtins__"} == settings.keys()
            namespace.update(settings)
            continue
        exec(compile(source, cell["id"], "exec"), namespace)
    assert skipped == 2
    images = [x[1] for x in shown if x[0] == "image"]
    assert [p.name for p in images] == ["gain.png", "token_efficiency.png"] and all(p.is_file() for p in images)
    markdown = [x[1] for x in shown if x[0] == "markdown"]
    assert any("## Toy downstream tasks" in text for text in markdown)
    # the alignment table: one row per target token (up to 24), a column per source, the fused top-3
    (alignment,) = [text for text in markdown if text.startswith("| target token |")]
    header, _, *rows = alignment.splitlines()
    assert header == "| target token | llama | neox | mpt | next target token | fused top-3 (min_ce) |"
    ex = namespace["ex"]
    assert len(rows) == min(24, len(ex["target"]))
    # explain against the aligned store: the same tables and CE, as many 1-to-1 partners as the store counted
    row = open_store(tmp_path / "run" / "aligned").row(0)
    assert len(ex["target"]) == len(row["input_ids"]) and ex["sources"] == ["llama", "neox", "mpt"]
    ids, logits = unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], 4)
    np.testing.assert_array_equal(ex["table_ids"], ids)
    np.testing.assert_array_equal(ex["table_logits"], logits)
    np.testing.assert_array_equal(ex["source_ce"], row["byte_ce"])  # configs/embedded.yaml: MinCE on CE per byte
    assert [sum(p[n] is not None for p in ex["paired"]) for n in range(3)] == row["align_counts"][:, 1].tolist()
