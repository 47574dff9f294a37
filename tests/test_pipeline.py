"""`fusejax run`: stage order, skipping, redo on changed inputs, resume, and whole-config validation."""

import json
import os

import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusejax import pipeline, stages
from fusejax.config import ConfigError, load_config, replace
from fusejax.files import write_json
from fusejax.models import ModelConfig, Transformer, save_pretrained

ORDER = ["prepare", "represent", "vocab-map", "align", "train", "eval", "export"]


class FakeStages:
    """Stand-ins for the stage functions: each records its call and writes ``done.txt`` in its folder;
    ``fail`` names a stage that writes ``partial.txt`` and raises once (an interrupted run); ``refuse`` one that
    raises a ConfigError once, having written nothing (a refused command)."""

    def __init__(self, monkeypatch):
        self.calls, self.fail, self.refuse = [], None, None
        by_fn = {s.fn: s for s in (*stages.PIPELINE, stages.MERGE)}

        def resolve(spec):
            stage = by_fn[spec]

            def fn(cfg):
                self.calls.append(stage.name)
                folder = stage.output(cfg)
                if self.refuse == stage.name:
                    self.refuse = None
                    raise ConfigError(f"{stage.name}: refused")
                folder.mkdir(parents=True, exist_ok=True)
                if self.fail == stage.name:
                    self.fail = None
                    (folder / "partial.txt").write_text("half")
                    raise KeyboardInterrupt
                (folder / "done.txt").write_text(cfg.align.fallback)

            return fn

        monkeypatch.setattr(stages, "resolve", resolve)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"corpus.inputs=[{corpus}]",
                             f"target.path={tmp_path / 'target'}", "sources.0.name=a",
                             f"sources.0.path={tmp_path / 'a'}"])
    return cfg, FakeStages(monkeypatch), tmp_path


def test_runs_every_stage_in_order_then_skips_them(setup):
    cfg, fake, tmp = setup
    assert pipeline.run(cfg, validate_first=False) == dict.fromkeys(ORDER, "ran")
    assert fake.calls == ORDER
    for stage in stages.PIPELINE:
        record = json.loads((stage.output(cfg) / "stage.json").read_text())
        assert record["status"] == "complete" and record["stage"] == stage.name
    assert (tmp / "out" / "export" / "stage.json").is_file()
    fake.calls.clear()
    assert pipeline.run(cfg, validate_first=False) == dict.fromkeys(ORDER, "skipped")
    assert fake.calls == []


def test_stop_after_stops_there_whether_the_stage_ran_or_was_skipped(setup):
    cfg, fake, _ = setup
    assert pipeline.run(cfg, validate_first=False, stop_after="align") == dict.fromkeys(ORDER[:4], "ran")
    assert pipeline.run(cfg, validate_first=False, stop_after="align") == dict.fromkeys(ORDER[:4], "skipped")
    assert fake.calls == ORDER[:4]


def test_bookkeeping_settings_do_not_change_fingerprints(setup):
    cfg, *_ = setup
    busier = replace(replace(cfg, "train.log_every", 1), "train.checkpoint_every", 7)
    assert pipeline.fingerprints(busier) == pipeline.fingerprints(cfg)
    assert pipeline.fingerprints(replace(cfg, "align.workers", 3)) == pipeline.fingerprints(cfg)
    fly, stored = pipeline.fingerprints(replace(cfg, "align.on_the_fly", True)), pipeline.fingerprints(cfg)
    assert fly["vocab-map"] == stored["vocab-map"] and fly["align"] != stored["align"]  # no aligned store then
    assert pipeline.fingerprints(replace(cfg, "train.lr", 2e-5))["train"] != pipeline.fingerprints(cfg)["train"]


