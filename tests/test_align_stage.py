"""The `vocab-map` and `align` stages on a tiny corpus and fake top-k stores of three sources, and alignment on
the fly (`align.on_the_fly`): the same training rows and, with a tiny target model, the same training losses."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from pydoc_data.topics import topics

from fusejax import align, dtw, vocab_maps
from fusejax import train as train_stage
from fusejax.config import load_config
from fusejax.corpus import prepare_corpus
from fusejax.data import AlignedBatches, AlignedOnTheFly
from fusejax.schema import format_meta, topk_fields, unpack_tables
from fusejax.store import StoreError, StoreWriter, open_store
from fusejax.tokenizer import load_tokenizer, tokenizer_fingerprint
from fusejax.train import Trainer
from tests.test_align import _byte_level_tok, _sentencepiece_tok
from tiny import read_events, save_tiny_model

K = 4
NAMES = ["bytes400", "spm300", "bytes300", "own"]  # "own": the target's tokenizer (copied, not aligned)
ALIGNED = NAMES[:3]


def _fake_topk(tok, corpus, out_dir, name, seed, nonfinite_block=None, logits_dtype="bfloat16", version=None):
    """A top-k store with represent_source's fields and meta, random but deterministic values (``version``:
    another ``format_version`` in its meta)."""
    meta = format_meta("topk", source=name, tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok),
                       k=K, logits_dtype=logits_dtype, corpus=corpus.meta, eos_appended=True)
    if version is not None:
        meta["format_version"] = version
    rng = np.random.default_rng(seed)
    with StoreWriter(out_dir, kind="topk", meta=meta, fields=topk_fields(K, logits_dtype, len(tok)),
                     rows_per_shard=4) as w:
        for position in range(len(corpus)):
            row = corpus.row(position)
            text = row["text"].decode("utf-8")
            ids = np.asarray(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id], np.int32)
            T = ids.size
            topk = rng.integers(0, len(tok), (T, K)).astype(np.int32)
            topk[:-1, 0] = ids[1:]  # the true next token first, as a trained model would often have it
            logits = -np.sort(rng.exponential(2.0, (T, K)), axis=1).astype(ml_dtypes.bfloat16)
            ce = rng.exponential(3.0, T).astype(np.float32)
            ce[-1] = 0
            w.add(int(row["id"]), input_ids=ids, topk_ids=topk, topk_logits=logits, token_ce=ce,
                  seq_ce=np.float32(ce[:-1].mean()), nonfinite=int(row["id"] == nonfinite_block))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    toks = {"target": _sentencepiece_tok(350), NAMES[0]: _byte_level_tok(400), NAMES[1]: _sentencepiece_tok(300),
            NAMES[2]: _byte_level_tok(300)}
    toks["own"] = toks["target"]
    for name, tok in toks.items():
        tok.save_pretrained(root / "tok" / name)
    docs = root / "docs"
    docs.mkdir()
    for key in ("assignment", "if", "while", "for"):
        (docs / f"{key}.txt").write_text(topics[key][:700] + "\témoji 😀 漢字\n", encoding="utf-8")
    out = root / "run"
    prepare_corpus(docs, root / "tok" / "target", out / "corpus", block_size=64)
    corpus = open_store(out / "corpus")
    assert len(corpus) > 6
    skip_block = int(corpus.row(2)["id"])
    for seed, name in enumerate(NAMES):
        tok = load_tokenizer(root / "tok" / name)
        _fake_topk(tok, corpus, out / "represent" / name, name, seed, skip_block if seed == 1 else None)
    return root, skip_block


def _config(root, *overrides):
    data = {
        "run": {"output_dir": str(root / "run")},
        "target": {"tokenizer": str(root / "tok" / "target")},
        "sources": [{"name": n, "tokenizer": str(root / "tok" / n)} for n in NAMES],
        "represent": {"k": K, "shard_size": 3},
    }
    return load_config(data=data, overrides=list(overrides))


def _shard_files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def aligned(run_dir):
    root, _ = run_dir
    cfg = _config(root)
    summary = align.run(cfg)
    return cfg, summary


def test_rows_equal_align_topk(run_dir, aligned):
    root, skip_block = run_dir
    cfg, _ = aligned
    out = root / "run"
    corpus, store = open_store(out / "corpus"), open_store(out / "aligned")
    assert store.kind == "aligned" and store.meta["sources"] == NAMES and store.meta["k"] == K
    assert store.meta["copied"] == ["own"] and store.meta["format_version"] == 3
    assert list(store.ids) == list(corpus.ids)  # one row per block, corpus order
    tgt_tok = load_tokenizer(root / "tok" / "target")
    src_toks = [load_tokenizer(root / "tok" / n) for n in ALIGNED]
    maps = [np.load(out / "vocab_maps" / f"{n}.npz")["target_ids"] for n in ALIGNED]
    topk = [open_store(out / "represent" / n) for n in ALIGNED]
    own = open_store(out / "represent" / "own")
    for row, block in zip(store, corpus):
        text = block["text"].decode("utf-8")
        want_ids = tgt_tok.encode(text, add_special_tokens=False) + [tgt_tok.eos_token_id]
        np.testing.assert_array_equal(row["input_ids"], want_ids)
        T = len(want_ids)
        assert row["input_ids"].dtype == np.uint16 and row["table_ids"].dtype == np.uint16  # 350 target tokens
        assert row["table_logits"].dtype == ml_dtypes.bfloat16 and row["table_counts"].shape == (T, 3)
        table_ids, table_logits = unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], K)
        assert row["token_ce"].shape == (T, 3) and row["seq_ce"].shape == row["byte_ce"].shape == (4,)
        assert row["n_bytes"] == len(block["text"]) and row["split"] == block["split"]
        assert bool(row["skip"]) == (row["id"] == skip_block)
        own_row = own.get(row["id"])  # the target's tokenizer: nothing of its tables or token CE stored
        np.testing.assert_array_equal(own_row["input_ids"], want_ids)
        assert row["seq_ce"][3] == own_row["seq_ce"] and list(row["align_counts"][3]) == [T, T, T, 0, 0]
        for n, (tok, vmap, src_store) in enumerate(zip(src_toks, maps, topk)):  # the aligned sources
            src = src_store.get(row["id"])
            logits = np.asarray(src["topk_logits"], np.float32)
            ids, lg = align.align_topk(tok, src["input_ids"], src["topk_ids"], logits, tgt_tok, want_ids,
                                       vocab_map=vmap, mode="default", fallback="next_token")
            np.testing.assert_array_equal(table_ids[:, n], ids)
            np.testing.assert_array_equal(table_logits[:, n], lg)  # bfloat16 top-k logits: stored exactly
            partner = dtw.align_tokens(tok, src["input_ids"], tgt_tok, want_ids)
            for i, j in enumerate(partner):
                want = src["token_ce"][j] if j >= 0 else src["seq_ce"]
                assert row["token_ce"][i, n] == np.float32(want)
            assert row["seq_ce"][n] == src["seq_ce"]
            np.testing.assert_allclose(row["byte_ce"][n], np.sum(src["token_ce"], dtype=np.float64) / len(block["text"]),
                                       rtol=1e-6)


def test_target_tokenizer_source_is_read_from_its_topk_store(run_dir, aligned):
    """The training rows of the source with the target's tokenizer are its top-k rows as they are (ids,
    logits, token CE), the other sources' come from the aligned store."""
    root, _ = run_dir
    out = root / "run"
    data = AlignedBatches(out / "aligned", seq_len=72, ce_level="token")
    rows = data.rows(np.arange(data.num_rows))
    store, own = open_store(out / "aligned"), open_store(out / "represent" / "own")
    for b, position in enumerate(data.positions):
        row = store.row(int(position))
        top, m = own.get(row["id"]), len(row["input_ids"])
        np.testing.assert_array_equal(rows["table_ids"][b, :m, 3], top["topk_ids"])
        np.testing.assert_array_equal(rows["table_logits"][b, :m, 3], np.asarray(top["topk_logits"], np.float32))
        np.testing.assert_array_equal(rows["source_ce_token"][b, :m, 3], top["token_ce"])
        ids, _ = unpack_tables(row["table_counts"], row["table_ids"], row["table_logits"], K)
        np.testing.assert_array_equal(rows["table_ids"][b, :m, :3], ids)
        np.testing.assert_array_equal(rows["source_ce_token"][b, :m, :3], row["token_ce"])
        assert np.all(rows["table_ids"][b, m:] == -1)


