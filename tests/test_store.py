"""The shard store: round trips, random access, resume after a kill, refusals, checksums, locks."""

import json
import logging
import os
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from fusejax.store import (
    Field,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    StoreWriter,
    merge_manifests,
    open_store,
)

FIELDS = [
    Field("seq_ce", "float32"),
    Field("nan", "bool"),
    Field("pair", "int16", (2,)),
    Field("topk_ids", "int32", (3,), ragged=True),
    Field("topk_logits", "bfloat16", (3,), ragged=True),
    Field("text", "bytes"),
    Field("doc", "str"),
]
META = {"source": "tiny", "k": 3, "vocab_size": 100}


def make_rows(n, seed=0):
    """n rows of random values with varying ragged lengths (incl. 0); ids are not consecutive."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = int(rng.integers(0, 5))
        rows.append(
            dict(
                row_id=int(rng.integers(-(2**62), 2**62)),
                seq_ce=np.float32(rng.normal()),
                nan=bool(i % 3 == 0),
                pair=rng.integers(-100, 100, 2).astype(np.int16),
                topk_ids=rng.integers(0, 100, (t, 3)).astype(np.int32),
                topk_logits=rng.normal(size=(t, 3)).astype(np.float32).astype(ml_dtypes.bfloat16),
                text=bytes(rng.integers(0, 256, t * 2).astype(np.uint8)),
                doc=f"doc é {i}",
            )
        )
    return rows


def write(path, rows, rows_per_shard=4, meta=META, fields=FIELDS, **kw):
    with StoreWriter(path, kind="topk", meta=meta, fields=fields, rows_per_shard=rows_per_shard, **kw) as w:
        for r in rows:
            w.add(**r)


def check_row(got, want):
    assert got["id"] == want["row_id"]
    assert got["seq_ce"] == want["seq_ce"] and got["seq_ce"].dtype == np.float32
    assert bool(got["nan"]) == want["nan"]
    np.testing.assert_array_equal(got["pair"], want["pair"])
    assert got["topk_ids"].dtype == np.int32 and got["topk_ids"].shape == want["topk_ids"].shape
    np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])
    assert got["topk_logits"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["topk_logits"].view(np.uint16), want["topk_logits"].view(np.uint16))
    assert got["text"] == want["text"] and isinstance(got["text"], bytes)
    assert got["doc"] == want["doc"]


def tree_bytes(path):
    """{relative path: bytes} of every file under path."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_round_trip_and_random_access(tmp_path):
    rows = make_rows(10)
    write(tmp_path / "s", rows)
    store = open_store(tmp_path / "s", verify=True)
    assert store.kind == "topk" and store.meta == META and store.fields == FIELDS
    assert len(store) == 10 and [s.num_rows for s in store.shards] == [4, 4, 2]
    for got, want in zip(store, rows, strict=True):
        check_row(got, want)
    for want in reversed(rows):
        check_row(store.get(want["row_id"]), want)
        assert want["row_id"] in store
    assert 12345 not in store
    with pytest.raises(KeyError, match="12345"):
        store.get(12345)
    # columnar access of one shard: concatenated ragged data + offsets
    col = store.shards[0].column("topk_ids")
    np.testing.assert_array_equal(col.offsets, np.cumsum([0] + [len(r["topk_ids"]) for r in rows[:4]]))
    np.testing.assert_array_equal(store.shards[1].column("seq_ce"), [r["seq_ce"] for r in rows[4:8]])
    # the files are plain .npy: bf16 saved as its uint16 bit pattern
    raw = np.load(tmp_path / "s" / "shard-p0000-000000" / "topk_logits.npy")
    assert raw.dtype == np.uint16 and raw.shape == (sum(len(r["topk_ids"]) for r in rows[:4]), 3)


def test_bad_rows_are_refused(tmp_path):
    with StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4) as w:
        good = make_rows(1)[0]
        with pytest.raises(StoreError, match="fields"):
            w.add(**{k: v for k, v in good.items() if k != "doc"})
        with pytest.raises(StoreError, match="'pair'.*shape"):
            w.add(**{**good, "pair": np.zeros(3, np.int16)})
        with pytest.raises(StoreError, match="'topk_ids'.*shape"):
            w.add(**{**good, "topk_ids": np.zeros((2, 4), np.int32)})
        with pytest.raises(StoreError, match="'topk_ids'.*float64"):
            w.add(**{**good, "topk_ids": np.zeros((2, 3))})
        with pytest.raises(StoreError, match="'pair'.*fit int16"):
            w.add(**{**good, "pair": np.array([0, 70000])})
        with pytest.raises(StoreError, match="'text'.*bytes"):
            w.add(**{**good, "text": "not bytes"})
    with pytest.raises(StoreError, match="field name 'id'"):
        Field("id", "int64")
    with pytest.raises(StoreError, match="dtype 'float8'"):
        Field("x", "float8")


class Killed(Exception):
    pass