def test_changed_setting_redoes_that_stage_and_later_ones_and_keeps_the_old_output(setup):
    cfg, fake, tmp = setup
    pipeline.run(cfg, validate_first=False)
    old = json.loads((tmp / "out" / "aligned" / "stage.json").read_text())["fingerprint"]
    fake.calls.clear()
    changed = load_config(None, [f"{k}={v}" for k, v in _overrides(cfg).items()] + ["align.fallback=reference"])
    outcome = pipeline.run(changed, validate_first=False)
    assert fake.calls == ["align", "train", "eval", "export"]
    assert outcome == {**dict.fromkeys(ORDER[:3], "skipped"), **dict.fromkeys(ORDER[3:], "redone")}
    moved = tmp / "out" / "stale" / f"aligned-{old[:12]}"
    assert (moved / "done.txt").read_text() == "next_token"  # the old output is kept, moved aside
    assert (tmp / "out" / "aligned" / "done.txt").read_text() == "reference"


def test_changed_input_file_redoes_everything(setup):
    cfg, fake, tmp = setup
    pipeline.run(cfg, validate_first=False)
    fake.calls.clear()
    (tmp / "corpus.txt").write_text("other, longer text\n")
    assert pipeline.run(cfg, validate_first=False) == dict.fromkeys(ORDER, "redone")
    assert fake.calls == ORDER
    assert len(list((tmp / "out" / "stale").iterdir())) == len(ORDER)


def test_weights_changed_to_the_same_size_and_mtime_change_the_fingerprint(tmp_path):
    """Another random model saved over the source folder, modification times restored: only content differs."""
    config = ModelConfig(arch="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, max_position_embeddings=32)
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"corpus.inputs=[{tmp_path / 'a'}]",
                             f"target.path={tmp_path / 'a'}", "sources.0.name=a", f"sources.0.path={tmp_path / 'a'}"])
    save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), tmp_path / "a")
    times = {p: p.stat() for p in (tmp_path / "a").iterdir()}
    before = pipeline.fingerprints(cfg)
    save_pretrained(Transformer(config, rngs=nnx.Rngs(1)), tmp_path / "a")
    for p, st in times.items():
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in times} == {
        p: (st.st_size, st.st_mtime_ns) for p, st in times.items()}
    assert pipeline.fingerprints(cfg)["represent"] != before["represent"]


def test_pairwise_merge_is_skipped_until_its_inputs_change(setup):
    """run.pairwise: the merge of the pairs' exports runs once, then is skipped; a merge setting, a pair's export
    redone or an exported file edited by hand redo it (the old merge moved aside)."""
    cfg, fake, tmp = setup
    cfg = replace(cfg, "run.pairwise", True)
    assert pipeline.run(cfg, validate_first=False) == {"a": dict.fromkeys(ORDER, "ran"), "merge": "ran"}
    assert fake.calls == ORDER + ["merge"]
    merged = tmp / "out" / "merge"
    assert json.loads((merged / "stage.json").read_text())["status"] == "complete"
    fake.calls.clear()
    assert pipeline.run(cfg, validate_first=False) == {"a": dict.fromkeys(ORDER, "skipped"), "merge": "skipped"}
    assert fake.calls == []
    denser = replace(cfg, "merge.density", 0.5)
    assert pipeline.run(denser, validate_first=False)["merge"] == "redone" and fake.calls == ["merge"]
    fake.calls.clear()
    changed = replace(denser, "align.fallback", "reference")  # the pair's align, train, eval and export redone
    assert pipeline.run(changed, validate_first=False)["merge"] == "redone"
    assert fake.calls == ["align", "train", "eval", "export", "merge"]
    fake.calls.clear()
    (tmp / "out" / "pairs" / "a" / "export" / "done.txt").write_text("edited")
    assert pipeline.run(changed, validate_first=False) == {"a": dict.fromkeys(ORDER, "skipped"), "merge": "redone"}
    assert fake.calls == ["merge"] and pipeline.run(changed, validate_first=False)["merge"] == "skipped"
    assert len(list((tmp / "out" / "stale").glob("merge-*"))) == 3 and (merged / "done.txt").is_file()