def test_stats_and_vocab_map_summary(run_dir, aligned):
    root, _ = run_dir
    _, summary = aligned
    out = root / "run"
    assert json.loads((out / "aligned_summary.json").read_text()) == summary
    tokens = sum(len(r["input_ids"]) for r in open_store(out / "aligned"))
    assert summary["blocks"] == summary["corpus_blocks"] and summary["skipped_blocks"] == 1
    for name in NAMES:
        s = summary["sources"][name]
        assert s["positions"] == tokens
        assert s["matched"] <= s["one_to_one"] <= s["positions"] and s["empty"] <= 1 * summary["blocks"]
        assert s["matched"] + s["fallback"] == s["positions"]  # default mode: every position is one or the other
        assert 0 < s["match_rate"] <= s["one_to_one_rate"] <= 1
    maps = json.loads((out / "vocab_maps" / "summary.json").read_text())
    assert set(maps) == set(NAMES)
    for name in NAMES:
        assert 0 < maps[name]["exact_rate"] <= 1 and maps[name]["mean_distance"] >= 0
        assert maps[name]["size"] == len(load_tokenizer(root / "tok" / name))


def test_resume_after_kill_is_byte_identical(run_dir, aligned, monkeypatch):
    root, _ = run_dir
    cfg, _ = aligned
    path = root / "run" / "aligned"
    want = _shard_files(path)
    shutil.rmtree(path)
    calls = {"n": 0}
    real_add = StoreWriter.add

    def dying_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # one shard of 3 rows complete, one row buffered
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        align.run(cfg)
    monkeypatch.setattr(StoreWriter, "add", real_add)
    assert len(open_store(path)) == 3
    align.run(cfg)
    assert _shard_files(path) == want


