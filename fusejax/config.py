"""The run configuration: one typed, frozen tree of dataclasses, read from YAML with ``base:`` inheritance.

A config file is a YAML mapping whose top-level keys are the sections of :class:`Config` (``run``, ``mesh``,
``corpus``, ``target``, ``sources``, ``represent``, ``vocab_map``, ``align``, ``train``, ``eval``,
``export``). It may name one or more ``base:`` files (paths relative to the file); bases are merged first,
in order, then the file itself: a mapping merges key by key into the base's mapping, a list or a scalar
replaces it. Dotted overrides (``train.lr=2e-5``, ``sources.0.path=x``, ``mesh.rules.vocab=null``) come
last; their values are YAML scalars (or flow lists/mappings). Every value is checked against the dataclass
annotations; mistakes raise :class:`ConfigError` naming the file (or override), the dotted key and the value.

Adding a setting is one line in its section: ``name: type = opt(default, "help")``.
Paths inside a config (corpus inputs, model folders, output_dir) are relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fusejax.files import atomic_write

RESOLVED_NAME = "config.resolved.yaml"
# The shipped YAML files (demo, study, mesh presets): ``configs/`` beside the package in a source checkout,
# ``fusejax/configs/`` inside an installed wheel (pyproject.toml maps the one onto the other).
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIGS = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else _PACKAGED_CONFIGS.parents[1] / "configs"
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class ConfigError(ValueError):
    """A config that cannot be used: unreadable YAML, unknown key, wrong type or value (the message says where)."""


# value checks: (predicate, what the value must be)
POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
FRACTION = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
HOLDOUT = (lambda v: 0 <= v < 1, "must be in [0, 1)")
MESH_SIZE = (lambda v: v == -1 or v >= 1, "must be a positive integer or -1")
SEED = (lambda v: 0 <= v < 2**63, "must be in [0, 2**63)")  # numpy and JAX both take it


def opt(default: Any, help: str, check: tuple[Callable[[Any], bool], str] | None = None):
    """A config field: ``default`` (a section class stands for its default instance), one-line ``help``, and
    an optional ``check`` (predicate, requirement) applied to non-null values."""
    metadata = {"help": help, "check": check}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


section = dataclass(frozen=True, kw_only=True)  # every config section: frozen, keyword-only

Dtype = Literal["bfloat16", "float16", "float32"]
Mode = Literal["default", "reference"]
MeshAxes = str | tuple[str, ...] | None  # mesh axes of one logical axis: one, several, or None (replicated)

MESH_AXES = ("data", "fsdp", "tensor")

# The one sharding rules table: logical axis name -> mesh axes it is split over (None: replicated). The
# ``mesh.rules`` setting overrides it key by key; fusejax.sharding turns it into shardings.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),  # examples are split over every data-parallel axis
    "length": None,  # sequence positions stay whole
    "embed": "fsdp",  # model width: ZeRO-3 style parameter sharding
    "mlp": "tensor",  # MLP hidden units: Megatron-style tensor parallelism
    "heads": "tensor",  # query heads
    "kv_heads": "tensor",  # key/value heads (grouped-query attention)
    "head_dim": None,
    "vocab": "tensor",  # embedding/unembedding rows (vocabulary padded to a multiple of 128)
    "experts": "tensor",  # mixture-of-experts experts (expert parallelism; their MLP units then stay whole)
    "layers": None,  # stacked-layer axis of scanned models
    "norm": None,  # norm scales and biases
    "sources": None,  # fusion sources
    "topk": None,  # top-k entries per position
}


@section
class RunConfig:
    output_dir: str = opt("runs/default", "folder for everything the run writes (logits, checkpoints, logs)")
    seed: int = opt(0, "random seed for initialization, data order and the holdout split", SEED)
    pairwise: bool = opt(
        False, "`fusejax run`: fuse each source into the target on its own (FuseChat), one run per source in "
        "<output_dir>/pairs/<name>, then merge their exports (merge section; base: the target)")
    pairwise_target: bool = opt(False, "with run.pairwise: each pair also fuses the target's own distribution "
                                       "(the target as a second source named 'target')")
    corpus_dir: str | None = opt(None, "the corpus store (stage prepare); null: <output_dir>/corpus. run.pairwise: "
                                       "every pair reads this one (prepared once)")


@section
class MeshConfig:
    data: int = opt(1, "devices along the pure data-parallel mesh axis (-1: fill the remaining devices)", MESH_SIZE)
    fsdp: int = opt(-1, "devices along the FSDP (ZeRO-3) mesh axis (-1: fill the remaining devices)", MESH_SIZE)
    tensor: int = opt(1, "devices along the tensor-parallel mesh axis (-1: fill the remaining devices)", MESH_SIZE)
    rules: dict[str, MeshAxes] = opt(
        {}, "logical axis -> mesh axis, list of mesh axes or null, merged onto fusejax.config.DEFAULT_RULES"
    )
    device_memory_gib: float | None = opt(None, "GiB per device checked by `fusejax plan`; null: as reported", POSITIVE)


@section
class CorpusConfig:
    inputs: tuple[str, ...] = opt((), "corpus files or folders read in order")
    format: Literal["auto", "txt", "jsonl", "parquet", "tfds", "hf_disk", "chat"] = opt(
        "auto", "input format; auto: from the file extension; chat: conversations in .jsonl or hf_disk (docs/chat.md)"
    )
    text_field: str = opt("text", "field holding the document text in jsonl/parquet/tfds/hf_disk inputs")
    txt_split: Literal["file", "blank_line"] = opt("file", "txt documents: one per file, or split at blank lines")
    block_size: int = opt(2048, "target-model tokens per training block", POSITIVE)
    holdout_fraction: float = opt(0.0, "fraction of documents held out for evaluation", HOLDOUT)


@section
class ModelRef:
    path: str | None = opt(None, "Hugging Face model folder (config.json + safetensors)")
    tokenizer: str | None = opt(None, "tokenizer folder; null: the model folder")
    chat_template: str | None = opt(
        None, "Jinja chat template file (corpus.format: chat); null: the tokenizer's own chat_template")

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer folder: ``tokenizer``, else ``path``."""
        found = self.tokenizer or self.path
        if found is None:
            raise ConfigError(f"{type(self).__name__} has neither 'tokenizer' nor 'path' set")
        return found