def test_pairs_share_one_corpus_prepared_once_and_resumed(setup):
    cfg, fake, tmp = setup
    cfg = replace(replace(cfg, "run.pairwise", True), "sources.1", {"name": "b", "path": str(tmp / "b")})
    assert [stages.RunLayout.of(pair).corpus for _, pair in stages.pair_configs(cfg)] == [tmp / "out" / "corpus"] * 2
    fake.fail = "prepare"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, validate_first=False)
    fake.calls.clear()
    outcome = pipeline.run(cfg, validate_first=False)
    assert outcome["a"]["prepare"] == "resumed" and outcome["b"]["prepare"] == "skipped"
    assert fake.calls == ORDER + ORDER[1:] + ["merge"]  # prepared once, for the first pair
    assert not (tmp / "out" / "pairs" / "a" / "corpus").exists()


def test_interrupted_stage_is_resumed_not_moved(setup):
    cfg, fake, tmp = setup
    fake.fail = "train"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, validate_first=False)
    assert fake.calls == ORDER[:5]
    assert json.loads((tmp / "out" / "train" / "stage.json").read_text())["status"] == "running"
    fake.calls.clear()
    outcome = pipeline.run(cfg, validate_first=False)
    assert fake.calls == ["train", "eval", "export"]
    assert outcome["train"] == "resumed" and outcome["align"] == "skipped"
    assert (tmp / "out" / "train" / "partial.txt").is_file()  # the stage found its partial output in place
    assert not (tmp / "out" / "stale").exists()


def test_output_without_record_is_adopted_by_resuming(setup):
    cfg, fake, tmp = setup
    (tmp / "out" / "corpus").mkdir(parents=True)  # e.g. written by an older fusejax
    assert pipeline.run(cfg, validate_first=False)["prepare"] == "resumed"


def test_a_stage_run_again_redoes_the_later_complete_stages(setup):
    """Once a stage is not skipped its output may have changed, so every later stage is redone even when its
    own record is complete with the same fingerprint (the old output moved aside)."""
    cfg, fake, tmp = setup
    pipeline.run(cfg, validate_first=False)
    train = stages.PIPELINE[ORDER.index("train")].output(cfg)
    write_json(train / "stage.json", {**pipeline.read_record(train), "status": "running"})  # e.g. interrupted
    fake.calls.clear()
    outcome = pipeline.run(cfg, validate_first=False)
    assert outcome == {**dict.fromkeys(ORDER[:4], "skipped"), "train": "resumed", "eval": "redone",
                       "export": "redone"}
    assert fake.calls == ["train", "eval", "export"]
    prints = pipeline.fingerprints(cfg)
    assert sorted(p.name for p in (tmp / "out" / "stale").iterdir()) == [
        f"eval-{prints['eval'][:12]}", f"export-{prints['export'][:12]}"]
    fake.calls.clear()
    assert pipeline.run(cfg, validate_first=False) == dict.fromkeys(ORDER, "skipped") and fake.calls == []


