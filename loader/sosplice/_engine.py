"""The engine: BPF programs, one record per splice, one controller thread.

Transitions, each one function, all under `Splicer._lock`:
  splice()     start: validate, insert into the maps, publish ctl
  _move()      the controller's step for one splice: refresh credit, copy
               passed bytes in order, decide whether to end (OpenBSD somove)
  _dissolve()  stop counting: delete the ctl entry so the verdict passes
  _finish()    once flushed: drop the drain from its map, close our dups,
               record the end, wake the waiters (the only place that does)

Ordering invariants (see docs/design.md for the argument):
  1. The verdict redirects only while passed == copied: no skb overtakes a
     byte waiting in the source's queue.
  2. The controller sends a copied byte only when the drain has taken every
     redirected byte (written == moved + sent), and publishes `copied` only
     once that byte was sent: no copied byte overtakes a redirected one, and
     no redirected one overtakes a copied one.
  3. The drain is in `drains` for as long as ctl may name it: inserted
     before ctl is published, deleted only after ctl is gone and the drain's
     backlog is empty (a drain leaving the map loses its backlog).
  4. A source never leaves `sources` while bytes may sit in its queue
     (they would be lost, KERNEL-NOTES 7, 13); close removes it.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import ctypes as ct
import errno
import heapq
import math
import os
import select
import socket
import stat
import threading
import time
from typing import Callable

from . import _sock
from ._bpf import Programs
from ._maps import U64, SpliceCtl, SpliceEvent, SpliceStats, key
from ._splice import Splice, SpliceInfo, SpliceRecord, State

DEFAULT_BACKLOG_CAP = 4 << 20
# Largest copy the controller makes per step for one splice, so one busy
# splice cannot starve the others.
COPY_CHUNK = 256 << 10
COPY_BUDGET = 4 << 20
# How often to re-read the drain while waiting for its backlog to empty.
FLUSH_POLL = 0.001
FLUSH_POLL_MAX = 0.05
# How often to check whether the application has closed a spliced fd.
CLOSE_SWEEP = 0.2
# How long dissolved splices stay visible in stats().
RECENT = 60.0
# Where engines publish snapshots for `splicectl ls` and `top`.
RUN_DIR = os.environ.get("SOSPLICE_RUN_DIR", "/run/sosplice")

SO_SNDBUFFORCE = 32
_HOLD = 1 << 63  # a `copied` value `passed` never reaches: pass everything


def _err(code: int, msg: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {msg}")


def _fd_of(obj: object, what: str) -> int:
    if isinstance(obj, bool) or not isinstance(obj, (int, socket.socket)):
        raise TypeError(f"{what} must be a socket.socket or an int fd, not {type(obj).__name__}")
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise _err(errno.EBADF, f"{what} is closed")
    return fd


def _inode_of(fd: int, what: str) -> int:
    try:
        st = os.fstat(fd)
    except OSError:
        raise _err(errno.EBADF, f"{what} fd {fd} is not open") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _err(errno.ENOTSOCK, f"{what} fd {fd} is not a socket")
    return st.st_ino


def _check_socket(fd: int, what: str) -> socket.socket:
    """Validate one end; return a dup of it, ours to close."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM \
                or s.proto not in (0, socket.IPPROTO_TCP):
            raise _err(errno.EPROTONOSUPPORT, f"{what} must be a TCP socket (IPv4 or IPv6)")
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise _err(errno.EOPNOTSUPP, f"{what} is listening; splice an accepted or connected socket")
        try:
            s.getpeername()
        except OSError:
            raise _err(errno.ENOTCONN, f"{what} is not connected; connect it first") from None
    except BaseException:
        s.close()
        raise
    return s


