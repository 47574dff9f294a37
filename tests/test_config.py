"""fusejax.config: YAML with base inheritance, dotted overrides, type checks, clear errors, resolved round trip."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from fusejax.config import (
    Config,
    ConfigError,
    SourceConfig,
    config_to_dict,
    iter_fields,
    load_config,
    replace,
    save_resolved,
)

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def flat_keys(data, prefix=""):
    """Dotted leaf keys of a nested mapping (lists and empty mappings are leaves)."""
    keys = []
    for k, v in data.items():
        if isinstance(v, dict) and v:
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


# ------------------------------------------------------------------------------------------- shipped files


def test_default_yaml_equals_dataclass_defaults_and_documents_every_field():
    raw = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    assert load_config(ROOT / "configs/default.yaml") == Config()
    expected = sorted(k for k, *_ in iter_fields() if ".N." not in k)
    assert sorted(flat_keys(raw)) == expected


def test_example_yaml_inherits_defaults():
    cfg = load_config(ROOT / "configs/example.yaml")
    assert [s.name for s in cfg.sources] == ["llama2", "openllama", "mpt"]
    assert cfg.train.batch_size == 128 and cfg.train.warmup_ratio == 0.008
    assert cfg.train.lr == 1e-5 and cfg.represent.k == 10  # from default.yaml


def test_no_file_gives_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.lr == 1e-5 and cfg.mesh.fsdp == -1 and cfg.sources == () and cfg.corpus.block_size == 2048


# ------------------------------------------------------------------------------------------- inheritance


def test_two_level_base_merges_mappings_and_replaces_lists(tmp_path):
    write(
        tmp_path / "grand.yaml",
        "train: {lr: 1.0e-4, steps: 5, batch_size: 4}\n"
        "corpus: {inputs: [x.txt, y.txt], block_size: 64}\n"
        "sources: [{name: a, path: pa}, {name: b, path: pb}]\n",
    )
    write(tmp_path / "mid.yaml", "base: grand.yaml\ntrain: {lr: 2.0e-4}\ncorpus: {inputs: [z.txt]}\n")
    write(tmp_path / "sub/child.yaml", "base: ../mid.yaml\ntrain: {steps: 7}\n")
    cfg = load_config(tmp_path / "sub/child.yaml")
    assert cfg.train.lr == 2e-4  # mid over grand
    assert cfg.train.steps == 7  # child over grand
    assert cfg.train.batch_size == 4  # grand, untouched by mid/child mappings
    assert cfg.corpus.inputs == ("z.txt",)  # list replaced, not concatenated
    assert cfg.corpus.block_size == 64
    assert cfg.sources == (SourceConfig(name="a", path="pa"), SourceConfig(name="b", path="pb"))


def test_base_list_later_wins_and_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    write(tmp_path / "common/a.yaml", "train: {lr: 1.0e-3, steps: 3}\nrun: {seed: 1}\n")
    write(tmp_path / "common/b.yaml", "train: {lr: 2.0e-3}\n")
    write(tmp_path / "exp/run.yaml", "base: [../common/a.yaml, ../common/b.yaml]\nrun: {seed: 9}\n")
    monkeypatch.chdir(tmp_path / "common")  # the working directory must not matter
    cfg = load_config(tmp_path / "exp/run.yaml")
    assert (cfg.train.lr, cfg.train.steps, cfg.run.seed) == (2e-3, 3, 9)


@pytest.mark.parametrize("self_cycle", [False, True])
def test_base_cycle_is_an_error(tmp_path, self_cycle):
    if self_cycle:
        write(tmp_path / "a.yaml", "base: a.yaml\n")
    else:
        write(tmp_path / "a.yaml", "base: b.yaml\n")
        write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(e.value) and (self_cycle or "b.yaml" in str(e.value))


def test_shared_base_twice_is_not_a_cycle(tmp_path):
    write(tmp_path / "common.yaml", "run: {seed: 5}\n")
    write(tmp_path / "left.yaml", "base: common.yaml\n")
    write(tmp_path / "right.yaml", "base: common.yaml\ntrain: {lr: 3.0e-4}\n")
    write(tmp_path / "top.yaml", "base: [left.yaml, right.yaml]\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.run.seed == 5 and cfg.train.lr == 3e-4


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "base: missing_base.yaml\n")
    with pytest.raises(ConfigError, match="missing_base.yaml.*not found"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "b.yaml", "base: 3\n")
    with pytest.raises(ConfigError, match="'base' in .*b.yaml"):
        load_config(tmp_path / "b.yaml")


# ------------------------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_scalars_by_type():
    cfg = load_config(
        overrides=[
            "train.lr=2e-5",
            "train.steps=100",
            "train.clip_norm=2",  # int accepted for float
            "vocab_map.co_occurrence=true",
            "train.fusion=avg_ce",
            "corpus.text_field=2024",  # a string setting keeps the text
            "corpus.inputs=[a.txt, b.jsonl]",
        ]
    )
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 100 and cfg.train.clip_norm == 2.0 and isinstance(cfg.train.clip_norm, float)
    assert cfg.vocab_map.co_occurrence is True
    assert cfg.train.fusion == "avg_ce" and cfg.corpus.text_field == "2024"
    assert cfg.corpus.inputs == ("a.txt", "b.jsonl")


def test_overrides_come_after_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {lr: 1.0e-3, steps: 4}\n")
    cfg = load_config(path, ["train.lr=5e-4"])
    assert (cfg.train.lr, cfg.train.steps) == (5e-4, 4)


def test_override_list_entries_by_index_and_append(tmp_path):
    path = write(tmp_path / "c.yaml", "sources: [{name: a, path: pa}]\n")
    cfg = load_config(path, ["sources.0.path=new", "sources.1.name=b", "sources.1.path=pb", "sources.1.tokenizer=tb"])
    assert cfg.sources == (SourceConfig(name="a", path="new"), SourceConfig(name="b", path="pb", tokenizer="tb"))
    assert cfg.sources[0].tokenizer_path == "new" and cfg.sources[1].tokenizer_path == "tb"
    with pytest.raises(ConfigError, match="'sources.3'.*list of 1 entries"):
        load_config(path, ["sources.3.name=c"])
    with pytest.raises(ConfigError, match="'sources.x'"):
        load_config(path, ["sources.x.name=c"])


def test_override_null_and_lists_in_mesh_rules():
    cfg = load_config(overrides=["mesh.rules.vocab=null", "mesh.rules.batch=[data, fsdp]", "mesh.rules.mlp=fsdp"])
    assert cfg.mesh.rules == {"vocab": None, "batch": ("data", "fsdp"), "mlp": "fsdp"}


def test_override_of_a_section_merges_into_it(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {lr: 1.0e-3, steps: 4}\n")
    cfg = load_config(path, ["train={steps: 9}"])
    assert (cfg.train.lr, cfg.train.steps) == (1e-3, 9)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.lr", "not of the form key=value"),
        ("=3", "not of the form key=value"),
        ("train.lr=abc", r"'train.lr' in override 'train.lr=abc': expected a number, got 'abc'"),
        ("train.steps=1.5", r"'train.steps'.*expected an integer"),
        ("train.lr=[1", "invalid YAML value in override"),
        ("train.lr.x=1", "'train.lr' is a float, not a section"),
        ("train.lr=-1", r"'train.lr'.*must be > 0, got -1"),
        ("train.lrr=1", r"unknown key 'train.lrr' in override 'train.lrr=1'; did you mean 'train.lr'\?"),
    ],
)
def test_bad_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


# ------------------------------------------------------------------------------------------- errors in files


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"unknown key 'train.lrr' in {path}; did you mean 'train.lr'?"


@pytest.mark.parametrize(
    "text, key, suggestion",
    [
        ("lr: 1\n", "lr", "train.lr"),  # a setting put in the wrong section
        ("trian: {lr: 1}\n", "trian", "train"),
        ("sources: [{name: a, pth: p}]\n", "sources.0.pth", "sources.0.path"),
    ],
)
def test_unknown_key_suggestions(tmp_path, text, key, suggestion):
    path = write(tmp_path / "x.yaml", text)
    with pytest.raises(ConfigError, match=f"unknown key '{key}' in .*x.yaml; did you mean '{suggestion}'"):
        load_config(path)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path / "x.yaml", "eval: {zzzzzz: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'eval.zzzzzz'.*valid keys here: batch_size, max_batches"):
        load_config(path)


def test_error_names_the_base_file_that_holds_the_mistake(tmp_path):
    write(tmp_path / "base.yaml", "represent: {k: ten}\n")
    path = write(tmp_path / "child.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"'represent.k' in .*base.yaml: expected an integer, got 'ten'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("train: {lr: abc}", "train.lr", "expected a number"),
        ("train: {steps: 1.5}", "train.steps", "expected an integer"),
        ("run: {seed: true}", "run.seed", "expected an integer"),  # bool is not an int
        ("train: {lr: true}", "train.lr", "expected a number"),
        ("vocab_map: {co_occurrence: 'yes'}", "vocab_map.co_occurrence", "expected true or false"),
        ("run: {output_dir: 3}", "run.output_dir", "expected a string"),
        ("corpus: {text_field: [a]}", "corpus.text_field", "expected a string"),
        ("corpus: {inputs: a.txt}", "corpus.inputs", "expected a list"),
        ("corpus: {inputs: [a.txt, 3]}", "corpus.inputs.1", "expected a string"),
        ("sources: {name: a}", "sources", "expected a list"),
        ("train: 3", "train", "expected a mapping of TrainConfig settings"),
        ("mesh: {rules: [vocab]}", "mesh.rules", "expected a mapping"),
        ("mesh: {rules: {vocab: 3}}", "mesh.rules.vocab", "expected str | list[str] | null"),
        ("mesh: {fsdp: 0}", "mesh.fsdp", "must be a positive integer or -1"),
        ("corpus: {holdout_fraction: 1}", "corpus.holdout_fraction", r"must be in \[0, 1\)"),
        ("train: {lm_weight: 1.5}", "train.lm_weight", r"must be in \[0, 1\]"),
        ("represent: {k: 0}", "represent.k", "must be > 0"),
        ("run: {seed: -1}", "run.seed", r"must be in \[0, 2\*\*63\)"),
        ("run: {seed: 9223372036854775808}", "run.seed", r"must be in \[0, 2\*\*63\)"),
        ("train: {lr: .inf}", "train.lr", "expected a finite number, got inf"),
        ("train: {lr: 1e400}", "train.lr", "expected a finite number, got inf"),
        ("train: {weight_decay: .nan}", "train.weight_decay", "expected a finite number, got nan"),
        ("mesh: {device_memory_gib: .inf}", "mesh.device_memory_gib", "expected a finite number"),
        (f"train: {{peak_flops: 1{'0' * 400}}}", "train.peak_flops", "expected a finite number"),
    ],
)
def test_wrong_types_and_values(tmp_path, text, key, problem):
    path = write(tmp_path / "bad.yaml", text + "\n")
    with pytest.raises(ConfigError, match=f"bad value for '{key}' in {path}: {problem}"):
        load_config(path)


@pytest.mark.parametrize("text", ["train.lr=.inf", "train.lr=-.inf", "train.lr=1e400", "train.clip_norm=.nan",
                                  "train.lr=nan"])
def test_non_finite_overrides_are_refused(text):
    key = text.partition("=")[0]
    with pytest.raises(ConfigError, match=f"bad value for '{key}' in override '{text}': expected a (finite )?number"):
        load_config(overrides=[text])


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**400], ids=["inf", "nan", "huge int"])
def test_non_finite_values_in_python_are_refused(value):
    with pytest.raises(ConfigError, match="'train.lr' in replace.*expected a finite number"):
        replace(Config(), "train.lr", value)


def test_literal_choices(tmp_path):
    for choice in ["min_ce", "avg_ce", "avg_ce_norm"]:
        assert load_config(overrides=[f"train.fusion={choice}"]).train.fusion == choice
    for choice in ["hard", "hard_and_decay", "soft"]:
        assert load_config(overrides=[f"train.schedule={choice}"]).train.schedule == choice
    path = write(tmp_path / "x.yaml", "train: {fusion: max_ce}\n")
    with pytest.raises(ConfigError, match="'train.fusion'.*one of 'min_ce', 'avg_ce', 'avg_ce_norm', got 'max_ce'"):
        load_config(path)
    with pytest.raises(ConfigError, match="'represent.logits_dtype'.*got 'fp8'"):
        load_config(overrides=["represent.logits_dtype=fp8"])


def test_yaml_syntax_and_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML in .*broken.yaml.*line 2"):
        load_config(write(tmp_path / "broken.yaml", "train:\n  lr: [1\n"))
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(write(tmp_path / "dup.yaml", "train:\n  lr: 1.0\n  lr: 2.0\n"))
    with pytest.raises(ConfigError, match="list.yaml must hold a YAML mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_config(write(tmp_path / "empty.yaml", "# nothing\n")) == Config()


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_config_file_that_is_not_utf8(tmp_path, encoding):
    path = tmp_path / "x.yaml"
    path.write_bytes("run: {output_dir: caf\u00e9}\n".encode(encoding))
    with pytest.raises(ConfigError, match=f"config file {path} is not UTF-8 text"):
        load_config(path)


def test_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", "train: {lr: 3e-5, peak_flops: 1E15}\n"))
    assert cfg.train.lr == 3e-5 and cfg.train.peak_flops == 1e15


def test_cross_field_checks(tmp_path):
    dup = write(tmp_path / "dup.yaml", "sources: [{name: a, path: p}, {name: a, path: q}]\n")
    with pytest.raises(ConfigError, match=r"'sources.1.name' in .*dup.yaml: duplicate source name \(also sources.0\)"):
        load_config(dup)
    with pytest.raises(ConfigError, match="'sources.0.name'.*non-empty name"):
        load_config(write(tmp_path / "noname.yaml", "sources: [{path: p}]\n"))
    with pytest.raises(ConfigError, match="'train.grad_accum'.*must divide train.batch_size=8, got 3"):
        load_config(overrides=["train.grad_accum=3"])
    with pytest.raises(ConfigError, match="'train.loss_chunk'.*must divide train.seq_len=2048, got 300"):
        load_config(overrides=["train.loss_chunk=300"])
    assert load_config(overrides=["train.seq_len=100", "train.loss_chunk=300"]).train.loss_chunk == 300  # one chunk
    with pytest.raises(ConfigError, match="'mesh.rules.vocab'.*mesh axes are data, fsdp, tensor, got 'model'"):
        load_config(overrides=["mesh.rules.vocab=model"])
    with pytest.raises(ConfigError, match="unknown key 'mesh.rules.vocb'.*did you mean 'mesh.rules.vocab'"):
        load_config(overrides=["mesh.rules.vocb=null"])


# ------------------------------------------------------------------------------------------- data=, replace


def test_data_dict_merges_over_the_file_and_is_not_mutated(tmp_path, monkeypatch):
    path = write(tmp_path / "c.yaml", "train: {lr: 1.0e-3, steps: 4}\n")
    data = {"train": {"steps": 8}, "sources": [{"name": "s", "path": "p"}]}
    cfg = load_config(path, ["train.lr=7e-4"], data=data)
    assert (cfg.train.lr, cfg.train.steps, cfg.sources[0].name) == (7e-4, 8, "s")
    assert data == {"train": {"steps": 8}, "sources": [{"name": "s", "path": "p"}]}
    monkeypatch.chdir(tmp_path)
    assert load_config(data={"base": "c.yaml", "run": {"seed": 3}}).train.steps == 4  # base relative to cwd
    with pytest.raises(ConfigError, match="unknown key 'train.lrr' in data"):
        load_config(data={"train": {"lrr": 1}})


def test_replace_returns_a_checked_copy():
    cfg = Config()
    new = replace(cfg, "train.lr", 2e-5)
    assert new.train.lr == 2e-5 and cfg.train.lr == 1e-5
    assert new.train.steps == cfg.train.steps and new.corpus == cfg.corpus
    two = replace(replace(new, "sources.0", {"name": "a", "path": "p"}), "sources.1.name", "b")
    assert [s.name for s in two.sources] == ["a", "b"]
    with pytest.raises(ConfigError, match="'train.lr'.*expected a number"):
        replace(cfg, "train.lr", "fast")


def test_config_is_frozen_and_scalar_sections_hash():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    assert hash(cfg.train) == hash(replace(cfg, "train.lr", 1e-5).train)  # usable as a static jit argument


def test_tokenizer_path_defaults_to_model_path():
    cfg = load_config(overrides=["target.path=models/t"])
    assert cfg.target.tokenizer_path == "models/t"
    assert replace(cfg, "target.tokenizer", "tok").target.tokenizer_path == "tok"
    with pytest.raises(ConfigError, match="neither 'tokenizer' nor 'path'"):
        Config().target.tokenizer_path


# ------------------------------------------------------------------------------------------- resolved


def test_resolved_round_trip(tmp_path):
    cfg = load_config(
        ROOT / "configs/example.yaml",
        ["train.lr=1.234567e-5", "mesh.rules.batch=[data, fsdp]", "mesh.rules.vocab=null", "corpus.text_field=x: y"],
    )
    out = save_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.resolved.yaml"
    assert load_config(out) == cfg
    assert os.listdir(tmp_path / "run") == ["config.resolved.yaml"]  # no temp file left behind
    save_resolved(replace(cfg, "train.steps", 3), tmp_path / "run")  # overwrite in place
    assert load_config(out).train.steps == 3
    assert yaml.safe_load(out.read_text())["train"]["lr"] == 1.234567e-5  # plain YAML for other tools


def test_config_to_dict_is_plain_data():
    d = config_to_dict(load_config(overrides=["corpus.inputs=[a]", "sources.0.name=s", "sources.0.path=p"]))
    assert d["corpus"]["inputs"] == ["a"]
    assert d["sources"] == [{"path": "p", "tokenizer": None, "chat_template": None, "name": "s"}]
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_iter_fields_covers_every_dataclass_field():
    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                yield from walk(type(default), prefix + f.name + ".")
            else:
                yield prefix + f.name, f.metadata["help"]

    listed = {key: help_text for key, _, _, help_text in iter_fields()}
    expected = dict(walk(Config)) | {f"sources.N.{k}": h for k, h in walk(SourceConfig)}
    assert listed == expected
    assert all(help_text for help_text in listed.values())