def test_single_stage_command_records_itself_so_run_redoes_what_it_changed(setup):
    """The reported defect: `fusejax train` with other settings over a finished run, then `fusejax run` with the
    run's config retrains (the command's output moved aside) and redoes eval and export instead of skipping."""
    from fusejax import cli

    cfg, fake, tmp = setup
    args = [f"{k}={v}" for k, v in _overrides(cfg).items()]
    pipeline.run(cfg, validate_first=False)
    fake.calls.clear()
    assert cli.main(["train", *args, "train.steps=7"]) == 0
    assert fake.calls == ["train"] and not (tmp / "out" / "stale").exists()  # neither skipped nor moved aside
    record = json.loads((tmp / "out" / "train" / "stage.json").read_text())
    assert record["fingerprint"] is None and record["status"] == "complete"  # resumed over the run's output
    fake.calls.clear()
    outcome = pipeline.run(cfg, validate_first=False)
    assert outcome == {**dict.fromkeys(ORDER[:4], "skipped"), **dict.fromkeys(ORDER[4:], "redone")}
    assert fake.calls == ORDER[4:] and (tmp / "out" / "stale" / "train-mixed" / "done.txt").is_file()
    # on a fresh folder the command records its own fingerprint; `run` with another config redoes the stage
    other = load_config(None, args + ["run.output_dir=" + str(tmp / "other")])
    fake.fail, fake.calls = "prepare", []  # interrupted: resumed by a run with the same config
    assert cli.main(["prepare", *args, f"run.output_dir={tmp / 'other'}"]) == 130
    running = json.loads((tmp / "other" / "corpus" / "stage.json").read_text())
    assert cli.main(["prepare", *args, f"run.output_dir={tmp / 'other'}"]) == 0
    record = json.loads((tmp / "other" / "corpus" / "stage.json").read_text())
    assert running["status"] == "running" and record["status"] == "complete"
    assert running["fingerprint"] == record["fingerprint"] == pipeline.fingerprints(other)["prepare"]
    assert pipeline.run(other, validate_first=False)["prepare"] == "skipped"
    assert pipeline.run(replace(other, "corpus.block_size", 64), validate_first=False)["prepare"] == "redone"


def test_a_refused_single_stage_command_leaves_the_record_as_it_was(setup, capsys):
    """A command with other settings that is refused before writing anything (e.g. train.seq_len too short for
    the blocks) keeps the finished run's record, so `fusejax run` still skips every stage."""
    from fusejax import cli

    cfg, fake, tmp = setup
    args = [f"{k}={v}" for k, v in _overrides(cfg).items()]
    pipeline.run(cfg, validate_first=False)
    record = (tmp / "out" / "train" / "stage.json").read_text()
    fake.refuse = "train"
    assert cli.main(["train", *args, "train.steps=7"]) == 2
    assert "train: refused" in capsys.readouterr().err
    assert (tmp / "out" / "train" / "stage.json").read_text() == record
    fake.calls.clear()
    assert set(pipeline.run(cfg, validate_first=False).values()) == {"skipped"} and fake.calls == []


def test_fingerprints_chain_through_upstream_stages(setup):
    cfg, _, _ = setup
    base = pipeline.fingerprints(cfg)
    changed = pipeline.fingerprints(load_config(None, [f"{k}={v}" for k, v in _overrides(cfg).items()]
                                                + ["represent.k=5"]))
    same = [name for name in ORDER if base[name] == changed[name]]
    assert same == ["prepare"]


def _overrides(cfg):
    return {"run.output_dir": cfg.run.output_dir, "corpus.inputs": f"[{cfg.corpus.inputs[0]}]",
            "target.path": cfg.target.path, "sources.0.name": "a", "sources.0.path": cfg.sources[0].path}


