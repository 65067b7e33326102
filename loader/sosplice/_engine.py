"""What every backend shares: the API, validation, and the end of a splice.

`Splicer` is the one public engine class, a plain class: it holds
`self._backend`, an object implementing `_backend.Backend`, which
`Splicer(backend=...)` chooses:

  "bpf"     _sockmap.SockmapBackend: the verdict program moves bytes in
            softirq context; a controller thread keeps limits and order.
  "worker"  _worker.WorkerBackend: splice(2) through a pipe per splice,
            driven by one worker thread per CPU; no privilege needed.
  "auto"    bpf if its programs load, else worker; `Splicer.fallback`
            says why bpf did not (any load failure: privilege, kernel,
            bcc, a compile or verifier error).

The backend owns how bytes move and when a splice is flushed; this class
owns everything the application sees: validation and errors, the
lifecycle (`Life`), the tables of live and ended splices, the end decision
of close(), reporting each end once (`ended`, the only writer of DONE;
`_stop_taking`, the only writer of DISSOLVING), `stats()` and when to
publish the snapshots `splicectl ls/top` read (their schema and files:
`snapshot`). What a backend may touch of the engine: see `_backend`.

Lock: `Splicer._lock` guards the tables below and every record's
transition to DONE. A backend may add its own finer locks; it takes them
before this one, never after.
"""
from __future__ import annotations

import builtins
import collections
import errno
import math
import os
import socket
import stat
import threading
import time
from typing import Any, Callable

from . import snapshot as snap
from . import _bpf, _sock
from ._backend import CLOSE_SWEEP, DEFAULT_BACKLOG_CAP, SWEEP_SHARE, Backend, Life, _err, _next_sweep
from ._sockmap import SockmapBackend, adopt_programs
from ._splice import Splice, SpliceRecord, State
from ._worker import WorkerBackend
from .snapshot import SpliceInfo

# CLOSE_SWEEP, SWEEP_SHARE, Life, _err and _next_sweep live in _backend,
# which the backends import instead of this module; they stay importable
# from here.
MIN_BACKLOG_CAP = 64 << 10
# The bpf backend sizes the drain's SO_SNDBUF to twice the cap, an int.
MAX_BACKLOG_CAP = 256 << 20
BACKENDS = ("bpf", "worker", "auto")
# How long dissolved splices stay visible in stats().
RECENT = 60.0
# ... and at most this many of them: a proxy ending thousands of splices a
# second would otherwise keep hundreds of thousands of records alive, in
# memory and in every pass of Python's garbage collector.
RECENT_MAX = 4096
# Publishing snapshots for `splicectl ls` and `top` (`snapshot`) takes at
# most this share of the time.
SNAPSHOT_SHARE = 0.02


def _check_sock_type(obj: object, what: str) -> None:
    if isinstance(obj, bool) or not isinstance(obj, (int, socket.socket)):
        raise TypeError(f"{what} must be a socket.socket or an int fd, not {type(obj).__name__}")


def _fd_of(obj: object, what: str) -> int:
    _check_sock_type(obj, what)
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise _err(errno.EBADF, f"{what} is closed")
    return fd


def _inode_of(fd: int, what: str) -> int:
    try:
        st = os.fstat(fd)
    except (OSError, OverflowError):
        raise _err(errno.EBADF, f"{what} fd {fd} is not open") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _err(errno.ENOTSOCK, f"{what} fd {fd} is not a socket")
    return st.st_ino


def _check_socket(fd: int, what: str) -> socket.socket:
    """Validate one end; return a dup of it, ours to close."""
    s = _sock.dup(fd)
    try:
        _check_connected(s, what)
    except BaseException:
        s.close()
        raise
    return s


def _check_connected(s: socket.socket, what: str) -> None:
    """A TCP socket (IPv4 or IPv6) that is not listening."""
    if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM \
            or s.proto not in (0, socket.IPPROTO_TCP):
        raise _err(errno.EPROTONOSUPPORT, f"{what} must be a TCP socket (IPv4 or IPv6)")
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise _err(errno.EOPNOTSUPP, f"{what} is listening; splice an accepted or connected socket")