@section
class TargetConfig(ModelRef):
    """The target model that is trained."""


@section
class SourceConfig(ModelRef):
    name: str = opt("", "short unique name of the source (used in file names and logs)")


@section
class RepresentConfig:
    k: int = opt(10, "top-k next-token logits kept per position and model", POSITIVE)
    batch_size: int = opt(8, "blocks per forward pass while extracting logits", POSITIVE)
    logits_dtype: Dtype = opt("bfloat16", "dtype of the stored top-k and aligned logits (bfloat16: 16 bits)")
    shard_size: int = opt(1024, "blocks per output shard file", POSITIVE)


@section
class VocabMapConfig:
    method: Literal["mined", "exact"] = opt(
        "mined", "source -> target token map: exact matches plus nearest by edit distance (mined), or exact only"
    )
    mode: Mode = opt("default", "default: this project's mapping; reference: reproduce the FuseLLM code")
    co_occurrence: bool = opt(False, "also use token co-occurrence counts from the corpus when mining")


@section
class AlignConfig:
    mode: Mode = opt("default", "token alignment: default, or reference (reproduce the FuseLLM code exactly)")
    fallback: Literal["next_token", "reference"] = opt(
        "next_token", "unaligned positions: one-hot of the next token (label), or reference (of the current token)"
    )
    use_vocab_map: bool = opt(True, "map source token ids through the vocab map (false: exact strings only)")
    on_the_fly: bool = opt(
        False, "align each training batch in host worker processes while training; no aligned store is written")
    workers: int | None = opt(
        None, "worker processes aligning on the fly (null: one per host core; 0: in the training process)",
        NON_NEGATIVE)


