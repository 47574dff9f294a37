"""An append-only, resumable, checksummed on-disk store of rows (host-only: numpy + json, no JAX).

Every pipeline stage that produces per-block data (the prepared corpus, the sources' top-k distributions,
the aligned distributions) writes it through this module, so that a killed job resumes where it stopped and
a finished stage can be verified and read back by block id.

Rows and fields
    A row is one block. It has an ``int64`` id (stable across runs; the corpus block id) and one value per
    field. A :class:`Field` has a name, a dtype and a per-row trailing shape. A fixed field holds an array of
    exactly ``shape`` per row (``seq_ce``: float32, shape ``()``). A ragged field holds ``[T_i, *shape]`` per
    row with a row-dependent ``T_i`` (``topk_ids``: int32, shape ``(k,)``). The dtypes ``"bytes"`` and
    ``"str"`` (UTF-8) are always ragged. Numeric dtypes: bool, (u)int8..64, float16/32/64, bfloat16.

Layout of a store directory::

    manifest-p0000.json         the manifest of writer process 0 (one per writer process)
    manifest.json               optional: the merged manifest of all processes (see :func:`merge_manifests`)
    shard-p0000-000000/         shard 0 of process 0, a folder of .npy files:
        id.npy                  int64 [n]               row ids
        <fixed>.npy             dtype [n, *shape]
        <ragged>.npy            dtype [sum T_i, *shape]  rows concatenated (uint8 bytes for bytes/str)
        <ragged>.offsets.npy    int64 [n + 1]            row i is data[offsets[i]:offsets[i+1]]
    writer-p0000.lock           while process 0 writes: {"pid", "host", "start_time"}

16-bit floats without a numpy type (bfloat16) are saved as their ``uint16`` bit pattern and viewed back as
the field dtype on load; every file is opened with ``mmap_mode="r"``.

Manifest (JSON, sorted keys): ``format``, ``version``, ``kind`` (e.g. ``"corpus"``, ``"topk"``,
``"aligned"``), ``meta`` (a JSON dict fixed at creation: model, tokenizer fingerprint, k, block size, ...),
``fields``, ``rows_per_shard``, ``process_index``, and ``shards``: the complete shards in write order, each
with its ``name``, ``rows`` and the ``sha256`` of every file.

Atomicity and resume
    A writer buffers rows and cuts a shard every ``rows_per_shard`` rows (and a last, shorter one on
    :meth:`StoreWriter.close`). A shard is written into ``.tmp-<name>/``, every file fsynced, the folder
    renamed to ``<name>/``, then the manifest is rewritten atomically (temporary file, fsync, rename,
    directory fsync). A kill at any moment leaves the old or the new complete state; only shards listed
    in a manifest exist for readers. Reopening a writer removes its leftover temporary folders and any
    shard folder of its process that the manifest does not list, and continues after the last complete
    shard: ``num_rows`` / :meth:`StoreWriter.completed_ids` tell the caller which rows to skip. A writer
    that leaves its ``with`` block by an exception drops its buffered rows (no short shard), so a resumed
    run that adds the remaining rows in the same order writes byte-identical files to an uninterrupted
    run: nothing in a shard or manifest depends on time, host or process id.

    Reopening with a different ``kind``, ``meta``, ``fields`` or ``rows_per_shard`` raises
    :class:`StoreMismatchError` naming the first differing key and both values, unless no manifest lists a
    shard yet (an empty store, e.g. of a corpus that gave no blocks): its differing manifests are then
    removed with a logged warning naming the folder, and the writer starts a new store there.

Several writer processes
    Separate jobs may write disjoint rows into the same folder, each with its own ``process_index``: their
    shards (``shard-pNNNN-*``), manifests (``manifest-pNNNN.json``) and locks are disjoint. A reader combines
    all manifests (they must agree on kind, meta, fields and rows_per_shard; ids must be unique).
    :func:`merge_manifests` folds the per-process manifests into one ``manifest.json`` once all writers
    finished; a writer reopened afterwards picks its shards up from there.

Safety
    Names read from a manifest are validated: shard names must match ``shard-pNNNN-NNNNNN``, the files of a
    shard must be exactly those its fields imply, and every path must resolve inside the store. A lock
    file per process index stops a second concurrent writer; a lock left by a dead process on the same host
    is replaced with a logged warning. :meth:`StoreReader.verify` (or ``open_store(..., verify=True)``)
    recomputes every checksum and names the corrupted file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fusejax import files
from fusejax.files import TEMP_PREFIX, json_bytes

log = logging.getLogger(__name__)

FORMAT = "fusejax-store"
VERSION = 1
ID_FILE = "id.npy"

_NUMERIC_DTYPES = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    )
}
_NUMERIC_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
_BYTE_DTYPES = ("bytes", "str")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHARD_RE = re.compile(r"shard-p(\d{4})-(\d{6})\Z")
_MANIFEST_RE = re.compile(r"manifest-p(\d{4})\.json\Z")


class StoreError(ValueError):
    """A store that cannot be opened, read or written as asked."""


class StoreMismatchError(StoreError):
    """An existing store was written with other kind / meta / fields / rows_per_shard than requested."""


class StoreCorruptError(StoreError):
    """A file whose checksum or shape does not match its manifest."""


class StoreLockedError(StoreError):
    """Another live writer holds the lock of this process index."""


@dataclass(frozen=True)
class Field:
    """One named column: ``dtype`` (see module docstring), per-row trailing ``shape``, ``ragged`` or fixed."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    ragged: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or self.name == "id":
            raise StoreError(f"field name {self.name!r}: expected an identifier other than 'id'")
        if self.dtype not in _NUMERIC_DTYPES and self.dtype not in _BYTE_DTYPES:
            raise StoreError(
                f"field {self.name!r}: dtype {self.dtype!r} is not one of "
                f"{sorted(_NUMERIC_DTYPES) + list(_BYTE_DTYPES)}"
            )
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise StoreError(f"field {self.name!r}: shape {self.shape!r} must be non-negative ints")
        object.__setattr__(self, "shape", shape)
        if self.dtype in _BYTE_DTYPES:
            if shape:
                raise StoreError(f"field {self.name!r}: dtype {self.dtype!r} takes no shape, got {shape}")
            object.__setattr__(self, "ragged", True)

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype of the values (uint8 for bytes/str)."""
        return _NUMERIC_DTYPES.get(self.dtype, np.dtype(np.uint8))

    @property
    def files(self) -> tuple[str, ...]:
        return (f"{self.name}.npy", f"{self.name}.offsets.npy") if self.ragged else (f"{self.name}.npy",)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "ragged": self.ragged}

    @classmethod
    def from_json(cls, obj: Mapping) -> Field:
        try:
            return cls(obj["name"], obj["dtype"], tuple(obj["shape"]), bool(obj["ragged"]))
        except (KeyError, TypeError) as err:
            raise StoreError(f"bad field spec {obj!r}: {err}") from None

    def encode(self, value: Any, row_id: int) -> np.ndarray:
        """One row's value -> a numpy array of the field dtype and checked shape."""
        where = f"field {self.name!r} of row {row_id}"
        if self.dtype == "str":
            if not isinstance(value, str):
                raise StoreError(f"{where}: expected str, got {type(value).__name__}")
            return np.frombuffer(value.encode("utf-8"), np.uint8)
        if self.dtype == "bytes":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise StoreError(f"{where}: expected bytes, got {type(value).__name__}")
            return np.frombuffer(bytes(value), np.uint8)
        arr = np.asarray(value)
        _check_cast(arr, self.np_dtype, where)
        expected = self.shape if not self.ragged else (arr.shape[:1] + self.shape if arr.ndim else None)
        if arr.shape != expected:
            want = f"[T, {', '.join(map(str, self.shape))}]" if self.ragged else str(self.shape)
            raise StoreError(f"{where}: shape {arr.shape} does not match {want}")
        return arr.astype(self.np_dtype, copy=False)

    def decode(self, arr: np.ndarray) -> Any:
        if self.dtype == "bytes":
            return arr.tobytes()
        if self.dtype == "str":
            return arr.tobytes().decode("utf-8")
        return arr