def test_resume_after_kill_is_byte_identical(tmp_path):
    rows = make_rows(11)
    write(tmp_path / "ref", rows)

    # killed while shard 2 is being buffered: its rows are lost, shards 0 and 1 are complete
    with pytest.raises(Killed):
        with StoreWriter(tmp_path / "run", kind="topk", meta=META, fields=FIELDS, rows_per_shard=4) as w:
            for i, r in enumerate(rows):
                if i == 10:
                    raise Killed
                w.add(**r)
    # a kill during a later shard write leaves a temp folder, and one after the rename but before the
    # manifest update leaves an unlisted shard folder
    (tmp_path / "run" / ".tmp-shard-p0000-000003").mkdir()
    (tmp_path / "run" / ".tmp-shard-p0000-000003" / "id.npy").write_bytes(b"junk")
    (tmp_path / "run" / "shard-p0000-000002").mkdir()
    (tmp_path / "run" / "shard-p0000-000002" / "id.npy").write_bytes(b"junk")
    assert len(open_store(tmp_path / "run")) == 8  # readers never see incomplete shards

    with StoreWriter(tmp_path / "run", kind="topk", meta=META, fields=FIELDS, rows_per_shard=4) as w:
        assert w.num_rows == 8
        done = set(w.completed_ids().tolist())
        assert done == {r["row_id"] for r in rows[:8]}
        for r in rows:
            if r["row_id"] not in done:
                w.add(**r)
    assert tree_bytes(tmp_path / "run") == tree_bytes(tmp_path / "ref")

    # reopening a finished store and adding nothing changes nothing
    write(tmp_path / "run", [])
    assert tree_bytes(tmp_path / "run") == tree_bytes(tmp_path / "ref")


def test_mismatched_meta_or_fields_refused(tmp_path):
    write(tmp_path, make_rows(2))
    with pytest.raises(StoreMismatchError, match=r"meta\['k'\].*3.*asks for 5"):
        write(tmp_path, [], meta={**META, "k": 5})
    with pytest.raises(StoreMismatchError, match=r"meta\['tokenizer'\].*<missing>.*'abc'"):
        write(tmp_path, [], meta={**META, "tokenizer": "abc"})
    with pytest.raises(StoreMismatchError, match="fields"):
        write(tmp_path, [], fields=FIELDS[:-1])
    with pytest.raises(StoreMismatchError, match="rows_per_shard.*4.*asks for 8"):
        write(tmp_path, [], rows_per_shard=8)
    assert not list(tmp_path.glob("*.lock"))  # a refused writer releases its lock


def test_empty_store_with_other_meta_replaced(tmp_path, caplog):
    write(tmp_path / "two", [], process_index=1)  # two writers closed without a row: no shard anywhere
    write(tmp_path / "two", [])
    with caplog.at_level(logging.WARNING, logger="fusejax.store"):
        write(tmp_path / "two", make_rows(3), meta={**META, "k": 5})
    assert caplog.text.count(f"{tmp_path / 'two'}: replacing an empty store") == 2 and "meta['k']" in caplog.text
    store = open_store(tmp_path / "two", verify=True)
    assert store.meta["k"] == 5 and len(store) == 3


def test_corruption_detected_and_named(tmp_path):
    write(tmp_path, make_rows(6))
    target = tmp_path / "shard-p0000-000001" / "topk_ids.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    open_store(tmp_path)  # checksums are only recomputed on request
    with pytest.raises(StoreCorruptError, match="shard-p0000-000001/topk_ids.npy"):
        open_store(tmp_path, verify=True)
    with pytest.raises(StoreCorruptError, match="topk_ids.npy"):
        open_store(tmp_path).verify()


@pytest.mark.parametrize("data", [b"", b"\x93NUMPY\x01\x00"], ids=["empty", "cut header"])
def test_empty_or_cut_npy_file_is_named(tmp_path, data):
    write(tmp_path, make_rows(6))
    target = tmp_path / "shard-p0000-000001" / "id.npy"
    good = target.read_bytes()
    target.write_bytes(data)
    with pytest.raises(StoreCorruptError, match=f"{target}: cannot load"):
        open_store(tmp_path)
    target.write_bytes(good)
    (tmp_path / "shard-p0000-000001" / "doc.npy").write_bytes(data)
    with pytest.raises(StoreCorruptError, match="shard-p0000-000001/doc.npy: cannot load"):
        list(open_store(tmp_path))


@pytest.mark.parametrize("key, value", [
    ("fields", 3), ("fields", [3]), ("fields", [{"name": "x"}]), ("fields", "abc"), ("shards", {"a": 1}),
    ("shards", [7]), ("kind", ["topk"]), ("meta", [1]), ("rows_per_shard", "4"), ("rows_per_shard", True),
])
def test_malformed_manifest_structure_is_named(tmp_path, key, value):
    write(tmp_path, make_rows(2))
    path = tmp_path / "manifest-p0000.json"
    man = json.loads(path.read_text())
    man[key] = value
    path.write_text(json.dumps(man))
    with pytest.raises(StoreCorruptError, match=f"^{path}: "):
        open_store(tmp_path)
    with pytest.raises(StoreCorruptError, match=f"^{path}: "):
        write(tmp_path, [])