@section
class TrainConfig:
    steps: int | None = opt(None, "optimizer steps; null: one pass over the training blocks", POSITIVE)
    batch_size: int = opt(8, "global batch in sequences per optimizer step", POSITIVE)
    seq_len: int = opt(2048, "tokens per training sequence", POSITIVE)
    grad_accum: int = opt(1, "micro-batches per optimizer step (batch_size must divide by it)", POSITIVE)
    lr: float = opt(1e-5, "peak learning rate (AdamW)", POSITIVE)
    b1: float = opt(0.9, "AdamW beta1", FRACTION)
    b2: float = opt(0.95, "AdamW beta2", FRACTION)
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay", NON_NEGATIVE)
    warmup_ratio: float = opt(0.0, "fraction of steps with linear warm-up before cosine decay", FRACTION)
    clip_norm: float = opt(1.0, "global gradient-norm clip (0: off)", NON_NEGATIVE)
    lm_weight: float = opt(0.9, "lambda: weight of the causal LM loss; 1 - lambda weighs the fusion loss", FRACTION)
    fusion: Literal["min_ce", "avg_ce", "avg_ce_norm"] = opt(
        "min_ce", "fusion of source distributions: the lowest-CE source (min_ce) or CE-weighted averages"
    )
    ce_level: Literal["sequence", "token"] = opt("sequence", "fusion picks/weights sources per sequence or per token")
    ce_unit: Literal["token", "byte"] = opt(
        "token", "CE compared across sources per token or per byte of text (fair across tokenizers)"
    )
    loss_type: Literal["ce", "kl"] = opt("ce", "fusion loss: cross-entropy or KL divergence to the fused target")
    temperature: float = opt(1.0, "softmax temperature applied to the source logits", POSITIVE)
    schedule: Literal["hard", "hard_and_decay", "soft"] = opt(
        "hard",
        "lambda over training: hard (fixed), hard_and_decay (rises linearly to 1), soft (from exp(-CE) rewards)",
    )
    compute_dtype: Literal["float32", "bfloat16"] = opt("float32", "dtype of activations and matmuls")
    param_dtype: Literal["float32", "bfloat16"] = opt("float32", "dtype of the stored parameters")
    remat: Literal["none", "full", "dots"] = opt(
        "none", "rematerialization per layer: none, full (recompute all), dots (keep matmul outputs)"
    )
    attention_impl: Literal["auto", "xla", "cudnn", "chunked", "explicit"] = opt(
        "auto", "attention path: xla (jax.nn.dot_product_attention), cudnn (its cuDNN flash attention: an NVIDIA "
        "GPU, bfloat16, no soft-cap or ALiBi), chunked (blocks of attention_chunk queries, no [B, H, T, T] scores), "
        "explicit; auto: cudnn on an NVIDIA GPU where it serves the model, else chunked when seq_len > "
        "attention_chunk, else xla (explicit for soft-capped attention)")
    attention_chunk: int = opt(512, "queries per block of the chunked attention path", POSITIVE)
    loss_chunk: int = opt(
        256, "positions of each sequence whose float32 logits the loss holds at once (never [B,T,V]); must divide "
        "train.seq_len (a larger value: the whole sequence)", POSITIVE)
    log_every: int = opt(10, "steps between metric logs", POSITIVE)
    eval_every: int = opt(
        500, "steps between held-out evaluations, scored as the eval stage scores them (0: never)", NON_NEGATIVE)
    checkpoint_every: int = opt(500, "steps between checkpoints (0: only at the end)", NON_NEGATIVE)
    keep_checkpoints: int = opt(3, "most recent checkpoints kept", POSITIVE)
    peak_flops: float | None = opt(None, "peak FLOP/s per device for MFU; null: from the device kind", POSITIVE)
    nonfinite: Literal["stop", "skip"] = opt(
        "stop", "a step whose loss or gradient norm is NaN/inf is never applied; then stop the run (keeping the "
        "last checkpoint) or skip such steps and count them")

    def __post_init__(self):
        if self.batch_size % self.grad_accum:  # the one check: YAML, overrides and Python all build through here
            raise ConfigError(f"bad value for 'train.grad_accum': must divide train.batch_size={self.batch_size}, "
                              f"got {self.grad_accum}")
        if self.loss_chunk < self.seq_len and self.seq_len % self.loss_chunk:
            raise ConfigError(f"bad value for 'train.loss_chunk': must divide train.seq_len={self.seq_len}, "
                              f"got {self.loss_chunk}")


