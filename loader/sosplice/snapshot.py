"""`sosplice.snapshot`: the snapshots `splicectl ls` and `top` read, their
schema and their files.

One job: this module is the only one that knows where the files are, what
is in them, and how a splice's end is named. Engines write (`path_for`,
`watched`, `write`, `remove`: the engine's side, not API), viewers read
(`watch`, `read`, `read_fresh`):

  RUN_DIR/watch            a viewer touches it (`watch()`); for WATCH_TTL
                           seconds after each touch every engine publishes
  RUN_DIR/<pid>-<id>.json  one engine's `EngineSnapshot`, replaced
                           atomically (`write()`), removed by `close()`
                           (`remove()`) or, once its process is gone, by
                           the next `read()`

A file is `EngineSnapshot.to_json()`: {"pid", "backend", "time" (Unix
time), "cmdline", "splices": [`SpliceInfo.to_json()`, ...]}. None is
JSON null in the files; where a person reads it, it is "-"
(`reason_name(None)`, and the views' columns).
"""
from __future__ import annotations

import errno
import glob
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["RUN_DIR", "WATCH", "WATCH_TTL", "SpliceInfo", "EngineSnapshot", "reason_name",
           "watch", "watched", "read", "read_fresh"]

RUN_DIR = os.environ.get("SOSPLICE_RUN_DIR", "/run/sosplice")
WATCH = os.path.join(RUN_DIR, "watch")
WATCH_TTL = 5.0
# A watched engine publishes every 0.2 s (its close sweep); a viewer gives
# it this long to answer before it reads what there is.
ANSWER = 0.3


def reason_name(err: int | None) -> str:
    """How a splice's `error` is shown: "EOF" for 0, the errno's name
    ("ECONNRESET"), "-" for None (still active)."""
    if err is None:
        return "-"
    if err == 0:
        return "EOF"
    return errno.errorcode.get(err, str(err))


@dataclass(frozen=True)
class SpliceInfo:
    """One row of `Splicer.stats()`: a snapshot, safe to keep."""

    source: tuple[Any, Any]        # (local address, peer address)
    drain: tuple[Any, Any]
    source_cookie: int
    drain_cookie: int
    bytes: int
    kernel_bytes: int              # of `bytes`, moved without a copy through the process
    max: int
    idle: float | None
    state: str                     # "active", "dissolving" or "done"
    error: int | None
    throttled: bool                # bytes wait for the drain (bpf: the controller's copy path)
    age: float                     # seconds since the splice started
    idle_for: float                # seconds since the last byte moved
    pid: int = field(default=0)
    backend: str = field(default="")   # "bpf" or "worker"
    label: str = field(default="")     # splice(label=): the application's name for it

    def to_json(self) -> dict[str, Any]:
        """This row as a JSON object: every field by name, addresses as
        arrays, None as null."""
        return dict(vars(self))

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, pid: int = 0, backend: str = "") -> SpliceInfo:
        """The row `to_json()` wrote, read back: arrays are tuples again,
        null is None, and a missing key takes its zero (`pid` and
        `backend`: those given, the file's)."""
        g = obj.get
        return cls(
            source=_ends(g("source")), drain=_ends(g("drain")),
            source_cookie=int(g("source_cookie") or 0), drain_cookie=int(g("drain_cookie") or 0),
            bytes=int(g("bytes") or 0), kernel_bytes=int(g("kernel_bytes") or 0),
            max=int(g("max") or 0), idle=None if g("idle") is None else float(g("idle")),
            state=str(g("state") or "?"), error=None if g("error") is None else int(g("error")),
            throttled=bool(g("throttled")), age=float(g("age") or 0.0),
            idle_for=float(g("idle_for") or 0.0), pid=int(g("pid") or pid),
            backend=str(g("backend") or backend), label=str(g("label") or ""),
        )


def _ends(v: Any) -> tuple[Any, Any]:
    """(local, peer) from JSON: each address a tuple again, or None."""
    if not v:
        return (None, None)
    local, peer = (tuple(a) if isinstance(a, list) else a for a in v)
    return (local, peer)