def test_manifest_that_is_not_json_is_named(tmp_path):
    write(tmp_path, make_rows(2))
    path = tmp_path / "manifest-p0000.json"
    path.write_bytes(b"\xff{")
    with pytest.raises(StoreCorruptError, match=f"^{path}: cannot read manifest"):
        open_store(tmp_path)


@pytest.mark.parametrize(
    "name",
    ["../evil", "shard-p0000-000000/../../x", "/etc", "shard-p0000-000000\n"],
)
def test_path_traversal_in_manifest_refused(tmp_path, name):
    write(tmp_path, make_rows(2))
    path = tmp_path / "manifest-p0000.json"
    man = json.loads(path.read_text())
    man["shards"][0]["name"] = name
    path.write_text(json.dumps(man))
    with pytest.raises(StoreError, match="invalid shard name"):
        open_store(tmp_path)


def test_manifest_file_names_and_symlinks_refused(tmp_path):
    write(tmp_path / "s", make_rows(2))
    path = tmp_path / "s" / "manifest-p0000.json"
    man = json.loads(path.read_text())
    good = json.dumps(man)
    man["shards"][0]["sha256"]["../../x.npy"] = man["shards"][0]["sha256"].pop("text.npy")
    path.write_text(json.dumps(man))
    with pytest.raises(StoreError, match="expected"):
        open_store(tmp_path / "s")
    # a shard folder that is a link out of the store
    path.write_text(good)
    shard = tmp_path / "s" / "shard-p0000-000000"
    shard.rename(tmp_path / "outside")
    shard.symlink_to(tmp_path / "outside")
    with pytest.raises(StoreError, match="outside the store"):
        open_store(tmp_path / "s")


def test_lock_held_and_stale(tmp_path, caplog):
    w = StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4)
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4)
    # another process index writes alongside
    StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4, process_index=1).close()
    w.close()
    assert not (tmp_path / "writer-p0000.lock").exists()

    # a lock left by a process that has exited, on this host
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "writer-p0000.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start_time": 0}))
    with caplog.at_level(logging.WARNING, logger="fusejax.store"):
        StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4).close()
    assert "stale lock" in caplog.text and str(int(dead.stdout)) in caplog.text

    # a lock of another host is never taken over
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "start_time": 0}))
    with pytest.raises(StoreLockedError, match="elsewhere"):
        StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4)


def test_multi_process_merge(tmp_path):
    rows = make_rows(9)
    write(tmp_path, rows[:5], process_index=0)
    write(tmp_path, rows[5:], process_index=3)
    store = open_store(tmp_path, verify=True)
    assert [s.name for s in store.shards] == [
        "shard-p0000-000000", "shard-p0000-000001", "shard-p0003-000000",
    ]
    for got, want in zip(store, rows, strict=True):
        check_row(got, want)

    merge_manifests(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest.json"]
    merged = open_store(tmp_path, verify=True)
    assert len(merged) == 9 and merged.get(rows[7]["row_id"])["doc"] == rows[7]["doc"]
    # a writer reopened after the merge continues its own shards
    with StoreWriter(tmp_path, kind="topk", meta=META, fields=FIELDS, rows_per_shard=4, process_index=3) as w:
        assert w.num_rows == 4
        extra = make_rows(1, seed=1)[0]
        w.add(**extra)
    assert len(open_store(tmp_path)) == 10

    # disagreeing per-process manifests are refused with the key named
    write(tmp_path / "x", rows[:1], process_index=0)
    write(tmp_path / "x" / "other", rows[1:2], process_index=1, meta={**META, "k": 9})
    (tmp_path / "x" / "other" / "manifest-p0001.json").rename(tmp_path / "x" / "manifest-p0001.json")
    with pytest.raises(StoreMismatchError, match=r"meta\['k'\]"):
        open_store(tmp_path / "x")


def test_duplicate_ids_detected(tmp_path):
    rows = make_rows(3)
    rows[2]["row_id"] = rows[0]["row_id"]
    write(tmp_path, rows, rows_per_shard=2)
    with pytest.raises(StoreCorruptError, match="appears twice.*shard-p0000-000000.*shard-p0000-000001"):
        open_store(tmp_path)


def test_write_json_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    import fusejax.files as files

    target = tmp_path / "summary.json"
    files.write_json(target, {"blocks": 1})
    before = target.read_bytes()

    def full_disk(path, data):
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_json(target, {"blocks": 2})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    import fusejax.files as files

    def no_constants(name):
        raise ValueError(f"not valid JSON: {name}")

    files.write_json(tmp_path / "summary.json", {"loss": float("nan"), "curve": [1.5, float("inf"), -float("inf")]})
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text, parse_constant=no_constants) == {"loss": None, "curve": [1.5, None, None]}