class Splicer:
    """An engine: the BPF programs, their maps and one controller thread.

    Args:
        backlog_cap: most bytes the kernel may hold for one splice beyond
            the two sockets' buffers; past it the drain's slowness reaches
            the source's peer through TCP flow control.
        max_sockets: size of the kernel maps.

    Raises:
        PermissionError (EPERM): no CAP_BPF/CAP_NET_ADMIN.
        OSError (ENOSYS): the kernel is older than 6.16.
    """

    def __init__(self, *, backlog_cap: int = DEFAULT_BACKLOG_CAP, max_sockets: int = 65536) -> None:
        if isinstance(backlog_cap, bool) or not isinstance(backlog_cap, int) or backlog_cap < 65536:
            raise ValueError(f"backlog_cap must be an int >= 65536 bytes, not {backlog_cap!r}")
        self.backlog_cap = backlog_cap
        self._prog = Programs(max_sockets)
        self._lock = threading.RLock()
        self._live: dict[int, SpliceRecord] = {}        # source cookie -> record
        self._drains: dict[int, SpliceRecord] = {}      # drain cookie -> record
        self._byfd: dict[int, SpliceRecord] = {}        # our dup's fd -> record
        self._last: dict[int, SpliceRecord] = {}        # source cookie -> last ended
        self._unreported: dict[int, int] = {}           # source cookie -> error for geterror
        self._recent: collections.deque[SpliceRecord] = collections.deque()
        self._reaped: list[Splice] = []
        self._sources: set[int] = set()                 # cookies we put in `sources`
        self._timers: list[tuple[int, int, SpliceRecord]] = []  # (when, id, record)
        self._closed = False
        self._snapshot_path = os.path.join(RUN_DIR, f"{os.getpid()}-{id(self):x}.json")
        self._snapshot_written = False
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._prog.bpf[b"events"].open_ring_buffer(self._on_event)
        self._ep.register(self._prog.events_fd, select.EPOLLIN)
        self._rb_hit: list[int] = []
        self._thread = threading.Thread(target=self._run, name="sosplice-controller", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------

    def splice(self, source: socket.socket | int, drain: socket.socket | int, *,
               max: int = 0, idle: float | None = None) -> Splice:
        """Splice `source` into `drain`: see `sosplice.splice`."""
        sfd, dfd = _fd_of(source, "source"), _fd_of(drain, "drain")
        if isinstance(max, bool) or not isinstance(max, int):
            raise TypeError(f"max must be an int byte count, not {type(max).__name__}")
        if max < 0:
            raise _err(errno.EINVAL, f"max must be >= 0 (0 = no limit), not {max}")
        if idle is not None:
            if isinstance(idle, bool) or not isinstance(idle, (int, float)):
                raise TypeError(f"idle must be seconds as a float or None, not {type(idle).__name__}")
            if not math.isfinite(idle) or idle < 0:
                raise _err(errno.EINVAL, f"idle must be a finite number of seconds >= 0, not {idle}")
        # Both fds are looked at before either is dup'ed: a dup could take
        # the number of a closed fd the caller passed as the other end.
        sino, dino = _inode_of(sfd, "source"), _inode_of(dfd, "drain")
        src = _check_socket(sfd, "source")
        try:
            dst = _check_socket(dfd, "drain")
        except BaseException:
            src.close()
            raise
        try:
            if sino == dino:
                raise _err(errno.EINVAL, "source and drain are the same socket")
            if src.getsockname() == dst.getpeername() and src.getpeername() == dst.getsockname():
                raise _err(errno.ELOOP, "drain is the other end of the source's own connection")
            with self._lock:
                self._check_open()
                return self._start(src, dst, (sfd, dfd), (sino, dino), max, idle)
        except BaseException:
            src.close()
            dst.close()
            raise

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
                self._read_stats(rec)
            return rec.bytes

    def geterror(self, source: socket.socket | int) -> int:
        """Why the last splice from `source` ended, once; then 0."""
        c = self._cookie_of(source)
        with self._lock:
            return self._unreported.pop(c, 0)

    def fileno(self) -> int:
        """An fd that is readable while some dissolved splice is unreaped."""
        return self._ready

    def reap(self) -> list[Splice]:
        """Splices that dissolved since the last call; clears `fileno()`."""
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
            now = time.monotonic_ns()
            out = []
            for rec in [*self._live.values(), *self._recent]:
                if rec.state is not State.DONE:
                    self._read_stats(rec)
                out.append(self._info(rec, now))
            return out

    def close(self) -> None:
        """Unsplice everything (losslessly) and unload. Idempotent."""
        with self._lock:
            if self._closed:
                return
            for rec in list(self._live.values()):
                if rec.state is State.ACTIVE:
                    self._dissolve(rec, 0)
                    self._at(rec, 0)
            os.eventfd_write(self._wake, 1)
        deadline = time.monotonic() + 10
        for rec in list(self._live.values()):
            rec.handle._done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
            for rec in list(self._live.values()):  # a drain that never flushed
                self._finish(rec)
        os.eventfd_write(self._wake, 1)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._ep.close()
        try:
            os.unlink(self._snapshot_path)
        except OSError:
            pass
        os.close(self._wake)
        os.close(self._ready)
        self._prog.close()

    def __enter__(self) -> Splicer:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- start --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Splicer is closed; create a new one")

    def _start(self, src: socket.socket, dst: socket.socket, user_fds: tuple[int, int],
               inodes: tuple[int, int], max: int, idle: float | None) -> Splice:
        scookie, dcookie = _sock.cookie(src), _sock.cookie(dst)
        if scookie in self._live:
            raise _err(errno.EBUSY, "source is already spliced; unsplice it first")
        if dcookie in self._drains:
            raise _err(errno.EBUSY, "drain is already fed by another splice")
        state, acked, queued = _sock.progress(dst)
        base = acked + queued
        if state not in _sock.CAN_SEND:
            raise _err(errno.EPIPE, "drain can no longer send")
        handle = Splice(self)
        now = time.monotonic_ns()
        # A drain whose peer already half-closed (CLOSE_WAIT) cannot enter a
        # sockmap (KERNEL-NOTES 9); it can still send, so the controller
        # copies every byte of such a splice itself (credit stays 0).
        drain_in_map = True
        if dst.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 4 * self.backlog_cap:
            # Room for the whole cap in the drain's own send queue, with
            # the kernel's per-skb overhead (see _publish). Also what lifts
            # bulk speed (KERNEL-NOTES 14).
            dst.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * self.backlog_cap)
        try:
            self._prog.sock_insert(self._prog.drains_fd, dcookie, dst.fileno())
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EEXIST):
                raise _err(e.errno, f"cannot add the drain to the sockmap: {e.strerror}") from None
            drain_in_map = e.errno == errno.EEXIST
        rec = SpliceRecord(
            handle=handle, src=src, dst=dst, src_cookie=scookie, dst_cookie=dcookie,
            user_fds=user_fds, inodes=inodes, max=max,
            idle_ns=int((idle or 0) * 1e9), started_ns=now, drain_base=base,
            q_old=0, drain_in_map=drain_in_map, last_copy_ns=now,
            addrs=((src.getsockname(), src.getpeername()), (dst.getsockname(), dst.getpeername())),
        )
        handle._rec = rec
        try:
            self._prog.stats[key(scookie)] = SpliceStats()
            fresh = self._insert_source(rec)
            if not fresh:
                rec.q_old = self._measure_queue(rec)
            self._publish(rec, base, force=True)
        except BaseException:
            self._prog.stats.pop(key(scookie), None)
            self._prog.ctl.pop(key(scookie), None)
            if drain_in_map:
                self._prog.sock_delete(self._prog.drains_fd, dcookie)
            raise
        self._live[scookie] = rec
        self._drains[dcookie] = rec
        self._last.pop(scookie, None)
        self._unreported.pop(scookie, None)
        self._byfd[src.fileno()] = rec
        self._byfd[dst.fileno()] = rec
        # Edge-triggered: passed bytes keep the source readable while the
        # controller waits for the drain, and a level-triggered source
        # would spin. Every new skb or FIN is a new edge.
        self._ep.register(src.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._ep.register(dst.fileno(), 0)  # EPOLLERR and EPOLLHUP always report
        if rec.idle_ns:
            self._at(rec, now + rec.idle_ns)
        self._later(rec)
        os.eventfd_write(self._wake, 1)
        return handle

    def _insert_source(self, rec: SpliceRecord) -> bool:
        """Put the source in `sources`; False if it already was (resplice)."""
        c = rec.src_cookie
        state = _sock.tcp_state(rec.src)
        if state not in _sock.CAN_SEND:
            raise _err(errno.ENOTCONN, "source has shut down its side of the connection; "
                       "splice before calling shutdown() on it")
        if state != _sock.TCP_ESTABLISHED:
            # CLOSE_WAIT: the peer sent FIN; the socket cannot join a map
            # (KERNEL-NOTES 9). What is left in it, the controller copies.
            rec.q_old = _sock.inq(rec.src)
            rec.eof = True
            self._prog.ctl[key(c)] = SpliceCtl(rec.dst_cookie, 0, _HOLD, 0)
            return True
        # Resplice: the socket may hold bytes passed while it was not
        # spliced. Hold the verdict (pass everything) until they are counted.
        self._prog.ctl[key(c)] = SpliceCtl(rec.dst_cookie, 0, _HOLD, 0)
        if c in self._sources:
            return False
        # Take what is already queued ourselves. The kernel hands an skb
        # the application has partly read to the verdict whole, so the
        # bytes already read would be moved again (measured on 6.18:
        # tests/test_limits.py::test_bytes_read_by_app_before_splice_are_not_moved).
        # Whatever arrives after this is fresh skbs.
        if self._prefetch(rec):
            return True  # EOF or the limit reached by queued bytes alone
        try:
            self._prog.sock_insert(self._prog.sources_fd, c, rec.src.fileno())
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP and _sock.tcp_state(rec.src) == _sock.TCP_CLOSE_WAIT:
                # The peer's FIN arrived after _prefetch looked: no more
                # data can come, so copy the rest like any CLOSE_WAIT source.
                rec.q_old += _sock.inq(rec.src)
                rec.eof = True
                return True
            if e.errno == errno.EBUSY:
                raise _err(errno.EBUSY, "source is already in another sockmap with a verdict "
                           "program (another sosplice engine?); use one engine") from None
            raise _err(e.errno, f"cannot add the source to the sockmap: {e.strerror}") from None
        # Never discarded: cookies are not reused, and a closed socket
        # leaves the map by itself (pruned in _expire_recent).
        self._sources.add(c)
        # A fresh source has nothing passed yet; bytes in its TCP queue
        # reach the verdict only on the next data_ready, which SO_RCVLOWAT
        # triggers now (KERNEL-NOTES 8).
        self._prog.ctl[key(c)] = SpliceCtl(rec.dst_cookie, 0, _HOLD if rec.q_old else 0, 0)
        rec.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return True

    def _prefetch(self, rec: SpliceRecord) -> bool:
        """Take the bytes queued on a fresh source into `pending`.

        They count as queued before the start (q_old) and taken, so the
        verdict passes until they have been sent (invariant 1). True if
        the source must stay out of the map: EOF, or `max` already reached.
        """
        chunks = []
        want = rec.max or (1 << 62)
        while want > 0:
            try:
                data = rec.src.recv(min(want, COPY_CHUNK), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                rec.eof = True
                break
            chunks.append(data)
            want -= len(data)
        rec.pending = b"".join(chunks)
        rec.taken = rec.q_old = len(rec.pending)
        return rec.eof or bool(rec.max) and rec.taken >= rec.max

    def _measure_queue(self, rec: SpliceRecord) -> int:
        """Bytes in the source's queue that the verdict did not count.

        FIONREAD and the verdict exclude each other (socket lock), so a
        reading bracketed by two equal `passed` values is exact.
        """
        rec.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        for _ in range(1000):
            p0 = self._stats(rec.src_cookie).passed
            n = _sock.inq(rec.src)
            if self._stats(rec.src_cookie).passed == p0:
                return n - p0
        raise _err(errno.EAGAIN, "source queue did not settle; try again")

    # -- the controller -----------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + CLOSE_SWEEP
        while True:
            timeout = self._timeout(next_sweep)
            try:
                events = self._ep.poll(timeout)
            except (OSError, ValueError):
                return
            with self._lock:
                if self._closed:
                    return
                work: set[SpliceRecord] = set()
                for fd, ev in events:
                    if fd == self._wake:
                        os.eventfd_read(self._wake)
                    elif fd == self._prog.events_fd:
                        self._prog.bpf.ring_buffer_consume()
                    else:
                        rec = self._byfd.get(fd)
                        if rec is None:
                            continue
                        if fd == rec.src.fileno() and ev & (select.EPOLLRDHUP | select.EPOLLHUP):
                            rec.eof = True
                        work.add(rec)
                for c in self._rb_hit:
                    if c in self._live:
                        work.add(self._live[c])
                self._rb_hit.clear()
                now = time.monotonic_ns()
                while self._timers and self._timers[0][0] <= now:
                    work.add(heapq.heappop(self._timers)[2])
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + CLOSE_SWEEP
                    self._sweep_closed()
                    self._expire_recent()
                    self._publish_snapshot()
                for rec in work:
                    if rec.state is not State.DONE:
                        self._move(rec)

    def _timeout(self, next_sweep: float) -> float:
        t = next_sweep - time.monotonic()
        if self._timers:
            t = min(t, (self._timers[0][0] - time.monotonic_ns()) / 1e9)
        return max(0.0, t)

    def _at(self, rec: SpliceRecord, when_ns: int) -> None:
        heapq.heappush(self._timers, (when_ns, id(rec), rec))

    def _later(self, rec: SpliceRecord) -> None:
        """Look at `rec` again soon: sooner while the drain makes progress.

        Waiting for a drain's backlog to empty has no event to wait on; the
        poll backs off from 1 ms to 50 ms while the drain takes nothing.
        """
        self._at(rec, time.monotonic_ns() + int(rec.backoff * 1e9))

    def _publish_snapshot(self) -> None:
        """Write this engine's splices where `splicectl ls/top` finds them.

        One JSON file per engine under RUN_DIR, replaced atomically every
        CLOSE_SWEEP while there is anything to show, removed on close.
        """
        if not self._live and not self._recent and not self._snapshot_written:
            return
        now = time.monotonic_ns()
        rows = [dataclasses.asdict(self._info(r, now)) for r in [*self._live.values(), *self._recent]]
        doc = {"pid": os.getpid(), "backend": "bpf", "time": time.time(),
               "cmdline": _cmdline(), "splices": rows}
        try:
            os.makedirs(RUN_DIR, exist_ok=True)
            tmp = self._snapshot_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, default=str)
            os.replace(tmp, self._snapshot_path)
            self._snapshot_written = bool(rows)
        except OSError:
            pass

    def _on_event(self, ctx: object, data: object, size: int) -> None:
        ev = ct.cast(data, ct.POINTER(SpliceEvent)).contents
        self._rb_hit.append(ev.source)

    def _stats(self, cookie: int) -> SpliceStats:
        return self._prog.stats[key(cookie)]

    def _read_stats(self, rec: SpliceRecord) -> None:
        try:
            s = self._stats(rec.src_cookie)
        except KeyError:
            return
        rec.moved, rec.passed, rec.last_ns = s.moved, s.passed, s.last_ns

    def _move(self, rec: SpliceRecord) -> None:
        """One controller step for one splice (OpenBSD's somove).

        Returns with the splice either progressing, or dissolving, or done;
        when it must look again without an event it arms a timer (_later).
        """
        self._read_stats(rec)
        state, acked, queued = _sock.progress(rec.dst)
        written = acked + queued - rec.drain_base
        if written != rec.last_written:
            rec.last_written, rec.backoff = written, FLUSH_POLL
        else:
            rec.backoff = min(rec.backoff * 2, FLUSH_POLL_MAX)
        if state not in _sock.CAN_SEND:
            # The drain can no longer send: whatever is queued for it is
            # lost with it; what was taken from the source stays counted.
            if rec.state is State.ACTIVE:
                self._dissolve(rec, errno.EPIPE)
                self._read_stats(rec)
            rec.pending = b""
            rec.sent = rec.taken
            self._finish(rec)
            return
        if rec.state is State.DISSOLVING:
            self._send_pending(rec)
            if not rec.pending and written >= rec.moved + rec.sent:
                # Confirm on a second reading: a verdict that looked up ctl
                # just before _dissolve deleted it may still be counting.
                if rec.flushed_once:
                    self._finish(rec)
                    return
                rec.flushed_once = True
            else:
                rec.flushed_once = False
            self._later(rec)
            return

        # The slow path: copy passed bytes, in order, once the drain has
        # taken everything redirected before them (invariant 2).
        budget = COPY_BUDGET
        while budget > 0 and rec.state is State.ACTIVE:
            if rec.pending and not self._send_pending(rec):
                break
            _, acked, queued = _sock.progress(rec.dst)
            written = acked + queued - rec.drain_base
            # Read `passed` afresh and publish at once when the queue is
            # empty: a sustained stream passes a new skb every few tens of
            # microseconds, and only a publish that lands before the next
            # one lets the verdict go back to redirecting.
            self._read_stats(rec)
            if rec.fifo == 0:
                self._publish(rec, acked)
                break
            room = rec.max - rec.bytes if rec.max else COPY_CHUNK
            n = min(rec.fifo, COPY_CHUNK, room, budget)
            if n <= 0:
                break
            if written < rec.moved + rec.sent:
                self._later(rec)  # the drain's backlog is not empty yet
                break
            if rec.drain_in_map and rec.moved + rec.sent - (acked - rec.drain_base) >= self.backlog_cap:
                # The cap binds this path too: bytes the drain's peer has
                # not acknowledged stay within it whichever path sent them.
                self._later(rec)
                break
            try:
                data = rec.src.recv(n, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break  # counted by the verdict, not yet queued: EPOLLIN follows
            except OSError as e:
                self._dissolve(rec, e.errno or errno.EIO)
                break
            if not data:
                break
            rec.taken += len(data)
            rec.pending = data
            rec.last_copy_ns = time.monotonic_ns()
            budget -= len(data)
        else:
            if rec.state is State.ACTIVE:
                self._later(rec)  # out of budget: let other splices run
        if rec.state is State.ACTIVE:
            # The last reading of the drain: an older `acked` can only
            # make the credit smaller, never let it pass the cap.
            self._publish(rec, acked)

        if rec.state is not State.ACTIVE:
            pass
        elif rec.max and rec.bytes >= rec.max and not rec.pending:
            self._dissolve(rec, errno.EFBIG)
        elif rec.eof and rec.fifo == 0 and not rec.pending:
            self._dissolve(rec, 0)
        elif rec.idle_ns and self._idle_expired(rec):
            self._dissolve(rec, errno.ETIMEDOUT)
        if rec.state is State.DISSOLVING:
            self._move(rec)

    def _send_pending(self, rec: SpliceRecord) -> bool:
        """Send what the controller holds; True once nothing is left."""
        while rec.pending:
            try:
                n = rec.dst.send(rec.pending, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self._want_out(rec, True)
                return False
            except OSError:
                return False  # the drain died; _move notices from its state
            rec.sent += n
            rec.pending = rec.pending[n:]
        self._want_out(rec, False)
        return True

    def _want_out(self, rec: SpliceRecord, on: bool) -> None:
        if rec.want_out != on:
            rec.want_out = on
            self._ep.modify(rec.dst.fileno(), select.EPOLLOUT if on else 0)

    def _publish(self, rec: SpliceRecord, acked: int, force: bool = False) -> None:
        """Bring the ctl entry in line with the record (one writer: here).

        credit: the verdict may redirect until the drain's backlog would
        exceed the cap, and never past the byte limit; copied: the verdict
        resumes only once every passed byte was sent (invariant 1, 2).
        """
        if not rec.drain_in_map:
            credit = 0
        else:
            # Count against the cap every redirected byte the drain's peer
            # has not acknowledged, wherever it sits: the drain's psock
            # backlog or its send queue, which _start sized to hold the
            # whole cap. So the backlog empties as fast as the worker runs,
            # and that matters when the drain is also the source of the
            # other direction: while a socket's psock backlog is not empty,
            # bytes its verdict passes queue behind it uncharged to its
            # receive buffer, and TCP flow control would not hold back
            # its peer (measured on 6.18; tests/test_basic.py::test_nonblock).
            credit = max(0, acked - rec.drain_base - rec.sent + self.backlog_cap)
            if rec.max:
                credit = min(credit, rec.max - rec.taken)
        copied = (rec.sent - rec.q_old) % U64
        notify = max(rec.moved + 1, credit - self.backlog_cap // 2)
        want = (credit, copied, notify)
        if want != rec.published or force:
            self._prog.ctl[key(rec.src_cookie)] = SpliceCtl(rec.dst_cookie, *want)
            rec.published = want

    def _idle_expired(self, rec: SpliceRecord) -> bool:
        last = max(rec.last_ns, rec.last_copy_ns, rec.started_ns)
        deadline = last + rec.idle_ns
        if time.monotonic_ns() >= deadline:
            return True
        self._at(rec, deadline)
        return False

    def _sweep_closed(self) -> None:
        """End splices whose source or drain the application has closed."""
        for rec in list(self._live.values()):
            if rec.state is not State.ACTIVE:
                continue
            for fd, ino in zip(rec.user_fds, rec.inodes):
                try:
                    same = os.fstat(fd).st_ino == ino
                except OSError:
                    same = False
                if not same:
                    # Closing the source ends the stream (0); closing the
                    # drain leaves nowhere to send (EPIPE).
                    self._dissolve(rec, 0 if fd == rec.user_fds[0] else errno.EPIPE)
                    self._move(rec)
                    break

    # -- the end ------------------------------------------------------------

    def _dissolve(self, rec: SpliceRecord, error: int) -> None:
        """Stop redirecting and counting; the flush follows in _move."""
        assert rec.state is State.ACTIVE
        rec.check_invariants()
        rec.state = State.DISSOLVING
        rec.error = error
        self._prog.ctl.pop(key(rec.src_cookie), None)

    def _finish(self, rec: SpliceRecord) -> None:
        """Flushed (or the drain is dead): release everything, report once."""
        if rec.state is State.DONE:
            return
        if rec.state is State.ACTIVE:
            self._dissolve(rec, 0)
        self._read_stats(rec)
        rec.check_invariants()
        assert self._live.get(rec.src_cookie) is rec and self._drains.get(rec.dst_cookie) is rec
        self._prog.ctl.pop(key(rec.src_cookie), None)
        self._prog.stats.pop(key(rec.src_cookie), None)
        if rec.drain_in_map:
            self._prog.sock_delete(self._prog.drains_fd, rec.dst_cookie)
        if rec.eof and rec.fifo == 0 and rec.src_cookie not in self._drains:
            # After FIN nothing more can arrive and nothing is queued:
            # the one moment a source leaves its map losslessly (invariant
            # 4). Not while it is the drain of the other direction: taking
            # it out of `sources` then drops its redirect backlog (measured:
            # tests/test_transfer.py::test_eof_one_way_while_other_way_busy).
            self._prog.sock_delete(self._prog.sources_fd, rec.src_cookie)
            self._sources.discard(rec.src_cookie)
        for s in (rec.src, rec.dst):
            self._byfd.pop(s.fileno(), None)
            try:
                self._ep.unregister(s.fileno())
            except OSError:
                pass
            s.close()
        del self._live[rec.src_cookie]
        del self._drains[rec.dst_cookie]
        rec.state = State.DONE
        rec.done_ns = time.monotonic_ns()
        self._last[rec.src_cookie] = rec
        self._unreported[rec.src_cookie] = rec.error or 0
        self._recent.append(rec)
        self._reaped.append(rec.handle)
        rec.handle._done.set()
        for fn in rec.handle._waiters:
            fn()
        rec.handle._waiters.clear()
        os.eventfd_write(self._ready, 1)

    def _expire_recent(self) -> None:
        cutoff = time.monotonic_ns() - int(RECENT * 1e9)
        while self._recent and self._recent[0].done_ns < cutoff:
            self._recent.popleft()
        # Forget the last count of sockets that are gone: a source leaves
        # `sources` only when closed (or after EOF, when it was deleted).
        if len(self._last) > 4 * len(self._live) + 1024:
            alive = self._prog.sock_keys(self._prog.sources_fd)
            self._sources &= alive
            for c in [c for c, r in self._last.items() if c not in alive and r.done_ns < cutoff]:
                del self._last[c]
                self._unreported.pop(c, None)

    # -- helpers for the handle --------------------------------------------

    def _unsplice(self, rec: SpliceRecord) -> int:
        if rec.state is State.ACTIVE:
            self._dissolve(rec, 0)
            self._at(rec, 0)
            os.eventfd_write(self._wake, 1)
        self._lock.release()
        try:
            rec.handle._done.wait()
        finally:
            self._lock.acquire()
        return rec.bytes

    def _unsplice_handle(self, handle: Splice) -> int:
        with self._lock:
            rec = handle._rec
            if rec is None or rec.state is State.DONE:
                raise _err(errno.EPROTO, "this splice has already dissolved")
            return self._unsplice(rec)

    def _bytes_of(self, handle: Splice) -> int:
        rec = handle._rec
        if rec is None:
            return 0
        with self._lock:
            if rec.state is not State.DONE:
                self._read_stats(rec)
            return rec.bytes

    def _on_done(self, handle: Splice, fn: Callable[[], None]) -> None:
        with self._lock:
            if handle._done.is_set():
                fn()
            else:
                handle._waiters.append(fn)

    def _cookie_of(self, obj: socket.socket | int) -> int:
        fd = _fd_of(obj, "source")
        try:
            st = os.fstat(fd)
        except OSError:
            raise _err(errno.EBADF, f"fd {fd} is not open") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise _err(errno.ENOTSOCK, f"fd {fd} is not a socket")
        s = socket.socket(fileno=os.dup(fd))
        try:
            return _sock.cookie(s)
        finally:
            s.close()

    def _info(self, rec: SpliceRecord, now: int) -> SpliceInfo:
        last = max(rec.last_ns, rec.last_copy_ns, rec.started_ns)
        end = rec.done_ns or now
        return SpliceInfo(
            source=rec.addrs[0], drain=rec.addrs[1],
            source_cookie=rec.src_cookie, drain_cookie=rec.dst_cookie,
            bytes=rec.bytes, max=rec.max, idle=rec.idle_ns / 1e9 if rec.idle_ns else None,
            state=rec.state.value, error=rec.error, throttled=rec.fifo > 0,
            age=(end - rec.started_ns) / 1e9, idle_for=(end - last) / 1e9, pid=os.getpid(),
        )


def _cmdline() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