# ----------------------------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tokenizer (~300 tokens) and model folders: ``good`` (vocab 384, context 64, hidden 32) and
    ``bad`` (vocab 100 < tokenizer, context 16, hidden 36 that does not divide fsdp=8)."""
    root = tmp_path_factory.mktemp("models")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(["def f(x):\n    return x + 1\n" * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    for name, vocab, context, hidden in (("good", 384, 64, 32), ("bad", 100, 16, 36)):
        config = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_layers=1,
                             num_heads=2, max_position_embeddings=context)
        save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), root / name)
        tok.save_pretrained(root / name)
    (root / "corpus.txt").write_text("hello\n")
    return root


def _cfg(root, *overrides):
    return load_config(None, [f"corpus.inputs=[{root / 'corpus.txt'}]", f"target.path={root / 'good'}",
                              "sources.0.name=s", f"sources.0.path={root / 'good'}", "corpus.block_size=32",
                              "train.seq_len=64", "train.batch_size=8", *overrides])


def test_a_good_config_has_no_problems(folders):
    assert pipeline.validate(_cfg(folders), n_devices=8) == []


def test_validation_lists_every_problem_at_once(folders, tmp_path):
    cfg = _cfg(folders, f"corpus.inputs=[{tmp_path / 'missing.txt'}]", f"sources.0.path={folders / 'bad'}",
               "sources.1.name=t", f"sources.1.path={tmp_path / 'nowhere'}", "train.seq_len=20",
               "represent.k=200", "train.batch_size=4")
    with pytest.raises(ConfigError) as err:
        pipeline.validate(cfg, raise_error=True, n_devices=8)
    text = str(err.value)
    expected = [
        "corpus.inputs.0: " + str(tmp_path / "missing.txt") + " does not exist",
        "train.seq_len=20: must be >= corpus.block_size + 1 = 33",
        "train.batch_size=4: the micro-batch of 4 sequences",  # fsdp fills all 8 devices
        "sources.0: tokenizer",  # ~300 tokens for a vocabulary of 100
        "sources.0.path=" + str(folders / "bad") + ": context 16 < corpus.block_size + 1 = 33",
        "represent.k=200: more than the vocabulary",
        "weights do not fit the mesh",  # hidden 36 over fsdp=8
        "sources.1.path: " + str(tmp_path / "nowhere") + " does not exist",
        "sources.1.tokenizer",
    ]
    for fragment in expected:
        assert fragment in text, fragment
    assert text.startswith(f"{text.count(chr(10) + '  - ')} problem(s)")


def test_validation_of_sizes_against_the_target_context_and_int32(folders):
    problems = pipeline.validate(_cfg(folders, "train.seq_len=65", "train.batch_size=40000000"), n_devices=8)
    assert problems == ["train.seq_len=65: more than the target's context (max_position_embeddings = 64)",
                        "train.batch_size=40000000 x train.seq_len=65 = 2600000000 tokens per batch: more than int32 "
                        "counts (2147483647)"]


def test_validation_of_mesh_and_missing_sources(folders):
    cfg = load_config(None, ["mesh.data=3", "mesh.fsdp=1", f"target.path={folders / 'good'}"])
    problems = pipeline.validate(cfg, n_devices=8)
    assert any(p.startswith("sources: the config lists no sources") for p in problems)
    assert any(p.startswith("corpus.inputs: empty") for p in problems)
    assert any(p.startswith("mesh: ") and "needs 3 devices but 8" in p for p in problems)


def test_run_validates_before_any_stage(setup):
    cfg, fake, _ = setup
    with pytest.raises(ConfigError, match="problem"):
        pipeline.run(cfg)
    assert fake.calls == []
    assert not os.path.exists(cfg.run.output_dir)


def test_outputs_never_overwrite_or_move_inputs(tmp_path, capsys):
    from fusejax import cli

    target, corpus, out = tmp_path / "target", tmp_path / "docs", tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"the user's weights")
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n")
    base = [f"target.path={target}", "sources.0.name=a", f"sources.0.path={target}", f"corpus.inputs=[{corpus}]"]
    cases = [
        ([f"run.output_dir={out}", f"export.path={target}"], f"export.path ({target}) would overwrite or move the "
                                                             f"input target.path={target}"),
        ([f"run.output_dir={out}", f"export.path={out}"], f"export.path ({out}) is or contains run.output_dir"),
        ([f"run.output_dir={corpus / 'run'}"], f"would overwrite or move the input corpus.inputs.0={corpus}"),
        ([f"run.output_dir={out}", f"export.path={out / 'train'}"], "overlaps the train folder"),
        ([f"run.output_dir={target.parent}", f"export.path={out}", f"target.path={target.parent / 'train'}"],
         "train (" + str(target.parent / "train") + ") would overwrite or move the input target.path"),
    ]
    for overrides, message in cases:
        cfg = load_config(None, base + overrides)
        problems = stages.output_conflicts(cfg)
        assert any(message in p for p in problems), (overrides, problems)
        assert any(message in p for p in pipeline.validate(cfg, n_devices=8)), overrides
    prompts = tmp_path / "prompts.txt"
    command_cases = [  # the outputs of `fusejax merge` and `fusejax generate`
        ("merge", [f"merge.path={target}"], f"merge.path ({target}) would overwrite or move the input target.path"),
        ("merge", [f"merge.models=[{corpus}]", f"merge.path={corpus / 'm'}"],
         "would overwrite or move the input merge.models.0"),
        ("merge", [f"merge.path={out}"], f"merge.path ({out}) is or contains run.output_dir"),
        ("merge", [f"merge.path={out / 'train'}"], "overlaps the train folder"),
        ("generate", [f"generate.output={corpus / 'a.txt'}"], "generate.output (" + str(corpus / "a.txt") +
         ") would overwrite or move the input corpus.inputs.0"),
        ("generate", [f"generate.prompts={prompts}", f"generate.output={prompts}"],
         "would overwrite or move the input generate.prompts"),
    ]
    for command, overrides, message in command_cases:
        cfg = load_config(None, base + [f"run.output_dir={out}"] + overrides)
        assert any(message in p for p in stages.output_conflicts(cfg, command)), (overrides, message)
        assert not any(message in p for p in stages.output_conflicts(cfg)), overrides
    # a single stage refuses before it runs, in one line, and the input stays as it was
    assert cli.main(["export", *base, f"run.output_dir={out}", f"export.path={target}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"export.path ({target}) would overwrite" in err
    assert (target / "model.safetensors").read_bytes() == b"the user's weights"
    # inputs elsewhere under the run folder are fine (the embedded default keeps its models there)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"target.path={target}", "sources.0.name=a",
                             f"sources.0.path={target}", f"corpus.inputs=[{corpus}]"])
    assert stages.output_conflicts(cfg) == []


def test_a_model_folder_is_written_only_over_an_earlier_one(tmp_path, capsys):
    """export.path and merge.path replace an absent or empty folder or an earlier export / merge (its
    stage.json says so); a folder holding anything else, or a file, is refused in one line and kept."""
    from fusejax import cli

    corpus, out, other = tmp_path / "docs", tmp_path / "out", tmp_path / "other"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n")
    other.mkdir()
    (other / "README.md").write_text("notes")
    (other / "corpus").mkdir()
    base = ["sources.0.name=a", f"sources.0.path={tmp_path / 'src'}", f"corpus.inputs=[{corpus}]",
            f"run.output_dir={out}"]
    for key, command, stage in (("export.path", None, "export"), ("merge.path", "merge", "merge")):
        problems = "; ".join(stages.output_conflicts(load_config(None, base + [f"{key}={other}"]), command))
        assert f"{key} ({other}) already holds 2 entries that no fusejax {stage} wrote (README.md, corpus)" in problems
        problems = "; ".join(stages.output_conflicts(load_config(None, base + [f"{key}={corpus / 'a.txt'}"]), command))
        assert f"{key} ({corpus / 'a.txt'}) is a file" in problems
        empty, earlier, foreign = tmp_path / f"empty-{stage}", tmp_path / f"earlier-{stage}", tmp_path / f"x-{stage}"
        for folder, record in ((empty, None), (earlier, stage), (foreign, "train")):
            folder.mkdir()
            if record:
                (folder / "config.json").write_text("{}")
                (folder / stages.RECORD).write_text(json.dumps({"stage": record, "status": "complete"}))
        for folder in (empty, earlier):
            assert stages.output_conflicts(load_config(None, base + [f"{key}={folder}"]), command) == []
        assert stages.output_conflicts(load_config(None, base + [f"{key}={foreign}"]), command)
    # the CLI refuses before writing anything
    assert cli.main(["merge", *base, f"merge.models=[{tmp_path / 'src'}]", f"merge.path={other}"]) == 2
    assert "merge.path" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["README.md", "corpus"]
