"""Which exceptions are the user's to fix, and their one-line message (used by ``fusejax.cli``).

A *user error* is bad input or a bad environment, not a bug: the command prints ``fusejax: error: <message>``
and exits with code 2, without a traceback. These are

* the validation errors of our modules, whatever raised them: ``ConfigError``, ``StoreError`` (and its
  subclasses), ``CheckpointError``, ``ModelConfigError``, ``ShardingError``, ``CheckpointMismatchError``,
  ``DistributedError``; all but the last subclass ``ValueError``;
* ``ValueError``, ``KeyError``, ``TypeError``, ``LookupError`` and ``ImportError`` raised by a ``raise``
  statement in fusejax itself (the innermost traceback frame is in this package): our own validation;
* any ``OSError``: a missing file, a full disk (``ENOSPC``), a permission or read-only file system; also
  an OS error that TensorStore (Orbax's array writer) reports as a ``ValueError`` naming it as
  ``[os_error_code='N']`` (a full disk while saving a checkpoint: ``RESOURCE_EXHAUSTED: Error writing ...:
  No space left on device [os_error_code='28']``).

Anything else (an exception raised inside numpy, JAX, ...) is treated as a bug and keeps its traceback.
Setting the environment variable ``FUSEJAX_DEBUG=1`` shows the traceback of every error.

Library noise around a user error (:func:`quiet_background_errors`, installed by the CLI unless debugging):
when an Orbax checkpoint save fails (a full disk), its background threads log the error with a traceback
(``ERROR:absl:... raised an exception``) before the main thread raises the same error, and TensorStore's
late callbacks into Orbax's already closed asyncio loop print ``RuntimeError: Event loop is closed``. Both
are dropped, so the one line of the error the main thread reports is all the user sees.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from pathlib import Path

from fusejax.distributed import DistributedError

DEBUG_ENV = "FUSEJAX_DEBUG"
_PACKAGE = Path(__file__).resolve().parent
# exception types that count as user errors only when a fusejax frame raised them
_OWN_VALIDATION = (ValueError, LookupError, TypeError, ImportError)
# how TensorStore's ValueError names the OS error behind it
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='\d+'\]")


def debug() -> bool:
    """Whether ``FUSEJAX_DEBUG`` asks for full tracebacks (any value but empty/0/false/no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raising_file(exc: BaseException) -> Path | None:
    """The source file of the innermost traceback frame of ``exc`` (where it was raised); None without one."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve()


def _raised_in_fusejax(exc: BaseException) -> bool:
    file = _raising_file(exc)
    return file is not None and file.is_relative_to(_PACKAGE)


def _is_declared(exc: BaseException) -> bool:
    """An instance of one of our validation error classes (matched by module, so no stage module is imported)."""
    return isinstance(exc, DistributedError) or any(
        cls.__module__.split(".")[0] == "fusejax" and issubclass(cls, ValueError) for cls in type(exc).__mro__
    )


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error (see the module docstring); None when ``exc`` looks like a bug."""
    os_error = isinstance(exc, OSError) or (isinstance(exc, ValueError) and _TENSORSTORE_OS_ERROR.search(str(exc)))
    if not (os_error or _is_declared(exc) or (isinstance(exc, _OWN_VALIDATION) and _raised_in_fusejax(exc))):
        return None
    # KeyError's str() is the repr of its key: show a message argument as written
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _has_no_traceback(record: logging.LogRecord) -> bool:
    return not record.exc_info


def _closed_loop_callback(exc: BaseException) -> bool:
    """``RuntimeError: Event loop is closed`` raised by asyncio's own check (a callback into a finished loop)."""
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and _raising_file(exc) == Path(asyncio.base_events.__file__).resolve())


def quiet_background_errors() -> None:
    """Drop the tracebacks that libraries' background threads print for an error the main thread reports
    itself (see the module docstring): ``absl`` log records with a traceback, and the closed-event-loop
    errors of late callbacks (C extensions report them through ``sys.unraisablehook`` or ``sys.excepthook``).
    Every other record and exception is shown as before."""
    absl = logging.getLogger("absl")
    if _has_no_traceback not in absl.filters:
        absl.addFilter(_has_no_traceback)
    if getattr(sys.unraisablehook, "__wrapped__", None) is not None:  # installed already
        return
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(exc_type, exc, tb):
        if not _closed_loop_callback(exc):
            previous_excepthook(exc_type, exc, tb)

    def unraisablehook(unraisable):
        if not _closed_loop_callback(unraisable.exc_value):
            previous_unraisablehook(unraisable)

    excepthook.__wrapped__, unraisablehook.__wrapped__ = previous_excepthook, previous_unraisablehook
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