def _addrs(s: socket.socket, what: str) -> tuple[Any, Any]:
    """(local, peer) address of a connected socket; ENOTCONN if it is not."""
    try:
        return s.getsockname(), s.getpeername()
    except OSError:
        raise _err(errno.ENOTCONN, f"{what} is not connected; connect it first") from None


def _names(src: socket.socket, dst: socket.socket, sa: tuple, da: tuple) -> tuple:
    """(source cookie, drain cookie, addresses of source, of drain); refuses
    a drain that is the other end of the source's own connection (ELOOP)."""
    if sa[0] == da[1] and sa[1] == da[0]:
        raise _err(errno.ELOOP, "drain is the other end of the source's own connection")
    return _sock.cookie(src), _sock.cookie(dst), sa, da


def _check_options(max: object, idle: object, label: object) -> int:
    """Types, then values, of splice()'s options; returns idle in ns."""
    if isinstance(max, bool) or not isinstance(max, int):
        raise TypeError(f"max must be an int byte count, not {type(max).__name__}")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, (int, float))):
        raise TypeError(f"idle must be seconds as a float or None, not {type(idle).__name__}")
    if not isinstance(label, str):
        raise TypeError(f"label must be a str, not {type(label).__name__}")
    if max < 0:
        raise _err(errno.EINVAL, f"max must be >= 0 (0 = no limit), not {max}")
    if max >= 1 << 62:
        raise _err(errno.EINVAL, f"max must be below 2**62 bytes, not {max}; 0 means no limit")
    return _idle_ns(idle)


def _idle_ns(idle: float | None) -> int:
    """`idle` seconds as the records keep it: 0 = none, else >= 1 ns."""
    if idle is None:
        return 0
    try:
        seconds = float(idle)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise _err(errno.EINVAL, f"idle must be a finite number of seconds >= 0 (or None), not {idle}")
    if seconds == 0:
        return 0
    # Past 2**62 ns (146 years) the timer never fires anyway.
    return builtins.max(1, int(builtins.min(seconds * 1e9, float(1 << 62))))


