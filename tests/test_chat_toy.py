"""The toy chat fusion end to end (configs/chat-toy.yaml, fusejax.chat_toy) at tiny sizes: conversations from
pydoc_data, three tiny random chat models with different templates, pairwise fusion, the merge, one multi-source run
and the report of held-out assistant bits per byte."""

import json
import math
from pathlib import Path

import pytest

from fusejax import chat_toy, pipeline, stages
from fusejax.config import ConfigError, load_config, replace
from fusejax.schema import RunLayout
from fusejax.tokenizer import load_tokenizer


TINY = {name: {**recipe, "steps": 0, "arch": {**recipe["arch"], "hidden_size": 32, "intermediate_size": 32}}
        for name, recipe in chat_toy.RECIPES.items()}


@pytest.mark.slow  # end to end: ~120 s of CPU on 2 cores (seven runs' worth of compiles)
def test_toy_chat_fusion(tmp_path):
    out, assets = tmp_path / "run", tmp_path / "assets"
    overrides = [f"run.output_dir={out}", f"corpus.inputs=[{assets}/chat.jsonl]", f"target.path={assets}/target",
                 f"sources.0.path={assets}/alpha", f"sources.1.path={assets}/beta", "corpus.holdout_fraction=0.3",
                 "train.steps=2", "train.batch_size=8", "represent.batch_size=8", "eval.batch_size=8"]
    results = chat_toy.main(chat_toy.DEFAULT_CONFIG, overrides, recipes=TINY, max_topics=12)
    assert results["assets"] == {"target": "built", "alpha": "built", "beta": "built"}
    for name in ("alpha", "beta"):  # one target-sized fused model per source, with the target's chat template
        export = out / "pairs" / name / "export"
        assert json.loads((export / "config.json").read_text())["hidden_size"] == 32
        assert load_tokenizer(export).chat_template == load_tokenizer(assets / "target").chat_template
    assert results["merge"]["models"] == [str(out / "pairs" / n / "export") for n in ("alpha", "beta")]
    assert results["merge"]["base"] == str(assets / "target") and results["merge"]["method"] == "sce"
    evals = results["eval"]
    assert set(evals) == {"source alpha", "source beta", "target", "pair alpha", "pair beta", "pairwise + merge",
                          "one run, all sources"}
    assert all(math.isfinite(r["bits_per_byte"]) and r["tokens"] > 0 for r in evals.values())
    # every model is scored on the same assistant bytes, whatever its tokenizer and template
    assert len({r["bytes"] for r in evals.values()}) == 1
    assert (out / "report" / "report.md").read_text().count("|") > 7 * 5
    cfg = load_config(chat_toy.DEFAULT_CONFIG, overrides)
    assert chat_toy.build_assets(cfg, TINY, max_topics=12) == {"target": "reused", "alpha": "reused", "beta": "reused"}
    assert results["stages"]["merge"] == "ran"
    record = json.loads((out / "merge" / "stage.json").read_text())  # written again after the merge's own folder
    assert record["status"] == "complete" and record["started"] <= record["finished"]
    again = pipeline.run(cfg)  # every pair's stages and the merge are finished: skipped
    assert again == {"alpha": dict.fromkeys(stages.STAGE_NAMES, "skipped"),
                     "beta": dict.fromkeys(stages.STAGE_NAMES, "skipped"), "merge": "skipped"}


def test_pair_configs():
    cfg = load_config(chat_toy.DEFAULT_CONFIG, ["run.output_dir=out", "run.pairwise_target=true",
                                                "merge.dtype=bfloat16"])
    pairs = stages.pair_configs(cfg)
    assert [name for name, _ in pairs] == ["alpha", "beta"]
    for name, pair in pairs:
        assert pair.run.output_dir == f"out/pairs/{name}" and not pair.run.pairwise
        assert [s.name for s in pair.sources] == [name, "target"] and pair.sources[1].path == cfg.target.path
        assert pair.train == cfg.train and pair.corpus == cfg.corpus
        assert RunLayout.of(pair).corpus == Path("out/corpus")  # one corpus store for every pair
    merge = stages.pair_merge_config(cfg).merge
    assert merge.models == ("out/pairs/alpha/export", "out/pairs/beta/export")
    assert merge.base == cfg.target.path and merge.dtype == "bfloat16" and merge.method == "sce"
    with pytest.raises(ConfigError, match="leave merge.models empty"):
        stages.pair_merge_config(replace(cfg, "merge.models", ["x"]))
    with pytest.raises(ConfigError, match="source called 'target'"):
        stages.pair_configs(replace(cfg, "sources.0.name", "target"))