def _category(dtype: np.dtype) -> str:
    if dtype == _NUMERIC_DTYPES["bfloat16"]:
        return "f"
    return {"b": "b", "i": "i", "u": "i", "f": "f"}.get(dtype.kind, "?")


def _check_cast(arr: np.ndarray, dst: np.dtype, where: str) -> None:
    """Refuse lossy kind changes (float -> int, int -> bool, ...) and out-of-range integers."""
    src, dst_cat = _category(arr.dtype), _category(dst)
    allowed = {"b": "b", "i": "bi", "f": "bif"}[dst_cat]
    if src not in allowed:
        raise StoreError(f"{where}: cannot store dtype {arr.dtype} as {dst}")
    if dst_cat == "i" and src == "i" and arr.size:
        info = np.iinfo(dst)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise StoreError(f"{where}: values [{arr.min()}, {arr.max()}] do not fit {dst}")


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype written to .npy: ml_dtypes types (kind 'V') as unsigned ints of the same width."""
    return np.dtype(f"uint{dtype.itemsize * 8}") if dtype.kind == "V" else dtype


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr.view(_storage_dtype(arr.dtype))), allow_pickle=False)
    return buf.getvalue()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first key path where two JSON values differ, with both values; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}[{key!r}]")
            if diff:
                return diff
        return None
    return None if a == b else (path, a, b)


def _normalize_json(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} must be JSON-serializable: {err}") from None


def _header(kind: str, meta: Mapping, fields: Sequence[Field], rows_per_shard: int) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "meta": _normalize_json(dict(meta), "meta"),
        "fields": [f.to_json() for f in fields],
        "rows_per_shard": rows_per_shard,
    }


_HEADER_KEYS = ("format", "version", "kind", "meta", "fields", "rows_per_shard")


# JSON types of the manifest's top-level entries (format and version are compared by value)
_MANIFEST_TYPES = {"kind": str, "meta": dict, "fields": list, "rows_per_shard": int, "shards": list}


def _read_manifest(root: Path, path: Path) -> dict:
    """Load one manifest and validate its structure and names; raises StoreCorruptError naming the file."""
    try:
        man = json.loads(path.read_text("utf-8"))
    except OSError as err:
        raise StoreError(f"{path}: cannot read manifest: {err}") from None
    except ValueError as err:  # not UTF-8, not JSON
        raise StoreCorruptError(f"{path}: cannot read manifest: {err}") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") != VERSION:
        raise StoreCorruptError(
            f"{path}: not a {FORMAT} manifest of version {VERSION} "
            f"(format={man.get('format') if isinstance(man, dict) else None!r}, "
            f"version={man.get('version') if isinstance(man, dict) else None!r})"
        )
    missing = [k for k in (*_HEADER_KEYS, "shards") if k not in man]
    if missing:
        raise StoreCorruptError(f"{path}: manifest lacks {missing}")
    for key, kind in _MANIFEST_TYPES.items():
        if not isinstance(man[key], kind) or isinstance(man[key], bool):
            raise StoreCorruptError(f"{path}: manifest entry {key!r} is {man[key]!r}, expected a JSON {kind.__name__}")
    try:
        fields = [Field.from_json(f) for f in man["fields"]]
    except StoreError as err:
        raise StoreCorruptError(f"{path}: {err}") from None
    expected_files = {ID_FILE, *(name for f in fields for name in f.files)}
    for shard in man["shards"]:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not _SHARD_RE.match(name):
            raise StoreCorruptError(f"{path}: invalid shard name {name!r} (expected shard-pNNNN-NNNNNN)")
        files = shard.get("sha256")
        if not isinstance(files, dict) or set(files) != expected_files:
            raise StoreCorruptError(
                f"{path}: shard {name!r} lists files {sorted(files) if isinstance(files, dict) else files!r}, "
                f"expected {sorted(expected_files)}"
            )
        for fname in files:
            _inside(root, root / name / fname)
        if not isinstance(shard.get("rows"), int) or shard["rows"] < 0:
            raise StoreCorruptError(f"{path}: shard {name!r} has invalid row count {shard.get('rows')!r}")
    return man


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise StoreError(f"{path} resolves to {resolved}, outside the store {root}")
    return resolved


def _manifest_paths(root: Path) -> list[Path]:
    paths = sorted(p for p in root.iterdir() if _MANIFEST_RE.match(p.name))
    if (root / "manifest.json").exists():
        paths.insert(0, root / "manifest.json")
    return paths


def _combine(root: Path, manifests: Sequence[tuple[Path, dict]]) -> tuple[dict, list[dict]]:
    """Header and shards (ordered by process, then index) of several manifests that must agree."""
    (first_path, header), shards = manifests[0], {}
    for path, man in manifests:
        for key in _HEADER_KEYS:
            diff = _first_difference(header[key], man[key], key)
            if diff:
                raise StoreMismatchError(
                    f"{root}: manifests disagree on {diff[0]}: {first_path.name} has {diff[1]!r}, "
                    f"{path.name} has {diff[2]!r}"
                )
        for shard in man["shards"]:
            seen = shards.setdefault(shard["name"], shard)
            if seen != shard:
                raise StoreCorruptError(f"{root}: shard {shard['name']} is listed differently in {path.name}")
    ordered = sorted(shards.values(), key=lambda s: tuple(map(int, _SHARD_RE.match(s["name"]).groups())))
    return {k: header[k] for k in _HEADER_KEYS}, ordered


class Ragged:
    """A ragged column of one shard: row ``i`` is ``data[offsets[i]:offsets[i+1]]``."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i] : self.offsets[i + 1]]


