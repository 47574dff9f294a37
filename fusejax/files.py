"""Atomic file writes: the one routine every store, stage summary, config copy and model file goes through.

:func:`atomic_write` writes to a temporary file in the destination's folder, flushes and fsyncs it, renames it
over the destination and fsyncs the folder: a reader sees the old file or the new one, never a partial one.
A write that fails (a full disk, an interrupt) removes its temporary file and leaves the old file as it was.
:func:`write_file` and :func:`fsync_dir` are the two primitives (the fault tests wrap them to inject crashes).

Never imports JAX.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_PREFIX = ".tmp-"  # temporary files and folders start with this; readers ignore them


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated) and fsync it; not atomic by itself."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that renames and new files in it survive a crash of the machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name used while ``path`` is written (same folder, hidden, unique per process)."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` atomically by ``data`` (bytes, or a function writing to an open binary file); the
    parent folder is created when missing and the file is readable by all (mode 0644). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if callable(data):
            with open(tmp, "wb") as f:
                data(f)
                f.flush()
                os.fsync(f.fileno())
        else:
            write_file(tmp, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the old file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that it is valid JSON (``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON every fusejax file uses: sorted keys, indented, UTF-8, trailing newline; NaN and
    infinities become ``null`` (:func:`json_safe`), so the file is always valid JSON."""
    text = json.dumps(json_safe(obj), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`). Used for every summary and
    report a stage writes."""
    return atomic_write(path, json_bytes(obj))