@dataclass(frozen=True)
class EngineSnapshot:
    """What one engine publishes: its live and recently ended splices."""

    pid: int
    backend: str
    time: float                    # Unix time of the snapshot
    cmdline: str
    splices: tuple[SpliceInfo, ...]

    @classmethod
    def of(cls, backend: str, splices: Iterable[SpliceInfo], cmdline: str | None = None
           ) -> EngineSnapshot:
        """This process's snapshot, now (`cmdline`: /proc/self/cmdline)."""
        return cls(pid=os.getpid(), backend=backend, time=time.time(),
                   cmdline=_cmdline() if cmdline is None else cmdline, splices=tuple(splices))

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "backend": self.backend, "time": self.time,
                "cmdline": self.cmdline, "splices": [s.to_json() for s in self.splices]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EngineSnapshot:
        pid, backend = int(doc.get("pid") or 0), str(doc.get("backend") or "")
        return cls(pid=pid, backend=backend, time=float(doc.get("time") or 0.0),
                   cmdline=str(doc.get("cmdline") or ""),
                   splices=tuple(SpliceInfo.from_json(s, pid=pid, backend=backend)
                                 for s in doc.get("splices") or ()))


def _cmdline() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# -- the engine's side -----------------------------------------------------------

def path_for(engine: object) -> str:
    """The file `engine` of this process publishes to."""
    return os.path.join(RUN_DIR, f"{os.getpid()}-{id(engine):x}.json")


def watched() -> bool:
    """Whether a viewer touched WATCH in the last WATCH_TTL seconds."""
    try:
        return time.time() - os.stat(WATCH).st_mtime < WATCH_TTL
    except OSError:
        return False


def write(path: str, snap: EngineSnapshot) -> None:
    """Replace the file at `path` with `snap` atomically. Raises OSError."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(snap.to_json(), f, default=str)
    os.replace(tmp, path)


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the viewer's side -----------------------------------------------------------

def watch(run_dir: str = RUN_DIR) -> float:
    """Ask every engine to publish for the next WATCH_TTL seconds; return
    when (Unix time). Best effort: without write access to `run_dir` the
    engines publish only while someone else asks."""
    now = time.time()
    try:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "watch")
        with open(path, "a"):
            pass
        os.utime(path, (now, now))
    except OSError:
        pass
    return now


def read(pids: Iterable[int] = (), run_dir: str = RUN_DIR) -> list[EngineSnapshot]:
    """The snapshots of the engines whose processes are alive (only those
    of `pids` if any are given), as they are now; removes the files of
    processes that are gone."""
    pids = set(pids)
    for path in glob.glob(os.path.join(run_dir, "*.json.tmp")):
        pid = os.path.basename(path).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(path)  # a killed process's unfinished write
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
            pid = doc.get("pid")
            snap = EngineSnapshot.from_json(doc)
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # being replaced, removed, or not a snapshot
        if not isinstance(pid, int):
            continue
        if not _alive(pid):
            remove(path)  # left by a process that was killed
            remove(path + ".tmp")
            continue
        if not pids or pid in pids:
            out.append(snap)
    return out


def read_fresh(pids: Iterable[int] = (), wait: float = 1.0,
               run_dir: str = RUN_DIR) -> list[EngineSnapshot]:
    """`watch()`, then `read()` once every engine with splices has
    answered (or after `wait` seconds, with what there is)."""
    pids = list(pids)
    asked = watch(run_dir)
    # An engine that has never published has no file to wait for: give
    # every engine one publishing period to answer.
    first = time.monotonic() + ANSWER
    deadline = time.monotonic() + wait
    while True:
        time.sleep(0.05)
        snaps = read(pids, run_dir)
        stale = [s for s in snaps if s.splices and s.time < asked]
        now = time.monotonic()
        if now >= first and not stale or now >= deadline:
            return snaps


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