@section
class EvalConfig:
    batch_size: int = opt(8, "held-out sequences (or lm-eval requests) per evaluation batch (eval stage and "
                             "train.eval_every)", POSITIVE)
    max_batches: int | None = opt(None, "evaluate at most this many batches; null: all held-out blocks", POSITIVE)
    tasks: tuple[str, ...] = opt((), "lm-evaluation-harness tasks or groups also run on the target and the trained "
                                     "model (needs `pip install fusejax[eval]`; writes eval/tasks.json); empty: none")
    num_fewshot: int | None = opt(None, "few-shot examples in each lm-eval prompt; null: each task's default",
                                  NON_NEGATIVE)
    limit: float | None = opt(None, "at most this many examples per lm-eval task (a fraction of them when below 1); "
                                    "null: all", POSITIVE)
    include_path: str | None = opt(None, "folder of extra lm-eval task YAMLs (local tasks) for eval.tasks")


@section
class ExportConfig:
    path: str | None = opt(None, "folder for the exported Hugging Face model; null: <output_dir>/export")
    dtype: Dtype = opt("bfloat16", "dtype of the exported weights")


@section
class MergeConfig:
    method: Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "sce", "varm"] = opt(
        "linear", "how `fusejax merge` combines the models' parameters (formulas in fusejax/merging.py)"
    )
    models: tuple[str, ...] = opt((), "Hugging Face folders merged (one architecture, same shapes and vocabulary)")
    base: str | None = opt(None, "the base model of the task vectors (every method but linear); config and "
                                 "tokenizer are copied from it (else from the first model)")
    weights: tuple[float, ...] = opt((), "one weight per model (linear, task_arithmetic, ties, dare_*); empty: 1 each")
    density: float = opt(1.0, "fraction of each task vector kept (ties, dare_*) or of elements (sce's top-k)",
                         FRACTION)
    scale: float = opt(1.0, "lambda: multiplier of the merged task vector (task_arithmetic, ties, dare_*)")
    normalize: bool | None = opt(None, "divide by the sum of the weights; null: the method's default (mergekit's)")
    seed: int = opt(0, "seed of DARE's random drops", SEED)
    dtype: Literal["float32", "bfloat16"] = opt("float32", "dtype of the merged weights (computed in float32)")
    path: str | None = opt(None, "output folder of the merged model; null: <output_dir>/merge")


@section
class GenerateConfig:
    model: str | None = opt(None, "Hugging Face folder that generates; null: the run's latest training checkpoint")
    tokenizer: str | None = opt(None, "tokenizer folder; null: the model folder (for a checkpoint: target's)")
    prompts: str | None = opt(None, "prompts file: .jsonl (a 'prompt' string per line) or text (one prompt a line)")
    output: str | None = opt(None, "JSONL written with {prompt, completion} per prompt; null: "
                                   "<output_dir>/generate.jsonl")
    max_new_tokens: int = opt(64, "most new tokens per prompt (fewer at EOS or a stop string)", POSITIVE)
    temperature: float = opt(0.0, "sampling temperature; 0: greedy", NON_NEGATIVE)
    top_k: int = opt(0, "sample among the k most likely tokens; 0: all", NON_NEGATIVE)
    top_p: float = opt(1.0, "sample among the most likely tokens holding this probability; 1: all",
                       (lambda v: 0 < v <= 1, "must be in (0, 1]"))
    seed: int = opt(0, "seed of the sampling", SEED)
    stop: tuple[str, ...] = opt((), "stop strings: a completion ends before the first one")
    batch_size: int = opt(8, "prompts decoded together", POSITIVE)