def test_two_processes_cover_the_corpus(run_dir, aligned, monkeypatch, tmp_path):
    root, _ = run_dir
    want = {r["id"]: r["table_ids"].tobytes() for r in open_store(root / "run" / "aligned")}
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("aligned*"))
    cfg2 = _config(root, f"run.output_dir={tmp_path / 'run'}")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for process in (1, 0):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        align.run(cfg2)
    store = open_store(tmp_path / "run" / "aligned")
    assert {p.name for p in (tmp_path / "run" / "aligned").glob("manifest-p*")} == {"manifest-p0000.json",
                                                                                  "manifest-p0001.json"}
    assert {r["id"]: r["table_ids"].tobytes() for r in store} == want


@pytest.mark.parametrize("override,key", [("represent.k=3", "'k'"), ("sources.1.tokenizer=TOK0", "'tokenizer_fingerprint'")])
def test_mismatched_topk_store_is_refused(run_dir, aligned, override, key):
    root, _ = run_dir
    override = override.replace("TOK0", str(root / "tok" / NAMES[0]))
    with pytest.raises(ValueError, match=key) as err:
        align.run(_config(root, override))
    assert str(root / "run" / "represent" / NAMES[0 if "k=" in override else 1]) in str(err.value)


def test_vocab_maps_with_co_occurrence(run_dir, aligned, tmp_path):
    """Co-occurrence only re-breaks ties among equally distant targets: same distances as the plain map."""
    root, _ = run_dir
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("aligned*"))
    summary = vocab_maps.run(_config(root, f"run.output_dir={tmp_path / 'run'}", "vocab_map.co_occurrence=true"))
    assert all(summary[n]["co_occurrence"] for n in NAMES)
    for name in NAMES:
        plain, co = (np.load(d / "vocab_maps" / f"{name}.npz") for d in (root / "run", tmp_path / "run"))
        np.testing.assert_array_equal(plain["distances"], co["distances"])
        assert json.loads(str(co["meta"]))["co_occurrence"] is True


@pytest.mark.parametrize("change,fragments", [
    (dict(version=1), ["format version 1 of 'topk' stores", "version 2"]),
    (dict(logits_dtype="float32"), ["'logits_dtype' is 'float32', expected 'bfloat16'"]),
])
def test_old_format_or_mixed_dtype_topk_store_is_refused_before_writing(run_dir, aligned, tmp_path, change, fragments):
    """One top-k store of an older format, or with float32 logits among bfloat16 ones: one line naming that
    store, and no aligned store is started."""
    root, _ = run_dir
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("aligned*"))
    topk = tmp_path / "run" / "represent" / NAMES[1]
    shutil.rmtree(topk)
    tok = load_tokenizer(root / "tok" / NAMES[1])
    _fake_topk(tok, open_store(tmp_path / "run" / "corpus"), topk, NAMES[1], 1, **change)
    with pytest.raises(ValueError) as err:
        align.run(_config(root, f"run.output_dir={tmp_path / 'run'}"))
    assert str(topk) in str(err.value) and "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not (tmp_path / "run" / "aligned").exists()


# ------------------------------------------------------------------------------------- alignment on the fly


def _copy_run(root, tmp_path, *ignore):
    """The run folder without the aligned store (and ``ignore``), at ``tmp_path/run``."""
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("aligned*", *ignore))
    return tmp_path / "run"