def requested_backend(name: str | None) -> str:
    """"bpf", "worker" or "auto" for a requested name (None: $SOSPLICE_BACKEND,
    else "auto")."""
    if name is None:
        name = os.environ.get("SOSPLICE_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return name


def _check_backlog_cap(backlog_cap: object) -> None:
    if isinstance(backlog_cap, bool) or not isinstance(backlog_cap, int) \
            or not MIN_BACKLOG_CAP <= backlog_cap <= MAX_BACKLOG_CAP:
        raise ValueError(f"backlog_cap must be an int from {MIN_BACKLOG_CAP} to {MAX_BACKLOG_CAP} "
                         f"bytes, not {backlog_cap!r}")


class Splicer:
    """An engine: splices sockets and reports when each splice ends.

    Args:
        backend: "bpf" (eBPF sockmap, needs CAP_BPF and CAP_NET_ADMIN and
            Linux >= 6.16), "worker" (splice(2) worker threads, any user,
            any kernel), or "auto" (bpf if its programs load, else worker).
            None: $SOSPLICE_BACKEND, else "auto". `Splicer.backend` says
            which, and `Splicer.fallback` why "auto" did not get bpf.
        backlog_cap: most bytes the kernel may hold for one splice beyond
            the two sockets' buffers; past it the drain's slowness reaches
            the source's peer through TCP flow control. 64 KiB to 256 MiB.
        max_sockets: size of the kernel maps (bpf backend).
        thread: False (bpf): run no controller thread; the application's
            event loop drives the engine instead: call `reap()` whenever
            `fileno()` is readable and at the latest `timeout()` seconds
            after the last call. Saves a thread switch and the lock
            handoffs per splice in a single-threaded proxy. The worker
            backend always runs its threads.

    Raises:
        ValueError: an unknown backend or a backlog_cap out of range.
        PermissionError (EPERM): backend "bpf" without CAP_BPF/CAP_NET_ADMIN.
        OSError (ENOSYS): backend "bpf" on a kernel older than 6.16.
    """

    backend: str = ""
    # Why backend "auto" runs on worker, for a banner or a log line:
    # "bpf: EPERM, needs CAP_BPF". Empty when the backend is the one asked for.
    fallback: str = ""

    def __init__(self, *, backend: str | None = None, backlog_cap: int = DEFAULT_BACKLOG_CAP,
                 max_sockets: int = 65536, thread: bool = True) -> None:
        name = requested_backend(backend)
        _check_backlog_cap(backlog_cap)
        self.backlog_cap = backlog_cap
        self._lock = threading.RLock()
        self._live: dict[int, SpliceRecord] = {}        # source cookie -> record
        self._drains: dict[int, SpliceRecord] = {}      # drain cookie -> record
        # The live records of splice() (not splice_pair()), whose fds the
        # sweep looks at: an idle proxy's thousands of pairs cost it nothing.
        self._swept: dict[int, SpliceRecord] = {}       # source cookie -> record
        self._last: dict[int, SpliceRecord] = {}        # source cookie -> last ended
        self._unreported: dict[int, int] = {}           # source cookie -> error for geterror
        self._recent: collections.deque[SpliceRecord] = collections.deque(maxlen=RECENT_MAX)
        self._reaped: list[Splice] = []
        self._life = Life.OPEN
        self._snapshot_path = snap.path_for(self)
        self._snapshot_written = False
        self._snapshot_next = 0.0         # time.monotonic() of the next one allowed
        self._ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._backend: Backend = self._make_backend(name, max_sockets, thread)
        except BaseException:
            os.close(self._ready)
            raise
        self.backend = self._backend.name

    def _make_backend(self, name: str, max_sockets: int, thread: bool) -> Backend:
        if name == "worker":
            return WorkerBackend(self)
        if name == "bpf":
            return SockmapBackend(self, adopt_programs(max_sockets), max_sockets, thread)
        # "auto": any failure to load the programs (bcc raises bare
        # Exception) means worker, with its reason.
        try:
            programs = adopt_programs(max_sockets)
        except Exception as e:
            self.fallback = "bpf: " + _bpf.load_failure(e)
            return WorkerBackend(self)
        return SockmapBackend(self, programs, max_sockets, thread)

    # -- public API ---------------------------------------------------------

    def splice(self, source: socket.socket | int, drain: socket.socket | int, *,
               max: int = 0, idle: float | None = None, label: str = "") -> Splice:
        """Splice `source` into `drain`: see `sosplice.splice`."""
        # Types, then values, then the sockets: a bad argument is reported
        # the same way whatever state the sockets are in.
        _check_sock_type(source, "source")
        _check_sock_type(drain, "drain")
        idle_ns = _check_options(max, idle, label)
        sfd, dfd = _fd_of(source, "source"), _fd_of(drain, "drain")
        # Both fds are looked at before either is dup'ed: a dup could take
        # the number of a closed fd the caller passed as the other end.
        sino, dino = _inode_of(sfd, "source"), _inode_of(dfd, "drain")
        src = _check_socket(sfd, "source")
        try:
            sa = _addrs(src, "source")
            dst = _check_socket(dfd, "drain")
        except BaseException:
            src.close()
            raise
        try:
            da = _addrs(dst, "drain")
            if sino == dino:
                raise _err(errno.EINVAL, "source and drain are the same socket")
            ends = _names(src, dst, sa, da)
            with self._lock:
                self._check_open()
                a = self._begin(src, dst, ends, max, idle_ns, label, (sfd, dfd), (sino, dino))
                return self._go(a).handle
        except BaseException:
            src.close()
            dst.close()
            raise

    def splice_pair(self, a: socket.socket, b: socket.socket, *, idle: float | None = None,
                    label: str = "") -> tuple[Splice, Splice]:
        """Splice `a` into `b` and `b` into `a`: see `sosplice.splice_pair`."""
        for s, what in ((a, "a"), (b, "b")):
            if not isinstance(s, socket.socket):
                raise TypeError(f"{what} must be a socket.socket, not {type(s).__name__}")
        idle_ns = _check_options(0, idle, label)
        addrs = []
        for s, what in ((a, "a"), (b, "b")):
            if s.fileno() < 0:
                raise _err(errno.EBADF, f"{what} is closed")
            _check_connected(s, what)
            addrs.append(_addrs(s, what))
        if a.fileno() == b.fileno():
            raise _err(errno.EINVAL, "a and b are the same socket")
        ends = _names(a, b, *addrs)
        for s in (a, b):
            if s.gettimeout() != 0.0:
                s.setblocking(False)   # the engine's own recv/send must never wait
        with self._lock:
            self._check_open()
            for c in ends[:2]:
                if c in self._live or c in self._drains:
                    raise _err(errno.EBUSY, "a socket of the pair is already spliced; unsplice it first")
            ab = self._go(self._begin(a, b, ends, 0, idle_ns, label, None, None))
            try:
                ba = self._go(self._begin(b, a, (ends[1], ends[0], ends[3], ends[2]), 0, idle_ns,
                                          label, None, None))
                return ab.handle, ba.handle
            except OSError as e:
                err = e
        # The second direction was refused (the drain's state, a full map):
        # undo the first, losslessly, so that the caller gets both sockets
        # back whole. What it took from `a` reached `b`; the rest is on `a`.
        self._unsplice(ab)
        raise err

    def _begin(self, src: socket.socket, dst: socket.socket, ends: tuple, max: int,
               idle_ns: int, label: str, user_fds: tuple[int, int] | None,
               inodes: tuple[int, int] | None) -> SpliceRecord:
        """start, first half (under the lock): refuse what the tables
        refuse, then let the backend set up the data path."""
        scookie, dcookie = ends[0], ends[1]
        if scookie == dcookie:
            raise _err(errno.EINVAL, "source and drain are the same socket")
        if scookie in self._live:
            raise _err(errno.EBUSY, "source is already spliced; unsplice it first")
        if dcookie in self._drains:
            raise _err(errno.EBUSY, "drain is already fed by another splice")
        handle = Splice(self)
        rec = self._backend.start(dict(
            handle=handle, src=src, dst=dst, src_cookie=scookie, dst_cookie=dcookie,
            user_fds=user_fds, inodes=inodes, max=max, idle_ns=idle_ns,
            started_ns=time.monotonic_ns(), addrs=(ends[2], ends[3]), label=label))
        handle._rec = rec
        return rec

    def _go(self, rec: SpliceRecord) -> SpliceRecord:
        """start, second half (under the lock): the record is live."""
        self._live[rec.src_cookie] = rec
        self._drains[rec.dst_cookie] = rec
        if not rec.borrowed:
            self._swept[rec.src_cookie] = rec
        self._last.pop(rec.src_cookie, None)
        self._unreported.pop(rec.src_cookie, None)
        self._backend.started(rec)
        return rec

    def unsplice(self, source: socket.socket | int) -> int:
        """Dissolve the splice from `source` losslessly; return its byte count.

        Bytes already moved reach the drain first; bytes not moved stay
        readable on the source. Raises OSError(EPROTO) if not spliced.
        """
        c = self._cookie_of(source)
        with self._lock:
            rec = self._live.get(c)
            if rec is None:
                raise _err(errno.EPROTO, "source is not spliced")
        return self._unsplice(rec)

    def getsplice(self, source: socket.socket | int) -> int:
        """Bytes of the current or last splice from `source`; 0 if never."""
        c = self._cookie_of(source)
        with self._lock:
            rec = self._live.get(c) or self._last.get(c)
            if rec is None:
                return 0
            if rec.state is not State.DONE:
                self._backend.refresh(rec)
            return rec.bytes

    def geterror(self, source: socket.socket | int) -> int:
        """Why the last splice from `source` ended, once; then 0."""
        c = self._cookie_of(source)
        with self._lock:
            return self._unreported.pop(c, 0)

    def fileno(self) -> int:
        """An fd that is readable while some dissolved splice is unreaped.

        With thread=False (bpf), readable whenever the engine has work:
        call reap() then, and at the latest timeout() seconds later."""
        fd = self._backend.fileno()
        return self._ready if fd is None else fd

    def timeout(self) -> float | None:
        """With thread=False: seconds until the engine must be driven again
        (a reap() call) even if fileno() stays quiet. None: never (the
        engine runs its own threads)."""
        return self._backend.timeout()

    def reap(self) -> list[Splice]:
        """Splices that dissolved since the last call; clears `fileno()`."""
        self._backend.drive()
        with self._lock:
            out, self._reaped = self._reaped, []
            try:
                os.eventfd_read(self._ready)
            except BlockingIOError:
                pass
            return out

    def stats(self) -> list[SpliceInfo]:
        """One snapshot per live or recently dissolved splice."""
        with self._lock:
            self._expire_recent()
            return self._infos()

    def close(self) -> None:
        """Unsplice everything (losslessly) and stop. Idempotent."""
        with self._lock:
            if self._life is not Life.OPEN:
                return
            self._life = Life.CLOSING
            live = list(self._live.values())
            for rec in live:
                self._backend.dissolve(rec)
        deadline = time.monotonic() + 10
        for rec in live:
            self._wait(rec.handle, builtins.max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._life = Life.CLOSED
            for rec in list(self._live.values()):  # a drain that never took its bytes
                self._backend.abandon(rec)
        self._backend.close()
        self._remove_snapshot()
        os.close(self._ready)

    def __enter__(self) -> Splicer:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._life is Life.CLOSED else f"{len(self._live)} live"
        return f"<sosplice.Splicer backend={self.backend} {state}>"

    # -- the backend's part of the end ----------------------------------------

    def _unsplice(self, rec: SpliceRecord) -> int:
        """Dissolve with 0 unless already dissolving; wait for DONE."""
        with self._lock:
            self._backend.dissolve(rec)
        self._wait(rec.handle, None)
        return rec.bytes

    def _expire_more(self, cutoff: int) -> None:
        """Forget `_last` entries of sockets that are gone (under the lock)."""
        # Forget the last count of sockets that are gone: a bpf source
        # leaves `sources` only when closed (or after EOF, when it was deleted).
        alive = self._backend.alive_sources()
        if alive is None:
            return
        for c in [c for c, r in self._last.items() if c not in alive and r.done_ns < cutoff]:
            del self._last[c]
            self._unreported.pop(c, None)

    # -- shared transitions -------------------------------------------------

    def _check_open(self) -> None:
        if self._life is not Life.OPEN:
            raise RuntimeError("this Splicer is closed; create a new one")

    def _stop_taking(self, rec: SpliceRecord, error: int) -> bool:
        """ACTIVE -> DISSOLVING, ending with `error`: the one place it
        happens. False if `rec` was no longer ACTIVE (its first reason
        stands). The backend then stops taking from the source and flushes.
        """
        with self._lock:
            if rec.state is not State.ACTIVE:
                return False
            rec.state = State.DISSOLVING
            rec.error = error
            return True

    def ended(self, rec: SpliceRecord) -> None:
        """A backend reports the end of `rec`, flushed and released: the
        one way it does (under the lock, the record's sockets closed)."""
        self._report(rec)

    def _report(self, rec: SpliceRecord) -> None:
        """Flushed and released: record the end, wake the waiters, once.

        The only place a record becomes DONE; the caller holds the lock
        and has already closed the record's sockets.
        """
        assert rec.state is not State.DONE and rec.error is not None
        assert self._live.get(rec.src_cookie) is rec and self._drains.get(rec.dst_cookie) is rec
        del self._live[rec.src_cookie]
        del self._drains[rec.dst_cookie]
        self._swept.pop(rec.src_cookie, None)
        rec.state = State.DONE
        rec.done_ns = time.monotonic_ns()
        self._last[rec.src_cookie] = rec
        self._unreported[rec.src_cookie] = rec.error
        self._recent.append(rec)
        self._reaped.append(rec.handle)
        rec.handle._done.set()
        for fn in rec.handle._waiters:
            fn()
        rec.handle._waiters.clear()
        os.eventfd_write(self._ready, 1)

    def _closed_by_app(self, rec: SpliceRecord) -> int | None:
        """The reason to end `rec` if the application closed one of its fds.

        Closing the source ends the stream (0); closing the drain leaves
        nowhere to send (EPIPE).
        """
        if self._app_closed(rec, 0):
            return 0
        if self._app_closed(rec, 1):
            return errno.EPIPE
        return None

    @staticmethod
    def _app_closed(rec: SpliceRecord, end: int) -> bool:
        """Whether the application closed its fd of the source (0) or drain (1)."""
        if rec.user_fds is None or rec.inodes is None:
            return False   # splice_pair: the caller keeps them open until the end
        try:
            return os.fstat(rec.user_fds[end]).st_ino != rec.inodes[end]
        except OSError:
            return True

    def _expire_recent(self) -> None:
        cutoff = time.monotonic_ns() - int(RECENT * 1e9)
        while self._recent and self._recent[0].done_ns < cutoff:
            self._recent.popleft()
        if len(self._last) > 4 * len(self._live) + 1024:
            self._expire_more(cutoff)

    def _snapshot(self) -> snap.EngineSnapshot | None:
        """This engine's splices for `splicectl ls/top`, if one is watching.

        Called under the lock every CLOSE_SWEEP; the caller writes the
        result with `_write_snapshot` after releasing it. Nothing is built
        unless a viewer touched RUN_DIR/watch in the last WATCH_TTL
        seconds (`snapshot.watched`), and never more often than
        SNAPSHOT_SHARE of the time the last one took: a snapshot of
        thousands of splices costs milliseconds, which must not slow the
        splices themselves.
        """
        now_s = time.monotonic()
        if now_s < self._snapshot_next:
            return None
        if not snap.watched():
            self._snapshot_next = now_s + CLOSE_SWEEP
            return None
        if not self._live and not self._recent and not self._snapshot_written:
            return None
        rows = self._infos()
        self._snapshot_next = now_s + builtins.max(CLOSE_SWEEP, (time.monotonic() - now_s) / SNAPSHOT_SHARE)
        return snap.EngineSnapshot.of(self.backend, rows)

    def _write_snapshot(self, doc: snap.EngineSnapshot | None) -> None:
        """Replace this engine's snapshot file atomically (no lock needed)."""
        if doc is None:
            return
        t0 = time.monotonic()
        try:
            snap.write(self._snapshot_path, doc)
            self._snapshot_written = bool(doc.splices)
        except OSError:
            pass
        self._snapshot_next += (time.monotonic() - t0) / SNAPSHOT_SHARE

    def _remove_snapshot(self) -> None:
        snap.remove(self._snapshot_path)

    # -- helpers for the handle --------------------------------------------

    def _wait(self, handle: Splice, timeout: float | None) -> bool:
        """Wait until `handle` has ended: True, or False after `timeout` s."""
        return self._backend.wait(handle, timeout)

    def _unsplice_handle(self, handle: Splice) -> int:
        with self._lock:
            rec = handle._rec
            if rec is None or rec.state is State.DONE:
                raise _err(errno.EPROTO, "this splice has already dissolved")
        return self._unsplice(rec)

    def _bytes_of(self, handle: Splice, kernel: bool = False) -> int:
        rec = handle._rec
        if rec is None:
            return 0
        if handle._done.is_set():   # final: no lock needed
            return rec.kernel_bytes if kernel else rec.bytes
        with self._lock:
            if rec.state is not State.DONE:
                self._backend.refresh(rec)
            return rec.kernel_bytes if kernel else rec.bytes

    def _on_done(self, handle: Splice, fn: Callable[[], None]) -> None:
        with self._lock:
            if handle._done.is_set():
                fn()
            else:
                handle._waiters.append(fn)

    def _cookie_of(self, obj: socket.socket | int) -> int:
        fd = _fd_of(obj, "source")
        _inode_of(fd, "source")
        s = _sock.dup(fd)
        try:
            return _sock.cookie(s)
        finally:
            s.close()

    def _infos(self) -> list[SpliceInfo]:
        """A row per live or recently dissolved splice (under the lock)."""
        now = time.monotonic_ns()
        out = []
        for rec in [*self._live.values(), *self._recent]:
            if rec.state is not State.DONE:
                self._backend.refresh(rec)
            out.append(self._info(rec, now))
        return out

    def _info(self, rec: SpliceRecord, now: int) -> SpliceInfo:
        end = rec.done_ns or now
        return SpliceInfo(
            source=rec.addrs[0], drain=rec.addrs[1],
            source_cookie=rec.src_cookie, drain_cookie=rec.dst_cookie,
            bytes=rec.bytes, kernel_bytes=rec.kernel_bytes, max=rec.max, idle=rec.idle_ns / 1e9 if rec.idle_ns else None,
            state=rec.state.value, error=rec.error, throttled=rec.throttled,
            age=(end - rec.started_ns) / 1e9, idle_for=(end - rec.last_active_ns) / 1e9,
            pid=os.getpid(), backend=self.backend, label=rec.label,
        )