@section
class Config:
    """The whole run configuration (frozen). Build it with :func:`load_config`; change it with :func:`replace`."""

    run: RunConfig = opt(RunConfig, "where outputs go and the random seed")
    mesh: MeshConfig = opt(MeshConfig, "device mesh (data, fsdp, tensor) and sharding rules")
    corpus: CorpusConfig = opt(CorpusConfig, "the text every model reads")
    target: TargetConfig = opt(TargetConfig, "the target model that is trained")
    sources: tuple[SourceConfig, ...] = opt((), "the source models whose knowledge is fused (any number)")
    represent: RepresentConfig = opt(RepresentConfig, "extraction of top-k logits from every model")
    vocab_map: VocabMapConfig = opt(VocabMapConfig, "source -> target vocabulary mapping")
    align: AlignConfig = opt(AlignConfig, "token alignment of source distributions to target tokens")
    train: TrainConfig = opt(TrainConfig, "continual training of the target on lambda*CLM + (1-lambda)*fusion")
    eval: EvalConfig = opt(EvalConfig, "held-out evaluation")
    export: ExportConfig = opt(ExportConfig, "export of the trained target model")
    merge: MergeConfig = opt(MergeConfig, "`fusejax merge`: models of one architecture merged in parameter space")
    generate: GenerateConfig = opt(GenerateConfig, "`fusejax generate`: text completions of prompts with a KV cache")


# ----------------------------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, data: Mapping | None = None
) -> Config:
    """The Config from a YAML file (with its bases), then ``data`` (a dict merged on top; its ``base:`` paths
    are relative to the working directory), then ``overrides`` (``"dotted.key=yaml value"`` strings).
    Everything missing takes the dataclass defaults. Raises :class:`ConfigError`."""
    layers: list[tuple[dict, str]] = []
    if path is not None:
        layers += _read_with_bases(Path(path), str(path), ())
    if data is not None:
        data = copy.deepcopy(dict(data))
        base = data.pop("base", None)
        layers += [layer for b in _base_list(base, "data") for layer in _read_with_bases(Path(b), str(b), ())]
        layers.append((data, "data"))
    merged: dict = {}
    for raw, where in layers:
        _build(raw, where)  # check each layer on its own so that errors name its file
        merged = _merge(merged, raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        where = f"override '{item}'"
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=2e-5)")
        _set_dotted(merged, key.strip(), lambda tp: _parse_override(text, tp, where), where)
    return _build(merged, "the merged config" + (f" of {path}" if path is not None else ""))


def replace(cfg: Config, key: str, value: Any) -> Config:
    """A copy of ``cfg`` with the dotted ``key`` (e.g. ``"train.lr"``, ``"sources.0.path"``) set to ``value``,
    checked like a config file. A mapping value merges into the current section."""
    raw = config_to_dict(cfg)
    where = f"replace({key!r}, {value!r})"
    _set_dotted(raw, key, lambda tp: value, where)
    return _build(raw, where)


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data of a config (or any section): dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Config) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_resolved(cfg: Config, directory: str | os.PathLike) -> Path:
    """Write ``directory/config.resolved.yaml`` atomically (:func:`fusejax.files.atomic_write`); returns its path."""
    text = "# fusejax resolved config (bases merged, overrides applied); load_config(this file) gives it back\n"
    return atomic_write(Path(directory) / RESOLVED_NAME, (text + to_yaml(cfg)).encode("utf-8"))