class Shard:
    """One complete shard, its files memory-mapped: ``ids`` int64 [n] and :meth:`column` per field."""

    def __init__(self, root: Path, record: Mapping, fields: Sequence[Field]):
        self.name, self.num_rows, self.sha256 = record["name"], record["rows"], record["sha256"]
        self.path = root / self.name
        self.fields = {f.name: f for f in fields}
        self.ids = self._load(ID_FILE, np.dtype(np.int64))
        if self.ids.shape != (self.num_rows,):
            raise StoreCorruptError(
                f"{self.path / ID_FILE}: shape {self.ids.shape}, manifest says {self.num_rows} rows"
            )
        self._columns: dict[str, np.ndarray | Ragged] = {}

    def _load(self, fname: str, dtype: np.dtype) -> np.ndarray:
        path = self.path / fname
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
            raise StoreCorruptError(f"{path}: cannot load: {err}") from None
        if arr.dtype != _storage_dtype(dtype):
            raise StoreCorruptError(f"{path}: dtype {arr.dtype}, expected {_storage_dtype(dtype)}")
        return arr.view(dtype) if dtype.kind == "V" else arr

    def column(self, name: str) -> np.ndarray | Ragged:
        """A fixed field as an array [n, *shape]; a ragged one as :class:`Ragged` (bytes/str as uint8)."""
        if name not in self._columns:
            if name not in self.fields:
                raise KeyError(f"store has no field {name!r}; fields: {sorted(self.fields)}")
            f = self.fields[name]
            data = self._load(f"{name}.npy", f.np_dtype)
            if f.ragged:
                offsets = self._load(f"{name}.offsets.npy", np.dtype(np.int64))
                ok = offsets.shape == (self.num_rows + 1,) and data.shape[1:] == f.shape
                if not ok or offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
                    raise StoreCorruptError(f"{self.path / name}.offsets.npy: inconsistent with {name}.npy")
                self._columns[name] = Ragged(data, offsets)
            else:
                if data.shape != (self.num_rows, *f.shape):
                    raise StoreCorruptError(
                        f"{self.path / name}.npy: shape {data.shape}, expected {(self.num_rows, *f.shape)}"
                    )
                self._columns[name] = data
        return self._columns[name]

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` of this shard: ``{"id": int, field: value}`` (bytes/str decoded, arrays memory-mapped)."""
        out: dict[str, Any] = {"id": int(self.ids[i])}
        for name, f in self.fields.items():
            out[name] = f.decode(self.column(name)[i])
        return out

    def verify(self) -> None:
        for fname, expected in sorted(self.sha256.items()):
            actual = _sha256_file(self.path / fname)
            if actual != expected:
                raise StoreCorruptError(f"{self.path / fname}: sha256 {actual} does not match manifest {expected}")


class StoreReader:
    """Read access to all complete shards of a store: by position, by row id, or shard by shard."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"store {self.path} does not exist")
        manifests = [(p, _read_manifest(self.path, p)) for p in _manifest_paths(self.path)]
        if not manifests:
            raise StoreError(f"{self.path}: no manifest.json or manifest-pNNNN.json (not a store, or nothing written)")
        header, records = _combine(self.path, manifests)
        self.kind: str = header["kind"]
        self.meta: dict = header["meta"]
        self.rows_per_shard: int = header["rows_per_shard"]
        self.fields = [Field.from_json(f) for f in header["fields"]]
        for rec in records:
            _inside(self.path, self.path / rec["name"])
        self.shards = [Shard(self.path, rec, self.fields) for rec in records]
        if verify:
            self.verify()
        sizes = np.array([s.num_rows for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.ids = np.concatenate([s.ids for s in self.shards]) if self.shards else np.zeros(0, np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if dup.size:
            a, b = self._order[dup[0]], self._order[dup[0] + 1]
            raise StoreCorruptError(
                f"{self.path}: row id {sorted_ids[dup[0]]} appears twice "
                f"(shards {self._locate(a)[0].name} and {self._locate(b)[0].name})"
            )
        self._sorted_ids = sorted_ids

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, position: int) -> tuple[Shard, int]:
        s = int(np.searchsorted(self._starts, position, side="right")) - 1
        return self.shards[s], position - int(self._starts[s])

    def row(self, position: int) -> dict[str, Any]:
        """The row at ``position`` in write order (shards by process index, then shard index)."""
        if not 0 <= position < len(self):
            raise IndexError(f"row position {position} out of range for {len(self)} rows")
        shard, i = self._locate(position)
        return shard.row(i)

    def position(self, row_id: int) -> int:
        """Write-order position of ``row_id``; KeyError if absent."""
        k = int(np.searchsorted(self._sorted_ids, row_id))
        if k == len(self._sorted_ids) or self._sorted_ids[k] != row_id:
            raise KeyError(f"row id {row_id} is not in store {self.path}")
        return int(self._order[k])

    def __contains__(self, row_id: int) -> bool:
        k = int(np.searchsorted(self._sorted_ids, row_id))
        return k < len(self._sorted_ids) and self._sorted_ids[k] == row_id

    def get(self, row_id: int) -> dict[str, Any]:
        """The row with id ``row_id`` (see :meth:`Shard.row`)."""
        return self.row(self.position(row_id))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            for i in range(shard.num_rows):
                yield shard.row(i)

    def verify(self) -> None:
        """Recompute every file's sha256; raises StoreCorruptError naming the first bad file."""
        for shard in self.shards:
            shard.verify()


def open_store(path: str | os.PathLike, *, verify: bool = False) -> StoreReader:
    """Open a store for reading (all processes' complete shards); ``verify`` checks every checksum first."""
    return StoreReader(path, verify=verify)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """An exclusive lock file (e.g. ``writer-pNNNN.lock``) holding pid, host and start time: taken at
    construction, freed by :meth:`release`; a lock left by a dead pid on this host is taken over."""

    def __init__(self, path: Path):
        self.path = path
        info = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(json_bytes(info))
            return
        raise StoreLockedError(f"{path}: could not take the lock")

    def _take_over_if_stale(self) -> None:
        try:
            held = json.loads(self.path.read_text("utf-8"))
            pid, host = int(held["pid"]), str(held["host"])
        except (OSError, ValueError, KeyError, TypeError):
            raise StoreLockedError(f"{self.path}: unreadable lock file; remove it if no writer is running") from None
        if host != socket.gethostname() or _pid_alive(pid):
            since = held.get("start_time")
            if isinstance(since, (int, float)):
                since = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(since))
            raise StoreLockedError(
                f"{self.path}: held by pid {pid} on host {host} since {since}; "
                "another writer of this output is running (remove the lock only if it is not)"
            )
        log.warning("%s: replacing a stale lock of dead pid %d on this host (%s)", self.path, pid, host)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


class StoreWriter:
    """Appends rows to a store as process ``process_index``; resumes after its last complete shard.

    Use as a context manager. ``meta`` is any JSON dict; ``fields`` the columns; a shard is cut every
    ``rows_per_shard`` rows. On an existing store all of these must equal what it was created with.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        kind: str,
        meta: Mapping[str, Any],
        fields: Sequence[Field],
        rows_per_shard: int,
        process_index: int = 0,
    ):
        if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise StoreError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
        if not isinstance(process_index, int) or not 0 <= process_index <= 9999:
            raise StoreError(f"process_index must be an int in [0, 9999], got {process_index!r}")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise StoreError(f"duplicate field names in {names}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fields = list(fields)
        self.process_index = process_index
        self._prefix = f"shard-p{process_index:04d}-"
        self._manifest_path = self.path / f"manifest-p{process_index:04d}.json"
        self._header = _header(kind, meta, self.fields, rows_per_shard)
        self._lock = WriterLock(self.path / f"writer-p{process_index:04d}.lock")
        try:
            self._shards = self._load_existing()
            self._clean_leftovers()
        except BaseException:
            self._lock.release()
            raise
        self._buffer: list[tuple[int, list[np.ndarray]]] = []
        self._closed = False

    def _load_existing(self) -> list[dict]:
        manifests = [(p, _read_manifest(self.path, p)) for p in _manifest_paths(self.path)]
        if not manifests:
            return []
        empty = not any(man["shards"] for _, man in manifests)
        kept = []
        for path, man in manifests:
            diff = next(filter(None, (_first_difference(man[key], self._header[key], key) for key in _HEADER_KEYS)),
                        None)
            if diff and empty:  # no complete shard yet: nothing to keep, the new inputs replace the old ones
                log.warning("%s: replacing an empty store (%s, no complete shard) written with %s = %r; this writer "
                            "asks for %r", self.path, path.name, *diff)
                path.unlink()
            elif diff:
                raise StoreMismatchError(
                    f"store {self.path} ({path.name}) was written with {diff[0]} = {diff[1]!r}; "
                    f"this writer asks for {diff[2]!r}"
                )
            else:
                kept.append((path, man))
        if not kept:
            return []
        _, shards = _combine(self.path, kept)
        mine = [s for s in shards if s["name"].startswith(self._prefix)]
        for k, s in enumerate(mine):
            if s["name"] != self._shard_name(k):
                raise StoreCorruptError(
                    f"{self.path}: shards of process {self.process_index} are not contiguous at {s['name']}"
                )
        return mine

    def _shard_name(self, index: int) -> str:
        return f"{self._prefix}{index:06d}"

    def _clean_leftovers(self) -> None:
        """Remove this process's temp folders/files and shard folders that no manifest lists."""
        listed = {s["name"] for s in self._shards}
        for p in self.path.iterdir():
            name = p.name.removeprefix(TEMP_PREFIX)
            ours = name.startswith(self._prefix) or name.startswith(self._manifest_path.name)
            if ours and (p.name.startswith(TEMP_PREFIX) or (p.is_dir() and name not in listed)):
                log.info("%s: removing leftover %s of an interrupted writer", self.path, p.name)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    @property
    def num_rows(self) -> int:
        """Rows of this process in complete shards (buffered rows not counted)."""
        return sum(s["rows"] for s in self._shards)

    def completed_ids(self) -> np.ndarray:
        """int64 ids of this process's rows in complete shards, in write order."""
        ids = [np.load(self.path / s["name"] / ID_FILE, mmap_mode="r") for s in self._shards]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def add(self, row_id: int, **values: Any) -> None:
        """Buffer one row (one value per field); writes a shard when ``rows_per_shard`` rows are buffered."""
        if self._closed:
            raise StoreError(f"writer of {self.path} is closed")
        expected = {f.name for f in self.fields}
        if set(values) != expected:
            raise StoreError(
                f"row {row_id}: fields {sorted(values)} do not match the store's {sorted(expected)}"
            )
        if not isinstance(row_id, (int, np.integer)) or not -(2**63) <= int(row_id) < 2**63:
            raise StoreError(f"row id {row_id!r} is not an int64")
        self._buffer.append((int(row_id), [f.encode(values[f.name], row_id) for f in self.fields]))
        if len(self._buffer) >= self._header["rows_per_shard"]:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = self._shard_name(len(self._shards))
        contents = {ID_FILE: _npy_bytes(np.array([r for r, _ in self._buffer], dtype=np.int64))}
        for k, f in enumerate(self.fields):
            values = [vals[k] for _, vals in self._buffer]
            if f.ragged:
                lengths = np.array([len(v) for v in values], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                contents[f"{f.name}.offsets.npy"] = _npy_bytes(offsets)
                data = np.concatenate(values) if values else np.zeros((0, *f.shape), f.np_dtype)
                data = data.reshape(int(lengths.sum()), *f.shape)  # (not -1: a shape may hold no element)
            else:
                data = np.stack(values)
            contents[f"{f.name}.npy"] = _npy_bytes(data)
        tmp = self.path / f"{TEMP_PREFIX}{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for fname, data in contents.items():
            files.write_file(tmp / fname, data)
        files.fsync_dir(tmp)
        os.rename(tmp, self.path / name)
        files.fsync_dir(self.path)
        record = {
            "name": name,
            "rows": len(self._buffer),
            "sha256": {fname: hashlib.sha256(data).hexdigest() for fname, data in sorted(contents.items())},
        }
        self._shards.append(record)
        self._write_manifest()
        self._buffer = []

    def _write_manifest(self) -> None:
        man = {**self._header, "process_index": self.process_index, "shards": self._shards}
        files.atomic_write(self._manifest_path, json_bytes(man))

    def close(self) -> None:
        """Write buffered rows as a last (shorter) shard, the manifest, and release the lock."""
        if self._closed:
            return
        try:
            self._flush()
            if not self._manifest_path.exists():
                self._write_manifest()
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop buffered rows and release the lock (complete shards stay)."""
        self._buffer = []
        self._closed = True
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def merge_manifests(path: str | os.PathLike) -> Path:
    """Fold all per-process manifests into ``manifest.json`` (atomically) and remove them.

    Refuses while any writer lock exists. Returns the path of ``manifest.json``.
    """
    root = Path(path)
    locks = sorted(p.name for p in root.glob("writer-p*.lock"))
    if locks:
        raise StoreLockedError(f"{root}: writers still hold {locks}; merge after all writers finished")
    paths = _manifest_paths(root)
    if not paths:
        raise StoreError(f"{root}: no manifests to merge")
    header, shards = _combine(root, [(p, _read_manifest(root, p)) for p in paths])
    target = root / "manifest.json"
    files.atomic_write(target, json_bytes({**header, "process_index": None, "shards": shards}))
    for p in paths:
        if p != target:
            p.unlink()
    files.fsync_dir(root)
    return target