@pytest.mark.parametrize("workers,ce_level", [(0, "token"), (2, "sequence")])
def test_on_the_fly_rows_equal_the_aligned_store(run_dir, aligned, workers, ce_level):
    """Every training row built on the fly (in this process, or prefetched by 2 worker processes) equals the
    row read from the aligned store: ids, tables, CE, masks; the skipped block is left out of both."""
    root, skip_block = run_dir
    stored = AlignedBatches(root / "run" / "aligned", seq_len=72, ce_level=ce_level)
    cfg = _config(root, "align.on_the_fly=true", f"align.workers={workers}", "train.seq_len=72",
                  f"train.ce_level={ce_level}")
    fly = AlignedOnTheFly(cfg)
    try:
        np.testing.assert_array_equal(fly.positions, stored.positions)
        assert fly.sources == stored.sources == NAMES and fly.num_rows == stored.num_rows
        indices = np.arange(stored.num_rows)[::-1]
        fly.prefetch(indices[:3])
        got, want = fly.rows(indices), stored.rows(indices)
        assert set(got) == set(want)
        for field in want:
            assert got[field].dtype == want[field].dtype
            np.testing.assert_array_equal(got[field], want[field], err_msg=field)
    finally:
        fly.close()


def test_on_the_fly_align_stage_writes_no_store_and_train_needs_its_inputs(run_dir, aligned, tmp_path):
    """`fusejax align` with align.on_the_fly checks the inputs (and builds the vocab maps) but writes no
    aligned store; the train data refuses a missing vocab map or top-k store in one line naming it."""
    root, _ = run_dir
    out = _copy_run(root, tmp_path, "vocab_maps")
    cfg = _config(root, f"run.output_dir={out}", "align.on_the_fly=true", "align.workers=0")
    with pytest.raises(StoreError) as err:
        AlignedOnTheFly(cfg)
    assert str(out / "vocab_maps" / f"{NAMES[0]}.npz") in str(err.value) and "\n" not in str(err.value)
    assert "fusejax vocab-map" in str(err.value)
    summary = align.run(cfg)
    assert summary == {"on_the_fly": True, "sources": NAMES, "corpus_blocks": len(open_store(out / "corpus"))}
    assert not (out / "aligned").exists() and not (out / "aligned_summary.json").exists()
    assert all((out / "vocab_maps" / f"{n}.npz").is_file() for n in NAMES)
    shutil.rmtree(out / "represent" / NAMES[2])
    with pytest.raises(StoreError) as err:
        AlignedOnTheFly(cfg)
    assert str(out / "represent" / NAMES[2]) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def target_model(run_dir):
    """A tiny random Llama with the target tokenizer."""
    root, _ = run_dir
    tok = load_tokenizer(root / "tok" / "target")
    save_tiny_model(root / "target", "llama", len(tok), 0, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(root / "target")
    return root / "target"


def test_on_the_fly_training_equals_the_stored_path_and_resumes_exactly(
        run_dir, aligned, target_model, tmp_path, monkeypatch):
    """3 steps of `fusejax train` on the aligned store, and on the fly: 2 steps in 2 worker processes, then
    resumed in the training process: the same losses and metrics at every step, bit for bit."""
    root, _ = run_dir
    train = ["train.steps=3", "train.batch_size=8", "train.seq_len=72", "train.lr=1e-3", "train.log_every=1",
             "train.checkpoint_every=0", "train.eval_every=0", f"target.path={target_model}"]
    stored = _config(root, f"run.output_dir={_copy_run(root, tmp_path / 'stored')}", *train)
    shutil.copytree(root / "run" / "aligned", tmp_path / "stored" / "run" / "aligned")
    fly = [f"run.output_dir={_copy_run(root, tmp_path / 'fly')}", "align.on_the_fly=true", *train]
    train_stage.run(stored)
    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, **kw: real_fit(self, stop_after=2))
    assert train_stage.run(_config(root, *fly, "align.workers=2"))["steps"] == 2
    monkeypatch.setattr(Trainer, "fit", real_fit)
    assert train_stage.run(_config(root, *fly, "align.workers=0"))["steps"] == 3
    want = read_events(tmp_path / "stored" / "run" / "train" / "tb")
    got = read_events(tmp_path / "fly" / "run" / "train" / "tb")
    assert [s for s, _ in want["loss"]] == [s for s, _ in got["loss"]] == [1, 2, 3]
    assert set(got) == set(want) and "fusion_loss" in want
    for tag in set(want) - {"tokens_per_s"}:
        assert got[tag] == want[tag], tag