def iter_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """Every leaf setting as ``(dotted key, type, default, help)``; list entries appear as ``sources.N.*``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key + ".")
            continue
        yield key, _type_name(tp), config_to_dict(_field_default(cls, f.name)), f.metadata["help"]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if dataclasses.is_dataclass(item):
            yield from iter_fields(item, key + ".N.")


# ------------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-5`` as a float (as YAML 1.2 does) and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$"), list("-+.0123456789")
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        if key_node.value in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
            )
        seen.add(key_node.value)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, where: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {where} not found") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {where}: {e}") from None
    except UnicodeDecodeError as e:  # e.g. Latin-1 or UTF-16 text
        raise ConfigError(f"config file {where} is not UTF-8 text: {e}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {where}: {' '.join(str(e).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a YAML mapping of config sections, not {type(raw).__name__}")
    return raw


def _base_list(base: Any, where: str) -> list[str]:
    if base is None:
        return []
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"bad value for 'base' in {where}: expected a path or a list of paths, got {base!r}")
    return bases


def _read_with_bases(path: Path, where: str, chain: tuple[tuple[Path, str], ...]) -> list[tuple[dict, str]]:
    """``(raw mapping, display name)`` of every file in merge order: bases (recursively) first, then ``path``."""
    resolved = path.resolve()
    for seen, _ in chain:
        if seen == resolved:
            cycle = " -> ".join([w for _, w in chain] + [where])
            raise ConfigError(f"cycle in 'base' inheritance: {cycle}")
    raw = _read_yaml(path, where)
    layers = []
    for base in _base_list(raw.pop("base", None), where):
        base_path = path.parent / base
        layers += _read_with_bases(base_path, os.path.normpath(base_path), chain + ((resolved, where),))
    layers.append((raw, where))
    return layers


def _parse_override(text: str, tp: Any, where: str) -> Any:
    """An override's value: YAML, except that text stays text where the setting is a string."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML value in {where}: {' '.join(str(e).split())}") from None
    if value is None or isinstance(value, str) or not _accepts(tp, str):
        return value
    try:
        _convert(value, tp, "", where)
        return value
    except ConfigError:
        return text


# ------------------------------------------------------------------------------------------ merge / set


def _merge(base: Any, child: Any) -> Any:
    """``child`` over ``base``: mappings merge key by key (recursively); anything else replaces."""
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return child
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if key in out else value
    return out


