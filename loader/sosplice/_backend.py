"""What the engine (`_engine.Splicer`) and its backends share: the
protocol a backend implements, and the few constants and helpers both
sides use. This module imports neither side, so there is no import circle:
_engine imports the backends, and they import only this.

A backend moves the bytes and decides when a splice is flushed; the engine
owns everything else (validation, the tables, the lifecycle, the [I] part
of each record, the end decision of close(), and the only writers of
ACTIVE -> DISSOLVING (`Splicer._stop_taking`) and DISSOLVING -> DONE
(`Splicer.ended`)).

What a backend may use of its engine (`eng`), and nothing else:
  eng._lock                 the engine lock (see its rules in _engine)
  eng._live, eng._drains,   the tables, read-only, under the lock
  eng._swept
  eng._life                 the lifecycle, read-only
  eng._ready                the eventfd of ended splices (read-only)
  eng.backlog_cap           the cap it was created with
  eng._stop_taking(rec, e)  ACTIVE -> DISSOLVING (the backend then flushes)
  eng.ended(rec)            the one way to report an end: DONE (under the lock)
  eng._closed_by_app(rec), eng._app_closed(rec, end)
  eng._expire_recent(), eng._snapshot(), eng._write_snapshot(doc)
                            the periodic sweep's engine half
"""
from __future__ import annotations

import builtins
import enum
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._splice import Splice, SpliceRecord

DEFAULT_BACKLOG_CAP = 4 << 20
# How often to check whether the application has closed a spliced fd (two
# fstat() per splice), unless that takes more than SWEEP_SHARE of the time.
CLOSE_SWEEP = 0.2
SWEEP_SHARE = 0.02


class Life(enum.Enum):
    """An engine's lifecycle: OPEN -> CLOSING (close() has begun: no new
    splice; the live ones are flushed) -> CLOSED (the backend stopped)."""
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _err(code: int, msg: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {msg}")


def _next_sweep(started: float) -> float:
    """When the next sweep that began at `started` (monotonic) may run."""
    took = time.monotonic() - started
    return started + builtins.max(CLOSE_SWEEP, took / SWEEP_SHARE)


class Backend(Protocol):
    """How bytes move. Every method but `wait` and `close` is called with
    the engine lock held; a backend's own finer locks are taken before the
    engine lock, never after."""

    name: str   # "bpf" or "worker": `Splicer.backend`

    def start(self, init: dict[str, Any]) -> SpliceRecord:
        """Set up the data path (under the lock) and return the backend's
        record, made with the shared [I] fields in `init`; the record is
        not live yet. Raises OSError, having undone what it set up."""
        ...

    def started(self, rec: SpliceRecord) -> None:
        """The record is in the tables: let bytes flow (under the lock)."""
        ...

    def dissolve(self, rec: SpliceRecord) -> None:
        """End `rec` with 0 unless it is already ending (under the lock):
        the backend calls `eng._stop_taking(rec, 0)` where it may (its own
        thread, for the worker), then flushes and reports with
        `eng.ended(rec)`. Does not wait."""
        ...

    def abandon(self, rec: SpliceRecord) -> None:
        """close() gave up waiting for `rec`'s drain: release and report it
        now (under the lock; the worker backend posts it to its thread)."""
        ...

    def wait(self, handle: Splice, timeout: float | None) -> bool:
        """Wait until `handle` has ended: True, or False after `timeout` s
        (without the lock: thread=False drives the engine meanwhile)."""
        ...

    def refresh(self, rec: SpliceRecord) -> None:
        """Bring kernel-side counters into the record (under the lock)."""
        ...

    def alive_sources(self) -> set[int] | None:
        """Cookies of sockets that may still be spliced again with a
        counted history (bpf: still in `sources`), for forgetting `_last`
        entries of the others; None: keep them all (under the lock)."""
        ...

    def fileno(self) -> int | None:
        """The fd the application waits on (thread=False), or None: the
        engine's eventfd of ended splices."""
        ...

    def timeout(self) -> float | None:
        """With thread=False: seconds until reap() must be called again."""
        ...

    def drive(self) -> None:
        """Called by reap() before it collects (thread=False: one step)."""
        ...

    def close(self) -> None:
        """Stop the threads and release the backend's resources, once every
        live splice has been reported (called without the lock)."""
        ...
