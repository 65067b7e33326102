"""The worker backend: splice(2) through a pipe, one worker thread per CPU.

Each splice owns a pipe. Its worker moves bytes source -> pipe -> drain
with splice(2), so the data never enters the process: the pipe holds
references to the source's pages, and the drain's send queue takes them
over. No BPF, no privilege, any kernel with splice(2).

Ownership: a record belongs to one worker for its whole life. Only that
worker's thread moves bytes and writes the record's [W] fields; any other
thread that wants a transition (unsplice, close) posts it to the worker's
inbox and waits. The engine lock is taken for the shared tables and the
[C] fields only, never around a splice(2) call, so workers run in parallel
(os.splice releases the GIL).

Invariants (kept in `_step`, `_dissolve` and `_finish`):
  1. The pipe holds exactly the bytes taken - sent, in order; a byte
     enters it only from the source and leaves it only to the drain.
  2. Nothing is taken from the source unless the splice is ACTIVE, and
     never more than max - taken: the limit is exact, and what is not
     taken stays readable on the source.
  3. A splice becomes DONE only with an empty pipe (every taken byte is in
     the drain's socket) or a dead drain (the bytes die with it, counted).
  4. Memory: per splice at most the pipe's size sits outside the two
     sockets' buffers, and the source is not read while the pipe is full,
     so a slow drain slows the source's peer through TCP flow control.
  5. Both sockets are O_NONBLOCK while spliced: splice(2) takes blocking
     from the socket's file, not from its flags, and a worker must never
     block. The application's setting comes back when the last splice
     using the socket ends.
  6. Urgent data is carried in band and never ends a splice early. The
     source is SO_OOBINLINE while spliced; splice(2) still stops at the
     urgent mark (0 after a FIN, EAGAIN before), and `urgent` steps over
     it with recv(). A 0 from splice(2) is EOF only when the source says
     so too.
  7. A source whose connection died (reset, timed out) ends with that
     error, never 0. The error in sk_err is consumed by the first call
     that fails on the socket, and that may be the opposite splice's send
     to it; so both directions of a connection belong to one worker, and
     a send that fails with such an error marks the opposite record
     (`src_error`) before its own source can read the end of the stream.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import _sock
from ._backend import CLOSE_SWEEP, _err, _next_sweep
from ._reactor import DRAIN, SOURCE, Reactor
from ._splice import Splice, SpliceRecord, State

if TYPE_CHECKING:
    from ._engine import Splicer

SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
# Most bytes one step moves for one splice before the worker looks at the
# others: one busy splice must not starve the rest of its worker.
STEP_BUDGET = 4 << 20
# The largest pipe: big pipes mean fewer system calls per byte; above the
# unprivileged pipe-max-size (1 MiB by default) F_SETPIPE_SZ needs
# CAP_SYS_RESOURCE, and the default size stays if it is refused.
PIPE_MAX = 1 << 20

log = logging.getLogger("sosplice")


@dataclass(eq=False, kw_only=True)
class PipeRecord(SpliceRecord):
    """A splice of the worker backend (owner tags: see _splice)."""

    worker: _Worker                # [I] the thread that owns this splice
    pipe_r: int                    # [I] the splice's pipe: read end ...
    pipe_w: int                    # [I] ... and write end
    pipe_size: int                 # [W] its capacity in bytes: grows when it fills
    grown: bool = False            # [W] the pipe was grown (or refused to)
    taken: int = 0                 # [W] bytes spliced from the source into the pipe
    sent: int = 0                  # [W] ... and from the pipe into the drain
    eof: bool = False              # [W] the source returned end of stream
    want_out: bool = False         # [W] waiting for the drain to become writable
    last_ns: int = 0               # [W] last time a byte was taken
    urgent: bool = True            # [W] the source may sit at an urgent mark (EPOLLPRI seen)
    oob_was_off: bool = False      # [I] SO_OOBINLINE was off on the source: turn it off at the end
    idle_at: int = 0               # [W] when the armed idle timer fires (0: none)
    src_error: int = 0             # [W] a send to this source took its connection's error (invariant 7)

    @property
    def bytes(self) -> int:
        return self.taken

    @property
    def kernel_bytes(self) -> int:
        return self.taken  # splice(2) moves page references, never copies through us

    @property
    def throttled(self) -> bool:
        return self.taken > self.sent

    @property
    def last_active_ns(self) -> int:
        return max(self.last_ns, self.started_ns)


class WorkerBackend:
    """The worker backend (`_backend.Backend`) of a `Splicer`.

    `max_sockets` and `thread` do not apply: there are no maps to size,
    and the workers always run their threads.
    """

    name = "worker"

    def __init__(self, eng: Splicer) -> None:
        self._eng = eng
        self._pipe_max = min(eng.backlog_cap, PIPE_MAX)
        # cookie -> [splices using the socket, was it blocking before]
        self._nonblock: dict[int, list] = {}
        n = len(os.sched_getaffinity(0)) or 1
        self._workers = [_Worker(self, i) for i in range(n)]

    def close(self) -> None:
        """Stop the workers (after what was posted before: `abandon`)."""
        for w in self._workers:
            w.stop()

    # -- what the engine asks of a backend ----------------------------------

    def start(self, init: dict[str, Any]) -> PipeRecord:
        src, dst = init["src"], init["dst"]
        cookies = init["src_cookie"], init["dst_cookie"]
        if _sock.tcp_state(dst) not in _sock.CAN_SEND:
            raise _err(errno.EPIPE, "drain can no longer send")
        if _sock.tcp_state(src) not in _sock.CAN_SEND:
            raise _err(errno.ENOTCONN, "source has shut down its side of the connection; "
                       "splice before calling shutdown() on it")
        # Both directions of a connection on one worker (invariant 7).
        worker = self._workers[hash(tuple(sorted(cookies))) % len(self._workers)]
        held, held_ok = ((src, cookies[0]), (dst, cookies[1])), []
        rec = None
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            rec = PipeRecord(**init, worker=worker, pipe_r=pipe_r, pipe_w=pipe_w,
                             pipe_size=fcntl.fcntl(pipe_w, F_GETPIPE_SZ))
            for end in held:
                self._hold_nonblock(*end)
                held_ok.append(end)
            # Our own recv() on the source (`urgent`) must never wait: a
            # dup made from a blocking fd has Python's default timeout.
            src.settimeout(0.0)
            # Invariant 6: read in band, the urgent byte is an ordinary
            # byte at its place. Out of band, a second urgent pointer
            # arriving while the worker sits at the mark makes the kernel
            # drop the first urgent byte from the stream.
            if not src.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE):
                src.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
                rec.oob_was_off = True
        except BaseException:
            _restore_oob(rec)
            for end in held_ok:
                self._release_nonblock(*end)
            os.close(pipe_r)
            os.close(pipe_w)
            raise
        return rec

    def started(self, rec: PipeRecord) -> None:
        rec.worker.post(lambda: rec.worker.adopt(rec))

    def dissolve(self, rec: PipeRecord) -> None:
        # The record's worker makes the transition (it owns the record).
        rec.worker.post(lambda: rec.worker.dissolve(rec, 0))

    def abandon(self, rec: PipeRecord) -> None:
        rec.worker.post(lambda: rec.worker.finish(rec))

    def wait(self, handle: Splice, timeout: float | None) -> bool:
        return handle._done.wait(timeout)

    def refresh(self, rec: PipeRecord) -> None:
        pass   # the record's counts are the counts

    def alive_sources(self) -> set[int] | None:
        return None

    def fileno(self) -> int | None:
        return None

    def timeout(self) -> float | None:
        return None

    def drive(self) -> None:
        pass

    # -- O_NONBLOCK while spliced (invariant 5) -----------------------------

    def _hold_nonblock(self, s: socket.socket, cookie: int) -> None:
        entry = self._nonblock.get(cookie)
        if entry is None:
            flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
            entry = self._nonblock[cookie] = [0, not flags & os.O_NONBLOCK]
            fcntl.fcntl(s.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        entry[0] += 1

    def _release_nonblock(self, s: socket.socket, cookie: int) -> None:
        entry = self._nonblock[cookie]
        entry[0] -= 1
        if entry[0] == 0:
            del self._nonblock[cookie]
            if entry[1]:
                flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
                fcntl.fcntl(s.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


class _Worker:
    """One thread, one epoll, the splices it owns, and an inbox."""

    def __init__(self, backend: WorkerBackend, n: int) -> None:
        self.backend = backend
        self.eng = backend._eng
        self.n = n
        self.reactor = Reactor()
        self.inbox: collections.deque[Callable[[], None]] = collections.deque()
        self.recs: set[PipeRecord] = set()
        self.again: list[PipeRecord] = []   # out of budget: step again soon
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=f"sosplice-worker-{n}", daemon=True)
        self.thread.start()

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on this worker's thread, after what was posted before."""
        self.inbox.append(fn)
        self.reactor.kick()

    def stop(self) -> None:
        def halt() -> None:
            self.stopping = True
        self.post(halt)
        if threading.current_thread() is not self.thread:
            self.thread.join()
            self.reactor.close()

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        next_sweep = time.monotonic() + CLOSE_SWEEP
        while not self.stopping:
            timeout = 0.0 if self.again else max(0.0, next_sweep - time.monotonic())
            if (when := self.reactor.next_timer()) is not None:
                timeout = min(timeout, max(0.0, (when - time.monotonic_ns()) / 1e9))
            woken, events = self.reactor.dispatch(self.reactor.poll(timeout))
            work, self.again = set(self.again), []
            while woken and self.inbox:
                self.guard(self.inbox.popleft())
            for rec, role, ev in events:
                if rec not in self.recs:
                    continue   # finished by the inbox just now
                if role == DRAIN and ev & (select.EPOLLERR | select.EPOLLHUP):
                    self.check_drain(rec)
                elif role == SOURCE and ev & select.EPOLLPRI:
                    rec.urgent = True
                work.add(rec)
            for rec in self.reactor.due(time.monotonic_ns()):
                rec.idle_at = 0
                work.add(rec)
            if (t0 := time.monotonic()) >= next_sweep:
                self.sweep()
                next_sweep = _next_sweep(t0)
            for rec in work:
                if rec in self.recs:
                    self.guard(lambda: self.step(rec), rec)

    def guard(self, fn: Callable[[], None], rec: PipeRecord | None = None) -> None:
        """Run one transition; a bug in it must not kill the worker.

        Every splice of this worker depends on the thread staying alive,
        so an unexpected error ends only the splice it concerns (EIO).
        """
        try:
            fn()
        except Exception:
            log.exception("sosplice worker %d: unexpected error", self.n)
            if rec is not None and rec in self.recs:
                self.eng._stop_taking(rec, errno.EIO)
                try:
                    self.finish(rec)
                except Exception:
                    log.exception("sosplice worker %d: cannot release a splice", self.n)

    def sweep(self) -> None:
        """End splices whose fds the application closed; publish a snapshot."""
        with self.eng._lock:
            mine = [r for r in self.eng._swept.values() if r.worker is self]
        for rec in mine:
            if rec.state is State.ACTIVE and (why := self.eng._closed_by_app(rec)) is not None:
                self.dissolve(rec, why)
        if self.n == 0:
            with self.eng._lock:
                self.eng._expire_recent()
                snapshot = self.eng._snapshot()
            self.eng._write_snapshot(snapshot)

    # -- transitions (on this worker's thread only) -------------------------

    def adopt(self, rec: PipeRecord) -> None:
        """start: watch the sockets and move what is already queued."""
        self.recs.add(rec)
        # Edge-triggered: the loop in _step reads until EAGAIN or a full
        # pipe; a full pipe is resumed by the drain's EPOLLOUT. EPOLLPRI:
        # tcp_poll reports it while an urgent byte waits, at its arrival
        # and at every later wake-up, so a stop at its mark is noticed.
        self.reactor.watch(rec.src.fileno(), SOURCE, rec,
                           select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP | select.EPOLLET)
        self.reactor.watch(rec.dst.fileno(), DRAIN, rec, select.EPOLLET)  # EPOLLERR/HUP always report
        if rec.idle_ns:
            self.arm_idle(rec, rec.started_ns + rec.idle_ns)
        self.step(rec)

    def step(self, rec: PipeRecord) -> None:
        """move: pipe -> drain, then source -> pipe, until neither moves."""
        for fd in (rec.src.fileno(), rec.dst.fileno()):
            # The application may have made a spliced socket blocking
            # (settimeout(None) on it, say); splice(2) on it would then
            # block this worker and every splice it owns (invariant 5).
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        budget = STEP_BUDGET
        while budget > 0:
            moved = 0
            if rec.taken > rec.sent:
                try:
                    n = os.splice(rec.pipe_r, rec.dst.fileno(), rec.taken - rec.sent, flags=FLAGS)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as e:
                    self.mark_error(rec.dst_cookie, e.errno, rec.dst)
                    self.drain_died(rec)
                    return
                rec.sent += n
                moved += n
            if rec.state is State.ACTIVE and not rec.eof:
                room = rec.pipe_size - (rec.taken - rec.sent)
                if rec.max:
                    room = min(room, rec.max - rec.taken)
                if room > 0:
                    try:
                        n = os.splice(rec.src.fileno(), rec.pipe_w, room, flags=FLAGS)
                    except (BlockingIOError, InterruptedError):
                        n = -1  # nothing queued (or no pipe slot free): wait
                    except OSError as e:
                        self.dissolve(rec, e.errno or errno.EIO)
                        return
                    if n == 0 or (n < 0 and rec.urgent):
                        # Nothing taken: an urgent mark, or (0) perhaps EOF.
                        n = self.urgent(rec, n == 0)
                        if n is None:
                            return  # the source failed: dissolved
                    if n == 0:
                        rec.eof = True
                        if not rec.src_error and self.reset_unseen(rec):
                            rec.src_error = errno.ECONNRESET
                        if rec.src_error:  # the end of a cut stream, not a FIN
                            self.dissolve(rec, rec.src_error)
                            return
                    elif n > 0:
                        rec.taken += n
                        rec.last_ns = time.monotonic_ns()
                        moved += n
                        if n == room and not rec.grown:
                            self.grow_pipe(rec)
            if not moved:
                break
            budget -= moved
        else:
            self.again.append(rec)
        self.want_out(rec, rec.taken > rec.sent)
        if rec.state is State.ACTIVE:
            if rec.max and rec.taken >= rec.max:
                self.dissolve(rec, errno.EFBIG)
            elif rec.eof:
                self.dissolve(rec, 0)
            elif rec.idle_ns and rec.idle_at == 0:
                if time.monotonic_ns() >= rec.last_active_ns + rec.idle_ns:
                    self.dissolve(rec, errno.ETIMEDOUT)
                else:
                    self.arm_idle(rec, rec.last_active_ns + rec.idle_ns)
        elif rec.state is State.DISSOLVING and rec.taken == rec.sent:
            self.finish(rec)

    def urgent(self, rec: PipeRecord, zero: bool) -> int | None:
        """splice(2) took nothing: step over an urgent mark, or confirm EOF.

        tcp_read_sock() stops at the urgent mark, SO_OOBINLINE or not, and
        tcp_splice_read() then returns 0 if the FIN has come, else EAGAIN
        (`zero` says which). At the mark, recv() on the SO_OOBINLINE source
        returns the urgent byte; it goes into the pipe like a spliced byte
        (invariants 1 and 2 hold: it comes from the source, in order, and
        the caller checked the room). Returns 1 (the byte was taken), 0
        (EOF), -1 (nothing to do until the next event), or None (the
        source failed: dissolved).
        """
        src = rec.src
        try:
            at_mark = _sock.at_mark(src)
            peek = src.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            # Nothing queued: the urgent pointer came before its byte, or
            # EAGAIN was just that. EPOLLPRI (the byte) or EPOLLIN follows.
            rec.urgent = at_mark
            return -1
        except OSError as e:
            self.dissolve(rec, e.errno or errno.EIO)
            return None
        if not peek:
            return 0  # end of stream, as splice(2) said
        if not at_mark:
            rec.urgent = False
            if not zero:
                return -1  # the pipe had no free slot: the drain's EPOLLOUT resumes
            # 0 from splice(2) with bytes on the source and no mark: no
            # known cause. Never EOF (the drain's peer would take a cut
            # stream for a whole one), and never a spin: end with EIO.
            log.warning("sosplice worker %d: splice(2) returned 0 with bytes on the source",
                        self.n)
            self.dissolve(rec, errno.EIO)
            return None
        try:
            os.write(rec.pipe_w, peek)
        except BlockingIOError:
            return -1  # no free pipe slot (rec.urgent stays set): the drain's EPOLLOUT resumes
        # The byte is in the pipe; now take it off the source. Nothing else
        # reads the source, so this is the byte just peeked.
        src.recv(1, socket.MSG_DONTWAIT)
        return 1

    def dissolve(self, rec: PipeRecord, error: int) -> None:
        """Take nothing more from the source; the flush follows in step."""
        if rec not in self.recs:
            return  # posted before adopt ran, or after finish: nothing to do
        if self.eng._stop_taking(rec, error):
            self.step(rec)

    def mark_error(self, cookie: int, err: int | None, sock: socket.socket) -> None:
        """A send to `cookie` (`sock`) failed with `err`: if that was its
        connection's error, its own splice, if it is a source here, must
        not take the coming end of stream for a FIN (invariant 7).

        EPIPE says only that the socket cannot send (shut down, or a reset
        after the peer's FIN says that too), unless the connection is gone
        altogether (TCP_CLOSE): then it is a reset whose ECONNRESET an
        earlier call took. splice(2) into a socket sends a pipe's buffers
        one by one and returns the bytes of those sent before one failed,
        so the error that failure consumed is never seen, and the next
        call gets EPIPE."""
        other = self.eng._live.get(cookie)
        if err == errno.EPIPE and _sock.tcp_state(sock) == _sock.TCP_CLOSE:
            err = errno.ECONNRESET
        if err and err != errno.EPIPE and other is not None and other.worker is self:
            other.src_error = err

    def reset_unseen(self, rec: PipeRecord) -> bool:
        """At the end of `rec`'s stream: was its connection reset, with the
        error taken by a send of the opposite splice that has not failed
        in turn yet (it sent part of its pipe; mark_error)?

        A connection that closed cleanly can be gone (TCP_CLOSE) only
        after the application shut this socket down for writing, which it
        does once the splice into it has ended; so a gone connection with
        that splice still running was reset."""
        other = self.eng._drains.get(rec.src_cookie)
        return (other is not None and other.state is State.ACTIVE
                and _sock.tcp_state(rec.src) == _sock.TCP_CLOSE)

    def drain_died(self, rec: PipeRecord) -> None:
        """The drain cannot send: what the pipe holds dies with it (counted)."""
        self.eng._stop_taking(rec, errno.EPIPE)
        rec.sent = rec.taken
        self.finish(rec)

    def check_drain(self, rec: PipeRecord) -> None:
        if _sock.tcp_state(rec.dst) not in _sock.CAN_SEND:
            self.drain_died(rec)

    def finish(self, rec: PipeRecord) -> None:
        """Flushed (or the drain is dead): release everything, report once."""
        if rec not in self.recs:
            return
        self.eng._stop_taking(rec, 0)   # if ACTIVE: Splicer.close() gave up on the drain
        self.recs.discard(rec)
        self.again = [r for r in self.again if r is not rec]
        self.reactor.unwatch(rec.src.fileno(), SOURCE, rec)
        self.reactor.unwatch(rec.dst.fileno(), DRAIN, rec)
        os.close(rec.pipe_r)
        os.close(rec.pipe_w)
        _restore_oob(rec)
        eng = self.eng
        with eng._lock:
            for s, c in ((rec.src, rec.src_cookie), (rec.dst, rec.dst_cookie)):
                self.backend._release_nonblock(s, c)
                if not rec.borrowed:
                    s.close()
            eng.ended(rec)

    # -- small things -------------------------------------------------------

    def want_out(self, rec: PipeRecord, on: bool) -> None:
        if rec.want_out != on and rec in self.recs:
            rec.want_out = on
            ev = select.EPOLLOUT | select.EPOLLET if on else select.EPOLLET
            self.reactor.modify(rec.dst.fileno(), DRAIN, rec, ev)

    def grow_pipe(self, rec: PipeRecord) -> None:
        """A splice that fills its pipe gets the full size (up to 1 MiB).

        Pipes start at the kernel's default (64 KiB): an idle or chatty
        splice keeps 16 pipe slots, not 256, and a bulk one grows on its
        first full pipe, where bigger steps pay off.
        """
        try:
            fcntl.fcntl(rec.pipe_w, F_SETPIPE_SZ, self.backend._pipe_max)
        except OSError:
            pass  # EPERM past pipe-max-size or the per-user pipe budget: keep it
        rec.pipe_size = fcntl.fcntl(rec.pipe_w, F_GETPIPE_SZ)
        rec.grown = True

    def arm_idle(self, rec: PipeRecord, when_ns: int) -> None:
        rec.idle_at = when_ns
        self.reactor.at(when_ns, rec)


def _restore_oob(rec: PipeRecord | None) -> None:
    """The application's SO_OOBINLINE comes back (invariant 6)."""
    if rec is not None and rec.oob_was_off:
        try:
            rec.src.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 0)
        except OSError:
            pass  # the socket is gone: nothing to restore