def _set_dotted(raw: dict, key: str, make_value: Callable[[Any], Any], where: str) -> None:
    """Set dotted ``key`` in the plain config data ``raw`` to ``make_value(setting type)``; list indices may
    address an existing entry or append one (index == length)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad key {key!r} in {where}")
    node, tp = raw, Config
    for i, part in enumerate(parts):
        dotted, parent = ".".join(parts[: i + 1]), ".".join(parts[:i])
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                raise ConfigError(_unknown_key(dotted, hints, where))
            child_tp, slot = hints[part], part
            if slot not in node:
                node[slot] = config_to_dict(_field_default(tp, part))
        elif typing.get_origin(tp) is tuple:
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(
                    f"bad key {dotted!r} in {where}: '{parent}' is a list of {len(node)} entries; "
                    f"use an index from 0 to {len(node)} (the last one appends)"
                )
            child_tp, slot = typing.get_args(tp)[0], int(part)
            if slot == len(node):
                node.append({} if dataclasses.is_dataclass(child_tp) else None)
        elif typing.get_origin(tp) is dict:
            child_tp, slot = typing.get_args(tp)[1], part
        else:
            raise ConfigError(f"bad key {key!r} in {where}: '{parent}' is a {_type_name(tp)}, not a section")
        if i < len(parts) - 1:
            node, tp = (node.get(slot) if isinstance(node, dict) else node[slot]), child_tp
            continue
        value = make_value(child_tp)
        if dataclasses.is_dataclass(tp):
            _convert_field(tp, slot, value, dotted, where)
        else:
            _convert(value, child_tp, dotted, where)
        node[slot] = _merge(node.get(slot) if isinstance(node, dict) else node[slot], value)


# ------------------------------------------------------------------------------------ checking / building


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _field_default(cls: type, name: str) -> Any:
    f = _field(cls, name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _union_args(tp: Any) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else None


def _accepts(tp: Any, kind: type) -> bool:
    """Whether the annotation ``tp`` is ``kind`` or a union containing it."""
    return tp is kind or kind in (_union_args(tp) or ())


def _type_name(tp: Any) -> str:
    """Annotation as users read it: ``str | null``, ``list[str]``, ``'ce' | 'kl'``."""
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _union_args(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return tp.__name__


def _unknown_key(key: str, valid: Sequence[str], where: str) -> str:
    """'unknown key' message with the nearest valid key: a sibling, else a setting of that name elsewhere."""
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, list(valid), n=1)
    if close:
        guess = f"{prefix}.{close[0]}" if prefix else close[0]
    else:
        everywhere = [k for k, *_ in iter_fields()]
        guess = next((k for k in everywhere if k.rpartition(".")[2] == name), None)
        guess = guess or next(iter(difflib.get_close_matches(key, everywhere, n=1)), None)
    hint = f"; did you mean '{guess}'?" if guess else f"; valid keys here: {', '.join(valid)}"
    return f"unknown key '{key}' in {where}{hint}"


def _bad(key: str, where: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"bad value for '{key}' in {where}: {problem}, got {value!r}")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` (plain YAML data) checked against annotation ``tp`` and converted to it (mappings -> sections,
    lists -> tuples, int -> float). Raises ConfigError naming ``key`` and ``where``."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _bad(key, where, f"expected a mapping of {tp.__name__} settings", value)
        kwargs = {}
        for name, item in value.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in _hints(tp):
                raise ConfigError(_unknown_key(sub, list(_hints(tp)), where))
            kwargs[name] = _convert_field(tp, name, item, sub, where)
        try:
            return tp(**kwargs)
        except ConfigError as e:  # a section's own cross-field check
            raise ConfigError(f"{e} (in {where})") from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _bad(key, where, f"expected one of {', '.join(repr(a) for a in args)}", value)
    if _union_args(tp):
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own message
            return _convert(value, arms[0], key, where)
        for arm in arms:
            try:
                return _convert(value, arm, key, where)
            except ConfigError:
                pass
        raise _bad(key, where, f"expected {_type_name(tp)}", value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, where, f"expected a list ({_type_name(tp)})", value)
        return tuple(_convert(v, args[0], f"{key}.{i}", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, where, f"expected a mapping ({_type_name(tp)})", value)
        return {_convert(k, args[0], key, where): _convert(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):  # .inf, .nan, 1e400
            raise _bad(key, where, "expected a finite number", value)
        return number
    if tp in (bool, int, str) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp in (bool, int, float, str):
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise _bad(key, where, f"expected {names[tp]}", value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key!r}")


def _convert_field(cls: type, name: str, value: Any, key: str, where: str) -> Any:
    """``value`` converted for field ``name`` of section ``cls``, with the field's check applied."""
    out = _convert(value, _hints(cls)[name], key, where)
    check = _field(cls, name).metadata["check"]
    if check and out is not None and not check[0](out):
        raise _bad(key, where, check[1], value)
    return out


def _build(raw: dict, where: str) -> Config:
    """The checked Config of plain data ``raw``: types, values (each section's own checks, e.g. grad_accum
    dividing the batch), unique source names, sharding rules."""
    cfg = _convert(raw, Config, "", where)
    names = [s.name for s in cfg.sources]
    for i, name in enumerate(names):
        if not name:
            raise _bad(f"sources.{i}.name", where, "every source needs a non-empty name", name)
        if not _SOURCE_NAME.match(name):  # it names folders under output_dir: no '/', no '..'
            raise _bad(f"sources.{i}.name", where, "use letters, digits, '_', '.', '-' (starting with a letter "
                       "or digit)", name)
        if name in names[:i]:
            raise _bad(f"sources.{i}.name", where, f"duplicate source name (also sources.{names.index(name)})", name)
    if cfg.mesh.rules:
        for name, axes in cfg.mesh.rules.items():
            key = f"mesh.rules.{name}"
            if name not in DEFAULT_RULES:
                raise ConfigError(_unknown_key(key, list(DEFAULT_RULES), where))
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                if axis not in MESH_AXES:
                    raise _bad(key, where, f"mesh axes are {', '.join(MESH_AXES)}", axes)
    return cfg
