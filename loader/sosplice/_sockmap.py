"""The bpf backend: BPF programs, one record per splice, one controller thread.

Transitions, each one function, all under `Splicer._lock`:
  start()      start: insert into the maps, publish ctl (after _engine.Splicer.splice
               validated the sockets)
  _move()      the controller's step for one splice: copy passed bytes in
               order, publish ctl, put a source that started out of the
               map into it (_admit), decide whether to end (OpenBSD somove)
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
     or arrive (they would be lost, docs/kernel-notes.md K7, K13; an skb arriving
     during the delete is lost or duplicated now and then): it leaves only
     after EOF with an empty queue, or when closed. A fresh source with
     bytes queued before the splice enters it only once the controller
     has sent those (_admit).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes as ct
import errno
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _sock
from ._bpf import Programs
from ._backend import CLOSE_SWEEP, Life, _err, _next_sweep
from ._maps import U64, SpliceEvent, SpliceStats
from ._reactor import DRAIN, SOURCE, Reactor
from ._splice import Splice, SpliceRecord, State

if TYPE_CHECKING:
    from ._engine import Splicer

# Largest copy the controller makes per step for one splice, so one busy
# splice cannot starve the others.
COPY_CHUNK = 256 << 10
COPY_BUDGET = 4 << 20
# Most a fresh source's queue is read at splice(), in the caller's thread.
PREFETCH_MAX = 4 << 20
# How often to re-read the drain while waiting for its backlog to empty.
FLUSH_POLL = 0.001
FLUSH_POLL_MAX = 0.05

SO_SNDBUFFORCE = 32
_HOLD = 1 << 63  # a `copied` value `passed` never reaches: pass everything

# Source cookie -> the engine whose `sources` map holds it, for every bpf
# engine of this process: a socket can have one verdict program only.
_CLAIMED: dict[int, SockmapBackend] = {}

# Programs of closed engines whose `sources` map still holds open sockets.
# A socket leaves its sockmap only losslessly when nothing is queued in its
# psock and nothing can arrive meanwhile (docs/kernel-notes.md K7, K13): tearing the
# map down under a former source drops the bytes its verdict passed and
# leaves the socket unreadable (FIONREAD shows them, recv() never returns
# them: issue 11, item 2). So closing an engine keeps the verdict (which
# passes everything: no slot has an owner) and its maps until the last of
# those sockets is closed; the next engine of the same size adopts them,
# and with them its former sources, which it can splice again.
_RETIRED: list[Programs] = []
_RETIRED_LOCK = threading.Lock()


@contextlib.contextmanager
def _urgent_in_band(s: socket.socket) -> Iterator[None]:
    """recv() urgent bytes in band, as the verdict carries them: out of
    band, recv() would skip an urgent byte already queued."""
    inline = s.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE)
    if not inline:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    try:
        yield
    finally:
        if not inline:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 0)


def _at_queue_end(s: socket.socket, data: bytes, asked: int) -> bool:
    """Whether a read of `asked` bytes that returned `data` emptied the
    TCP receive queue, so that what arrives next starts a new skb.

    tcp_recvmsg() returns fewer bytes than asked (without a FIN or an
    error) only when it has eaten every skb in the queue, or when it stops
    at the urgent mark, which may lie inside one. This matters because
    the verdict gets a partly read skb whole, already read bytes and all:
    a source may join its map only where the queue starts on a new skb.
    """
    return len(data) < asked and not _sock.at_mark(s)


def reap_retired() -> None:
    """Unload the programs of closed engines once no socket is left in
    their `sources` (the kernel removes a socket from its maps on close)."""
    with _RETIRED_LOCK:
        for prog in [p for p in _RETIRED if not p.keys(p.sources_fd)]:
            _RETIRED.remove(prog)
            prog.close()


def adopt_programs(max_sockets: int) -> Programs:
    """A closed engine's programs of this size, or new ones."""
    reap_retired()
    with _RETIRED_LOCK:
        for prog in _RETIRED:
            if prog.max_sockets == max_sockets:
                _RETIRED.remove(prog)
                return prog
    return Programs(max_sockets)


@dataclass(eq=False, kw_only=True)
class SockmapRecord(SpliceRecord):
    """A splice of the bpf backend (owner tags: see _splice)."""

    slot: int                      # [I] index into the ctl and stats arrays
    drain_base: int                # [I] drain's written count at start
    q_old: int                     # [I] source bytes queued before start
    drain_in_map: bool             # [I] False: drain cannot be a redirect target
    taken: int = 0                 # [C] bytes the controller took from the source
    sent: int = 0                  # [C] ... and of those, sent on the drain
    pending: bytes = b""           # [C] taken, not yet sent (taken - sent)
    published: tuple[int, int, int] = (0, 0, 0)  # [C] (credit, copied, notify_at) in ctl
    eof: bool = False              # [C] the source has seen FIN
    want_out: bool = False         # [C] waiting for the drain to become writable
    last_copy_ns: int = 0          # [C] last time the controller moved a byte
    flushed_once: bool = False     # [C] one flushed reading seen while dissolving
    last_written: int = 0          # [C] drain's written count at the last look
    paused: bool = False           # [C] not yet in `sources`: new bytes wait in its TCP queue (_admit)
    unmapped: bool = False         # [C] out of `sources`, read directly: past its FIN, or paused before its queue's end (_take_direct)
    backoff: float = 0.001         # [C] seconds until the next look without events
    moved: int = 0                 # [K] bytes the verdict redirected
    passed: int = 0                # [K] bytes the verdict left on the source
    last_ns: int = 0               # [K] time of the last redirect
    src_error: int = 0             # [K] ECONNRESET if the source was reset (tcp_reset.c)

    @property
    def bytes(self) -> int:
        return self.moved + self.taken

    @property
    def kernel_bytes(self) -> int:
        return self.moved  # redirected by the verdict; `taken` went through us

    @property
    def fifo(self) -> int:
        """Bytes of the spliced stream waiting in the source's queue."""
        return self.q_old + self.passed - self.taken

    @property
    def throttled(self) -> bool:
        return self.fifo > 0 or self.paused

    @property
    def last_active_ns(self) -> int:
        return max(self.last_ns, self.last_copy_ns, self.started_ns)

    def check_invariants(self) -> None:
        assert self.sent <= self.taken, (self.sent, self.taken)
        assert len(self.pending) == self.taken - self.sent
        assert self.fifo >= 0, ("source queue underflow", self.q_old, self.passed, self.taken)
        if self.max:
            assert self.bytes <= self.max, ("moved beyond max", self.bytes, self.max)


class SockmapBackend:
    """The bpf backend (`_backend.Backend`) of a `Splicer`, with the
    programs `adopt_programs` loaded (it raises PermissionError (EPERM)
    without CAP_BPF/CAP_NET_ADMIN, OSError (ENOSYS) on a kernel older
    than 6.16)."""

    name = "bpf"

    def __init__(self, eng: Splicer, programs: Programs, max_sockets: int, thread: bool) -> None:
        self._eng = eng
        self._prog = programs
        self._max_sockets = max_sockets
        self._sleeps_until = 1 << 63   # monotonic ns the controller means to wake by (_run)
        self._sources: set[int] = set()                 # cookies we put in `sources`
        # Free slots of the ctl/stats arrays, oldest first: a slot is used
        # again as late as possible after its splice ended (its owner check
        # in the verdict is what makes reuse safe; lateness is a margin).
        self._free_slots = collections.deque(range(max_sockets))
        self._reset_on_close: set[int] = set()          # see _finish
        self._reactor = Reactor()
        self._prog.bpf.ring_buffer_consume()  # a former owner's events
        self._prog.on_event = self._on_event
        # Former sources of a closed engine: spliced again here, they are
        # resplices (their psock queue may hold bytes passed meanwhile).
        self._sources |= self._prog.keys(self._prog.sources_fd)
        for c in self._sources:
            _CLAIMED[c] = self
        self._reactor.ep.register(self._prog.events_fd, select.EPOLLIN)
        self._rb_hit: list[int] = []
        self._next_sweep = time.monotonic() + CLOSE_SWEEP
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="sosplice-controller", daemon=True)
            self._thread.start()
        else:
            # No controller thread: the application's loop drives the
            # engine (reap(), timeout()), and waits on the reactor's epoll,
            # which the ended splices' eventfd makes readable too.
            self._reactor.ep.register(self._eng._ready, select.EPOLLIN)

    def close(self) -> None:
        """Stop the controller and retire the programs (the engine has
        reported every splice: `Splicer.close`)."""
        self._reactor.kick()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join()
        self._reactor.close()
        for c in self._sources:
            if _CLAIMED.get(c) is self:
                del _CLAIMED[c]
        self._prog.on_event = None
        with _RETIRED_LOCK:
            _RETIRED.append(self._prog)
        reap_retired()

    def dissolve(self, rec: SockmapRecord) -> None:
        if rec.state is State.ACTIVE:
            self._dissolve(rec, 0)
            self._at(rec, 0)
            self._reactor.kick()

    def abandon(self, rec: SockmapRecord) -> None:
        self._finish(rec)

    # -- start --------------------------------------------------------------

    def start(self, init: dict[str, Any]) -> SockmapRecord:
        dst, dcookie = init["dst"], init["dst_cookie"]
        state, acked, queued = _sock.progress(dst)
        base = acked + queued
        if state not in _sock.CAN_SEND:
            raise _err(errno.EPIPE, "drain can no longer send")
        now = init["started_ns"]
        # A drain whose peer already half-closed (CLOSE_WAIT) cannot enter a
        # sockmap (docs/kernel-notes.md K9); it can still send, so the controller
        # copies every byte of such a splice itself (credit stays 0).
        drain_in_map = True
        if dst.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 4 * self._eng.backlog_cap:
            # Room for the whole cap in the drain's own send queue, with
            # the kernel's per-skb overhead (see _publish). Also what lifts
            # bulk speed (docs/kernel-notes.md K14).
            dst.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * self._eng.backlog_cap)
        try:
            self._prog.insert(self._prog.drains_fd, dcookie, dst.fileno())
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EEXIST):
                raise _err(e.errno, f"cannot add the drain to the sockmap: {e.strerror}") from None
            drain_in_map = e.errno == errno.EEXIST
        if not self._free_slots:
            if drain_in_map:
                self._prog.delete(self._prog.drains_fd, dcookie)
            raise _err(errno.ENOSPC, f"the engine is full ({self._max_sockets} splices); "
                       "create the Splicer with a larger max_sockets")
        rec = SockmapRecord(
            **init, slot=self._free_slots.popleft(), drain_base=base,
            q_old=0, drain_in_map=drain_in_map, last_copy_ns=now,
        )
        try:
            self._claim_slot(rec)
            fresh = self._insert_source(rec)
            if not fresh:
                rec.q_old = self._measure_queue(rec)
            self._publish(rec, base, force=True)
        except BaseException:
            self._release_slot(rec)
            if drain_in_map:
                self._prog.delete(self._prog.drains_fd, dcookie)
            raise
        return rec

    def started(self, rec: SockmapRecord) -> None:
        # Edge-triggered: passed bytes keep the source readable while the
        # controller waits for the drain, and a level-triggered source
        # would spin. Every new skb or FIN is a new edge. A drain that is
        # also a source (splice_pair) shares its mode: its EPOLLOUT is then
        # an edge too, which _want_out re-arms each time it turns it on.
        self._reactor.watch(rec.src.fileno(), SOURCE, rec,
                            select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._reactor.watch(rec.dst.fileno(), DRAIN, rec, 0)  # EPOLLERR and EPOLLHUP always report
        if rec.idle_ns:
            self._at(rec, rec.started_ns + rec.idle_ns)
        # A splice the verdict can run alone needs no look until an event:
        # the ring buffer's at half credit, EPOLLIN for a passed skb (epoll
        # reports a source already readable when it is registered). One
        # that cannot (bytes taken at the start, a resplice's queue, EOF)
        # takes its first step here, in the caller's thread, under the
        # lock like every step: a proxy's client has usually sent its
        # first bytes before the splice, and handing them to the
        # controller cost a thread switch and a wake-up per connection.
        # A splice that ends here closes its dups while the controller
        # may hold a polled batch naming their fd numbers, which the
        # caller's next splice() takes at once: the reactor re-reads the
        # events of such numbers (_reactor, dispatch), or the old
        # socket's EOF would end the new splice.
        if rec.pending or rec.fifo > 0 or rec.paused or rec.unmapped or rec.eof:
            self._move(rec)

    def _claim_slot(self, rec: SockmapRecord) -> None:
        """Give the record's slot its owner, holding the verdict (it passes
        and counts every skb) until _publish lets it redirect.

        The stats are zeroed and the ctl fields written before the owner:
        a verdict that finds the source in `slots` either sees no owner
        (pass, uncounted: nothing is spliced yet) or a whole holding entry.
        """
        # The stats-reset ordering: stats zeroed, then the ctl fields, then
        # the owner, then `slots`; one 8-byte store each, which x86-64 makes
        # visible in this order. The verdict (bpf/sk_skb_verdict.c, at its
        # owner check) and tcp_reset.c read the owner first and rely on it:
        # an owner that is theirs comes with zeroed stats and this ctl.
        # Do not reorder these stores.
        st = self._prog.stats[rec.slot]
        st.moved = st.passed = st.last_ns = st.error = 0
        c = self._prog.ctl[rec.slot]  # a free slot has no owner (source 0)
        c.drain, c.credit, c.notify_at, c.copied = rec.dst_cookie, 0, 0, _HOLD
        c.source = rec.src_cookie
        self._prog.insert(self._prog.slots_fd, rec.src_cookie, rec.slot)
        rec.published = (0, _HOLD, 0)

    def _release_slot(self, rec: SockmapRecord) -> None:
        """The verdict passes uncounted from here on; the slot goes to the
        back of the free list."""
        self._prog.ctl[rec.slot].source = 0
        self._prog.delete(self._prog.slots_fd, rec.src_cookie)
        self._free_slots.append(rec.slot)

    def _hold(self, rec: SockmapRecord, copied: int = _HOLD) -> None:
        """No redirect until `copied`: credit 0 first, as in _publish."""
        c = self._prog.ctl[rec.slot]
        c.credit = 0
        c.copied = copied
        rec.published = (0, copied, c.notify_at)

    def _insert_source(self, rec: SockmapRecord) -> bool:
        """Put the source in `sources`; False if it already was (resplice)."""
        c = rec.src_cookie
        state = _sock.tcp_state(rec.src)
        if state not in _sock.CAN_SEND:
            raise _err(errno.ENOTCONN, "source has shut down its side of the connection; "
                       "splice before calling shutdown() on it")
        if state != _sock.TCP_ESTABLISHED:
            # CLOSE_WAIT: the peer sent FIN; the socket cannot join a map
            # (docs/kernel-notes.md K9), and nothing more can arrive: take what is
            # left now, the controller sends it.
            self._prefetch(rec)
            return True
        # Resplice: the socket may hold bytes passed while it was not
        # spliced. The verdict holds (passes everything, counted) until
        # they are measured: _claim_slot left it so.
        if c in self._sources:
            return False
        self._check_insertable(c)
        # Take what is already queued ourselves. The kernel hands an skb
        # the application has partly read to the verdict whole, so the
        # bytes already read would be moved again (measured on 6.18:
        # tests/test_limits.py::test_bytes_read_by_app_before_splice_are_not_moved).
        # Whatever arrives after this is fresh skbs.
        if self._prefetch(rec):
            return True  # EOF or the limit reached by queued bytes alone
        if rec.pending:
            # Start paused: until the controller has sent what it took, the
            # verdict would have to pass every new skb to keep them behind
            # it, and a sender faster than the copy would keep the splice
            # on the copy path. Out of the map, they wait in the TCP queue
            # instead, and go back to the verdict, in order, once admitted
            # (_admit). Still this engine's: nothing else may claim it.
            _CLAIMED[c] = self
            rec.paused = True
            return True
        # Nothing is passed yet, and nothing taken: the verdict may redirect
        # at once (the credit follows in _publish).
        self._hold(rec, 0)
        try:
            self._enter_sources(rec)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP and _sock.tcp_state(rec.src) == _sock.TCP_CLOSE_WAIT:
                # The peer's FIN arrived after _prefetch looked: nothing
                # more can come, so take the rest like any CLOSE_WAIT source.
                self._prefetch(rec)
                return True
            if e.errno == errno.EBUSY:
                raise _err(errno.EBUSY, "source is already in another sockmap with a verdict "
                           "program (another sosplice engine?); use one engine") from None
            raise _err(e.errno, f"cannot add the source to the sockmap: {e.strerror}") from None
        return True

    def _check_insertable(self, c: int) -> None:
        """Refuse, before _prefetch takes any byte, what the insert would.

        Bytes taken from the source cannot be given back, so the two
        refusals that depend on the maps are checked first: a source in
        another engine's map (EBUSY) and a full map (ENOSPC).
        """
        other = _CLAIMED.get(c)
        if other is not None and other is not self:
            raise _err(errno.EBUSY, "source is already in another sosplice engine's sockmap; "
                       "splice a socket through one engine only")
        if len(self._sources) >= self._max_sockets:
            self._prune_sources()
            if len(self._sources) >= self._max_sockets:
                raise _err(errno.ENOSPC, f"the sockmap is full ({self._max_sockets} sources); "
                           "create the Splicer with a larger max_sockets")

    def _prune_sources(self) -> set[int]:
        """Forget sources the kernel dropped from the map (closed); return
        the cookies still in it."""
        alive = self._prog.keys(self._prog.sources_fd)
        for gone in self._sources - alive:
            _CLAIMED.pop(gone, None)
        self._sources &= alive
        return alive

    def _prefetch(self, rec: SockmapRecord) -> bool:
        """Take the bytes queued on a fresh source into `pending`.

        They count as queued before the start (q_old) and taken, so the
        verdict passes until they have been sent (invariant 1). True if
        the source must stay out of the map: EOF, or `max` already reached.
        May be called again (the FIN arrived meanwhile): it adds to what
        the first call took.

        Takes at most PREFETCH_MAX: a peer that sends faster than this loop
        reads would keep it going, and its memory growing, for ever. If it
        stops before the queue's end the source is left `unmapped` and the
        controller reads on until it finds one (_take_direct).
        """
        chunks = [rec.pending]
        room = (rec.max - rec.taken) if rec.max else PREFETCH_MAX
        with _urgent_in_band(rec.src):
            at_end = self._take_queued(rec, chunks, min(room, PREFETCH_MAX))
        rec.pending = b"".join(chunks)
        rec.taken = rec.q_old = len(rec.pending)
        done = rec.eof or bool(rec.max) and rec.taken >= rec.max
        if not (at_end or done):
            rec.unmapped = True
        return done

    def _take_queued(self, rec: SockmapRecord, chunks: list[bytes], want: int) -> bool:
        """Read up to `want` bytes into `chunks`; True if the reads ended
        at the end of the queue (_at_queue_end) or at EOF."""
        n = COPY_CHUNK
        while want > 0:
            n = min(want, n)
            try:
                data = rec.src.recv(n, socket.MSG_DONTWAIT)
                if not data:
                    # Not FIONREAD, and EOF only if a second read agrees: a
                    # socket with a psock (it may be the drain of another
                    # splice) reports 0 for FIONREAD, and can return EOF
                    # once with the FIN's data still in its TCP queue
                    # (tcp_bpf_recvmsg looks at that queue before it takes
                    # the socket lock). Measured on 6.18:
                    # tests/test_transfer.py::test_answer_and_fin_before_the_splice.
                    data = rec.src.recv(n, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            if not data:
                rec.eof = True
                return True
            chunks.append(data)
            want -= len(data)
            if _at_queue_end(rec.src, data, n):
                return True
            n = _sock.inq(rec.src) + COPY_CHUNK
        return False

    def _measure_queue(self, rec: SockmapRecord) -> int:
        """Bytes in the source's queue that the verdict did not count.

        FIONREAD and the verdict exclude each other (socket lock), so a
        reading bracketed by two equal `passed` values is exact.
        """
        rec.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        for _ in range(1000):
            p0 = self._stats(rec).passed
            n = _sock.inq(rec.src)
            if self._stats(rec).passed == p0:
                return n - p0
        raise _err(errno.EAGAIN, "source queue did not settle; try again")

    # -- the controller -----------------------------------------------------

    def _run(self) -> None:
        """The controller thread."""
        while True:
            # Unknown while it is computed: a timer armed meanwhile wakes us.
            self._sleeps_until = 1 << 63
            timeout = self._timeout()
            self._sleeps_until = time.monotonic_ns() + int(timeout * 1e9)
            if not self._step(timeout):
                return

    def _step(self, timeout: float) -> bool:
        """Wait up to `timeout` s for events, then move every splice that
        has one, and those whose timer is due. False once closed."""
        try:
            raw = self._reactor.poll(timeout)
        except (OSError, ValueError):
            return False
        snapshot = None
        with self._eng._lock:
            if self._eng._life is Life.CLOSED:
                return False
            work: set[SockmapRecord] = set()
            _, events = self._reactor.dispatch(raw)
            for rec, role, ev in events:
                if rec is None:   # not a socket of a splice: `role` is the fd
                    if role == self._prog.events_fd:
                        self._prog.bpf.ring_buffer_consume()
                    continue   # else the ended splices' eventfd: reap() reads it
                if role == SOURCE and ev & (select.EPOLLRDHUP | select.EPOLLHUP) \
                        and not (rec.paused or rec.unmapped):
                    # Out of the map, the FIN waits behind bytes in
                    # the TCP queue: EOF is when recv() says so.
                    rec.eof = True
                work.add(rec)
            for c in self._rb_hit:
                if c in self._eng._live:
                    work.add(self._eng._live[c])
            self._rb_hit.clear()
            now = time.monotonic_ns()
            work.update(self._reactor.due(now))
            if (t0 := time.monotonic()) >= self._next_sweep:
                self._sweep_closed()
                self._eng._expire_recent()
                snapshot = self._eng._snapshot()
                self._next_sweep = _next_sweep(t0)
            for rec in work:
                if rec.state is not State.DONE:
                    self._move(rec)
        self._eng._write_snapshot(snapshot)
        return True

    # -- driven by the application (Splicer(thread=False)) ------------------

    def fileno(self) -> int | None:
        if self._thread is not None:
            return None   # the engine's eventfd of ended splices
        return self._reactor.ep.fileno()

    def timeout(self) -> float | None:
        if self._thread is not None:
            return None
        return self._timeout()

    def drive(self) -> None:
        if self._thread is None and self._eng._life is not Life.CLOSED:
            self._step(0)

    def wait(self, handle: Splice, timeout: float | None) -> bool:
        if self._thread is not None:
            return handle._done.wait(timeout)
        end = None if timeout is None else time.monotonic() + timeout
        while not handle._done.is_set():
            left = self._timeout() if end is None else min(self._timeout(), end - time.monotonic())
            if left < 0 or self._eng._life is Life.CLOSED:
                break
            self._step(left)
        return handle._done.is_set()

    def _timeout(self) -> float:
        t = self._next_sweep - time.monotonic()
        if (when := self._reactor.next_timer()) is not None:
            t = min(t, (when - time.monotonic_ns()) / 1e9)
        return max(0.0, t)

    def _at(self, rec: SockmapRecord, when_ns: int) -> None:
        """Step `rec` at `when_ns` (under the lock, from any thread)."""
        self._reactor.at(when_ns, rec)
        if self._thread is not None and when_ns < self._sleeps_until \
                and threading.current_thread() is not self._thread:
            self._reactor.kick()

    def _later(self, rec: SockmapRecord) -> None:
        """Look at `rec` again soon: sooner while the drain makes progress.

        Waiting for a drain's backlog to empty has no event to wait on; the
        poll backs off from 1 ms to 50 ms while the drain takes nothing.
        """
        self._at(rec, time.monotonic_ns() + int(rec.backoff * 1e9))

    def _on_event(self, ctx: object, data: object, size: int) -> None:
        ev = ct.cast(data, ct.POINTER(SpliceEvent)).contents
        self._rb_hit.append(ev.source)

    def _stats(self, rec: SockmapRecord) -> SpliceStats:
        return self._prog.stats[rec.slot]

    def _read_stats(self, rec: SockmapRecord) -> None:
        if rec.state is State.DONE:
            return  # the slot may belong to another splice now
        s = self._stats(rec)
        rec.moved, rec.passed, rec.last_ns, rec.src_error = s.moved, s.passed, s.last_ns, s.error

    def _move(self, rec: SockmapRecord) -> None:
        """One controller step for one splice (OpenBSD's somove).

        Returns with the splice either progressing, or dissolving, or done;
        when it must look again without an event it arms a timer (_later).
        """
        if rec.eof:
            # TCP wakes us for a FIN (tcp_fin) before it runs the verdict
            # on the data of the same segment (tcp_data_ready). TCP_INFO
            # takes the socket lock, which that softirq holds throughout:
            # past it, the verdict has counted every byte before the FIN.
            _sock.tcp_state(rec.src)
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
                # Not after EOF (or a reset): nothing arrives after it, and
                # the verdicts of what came before have all counted (the
                # tcp_state() barrier at the top of the step that saw it).
                # That EOF is this source's own: the reactor hands a record
                # no event of another socket that had its fd number.
                if rec.flushed_once or rec.eof:
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
        stale = False   # the drain's reading above still holds: nothing sent since
        while budget > 0 and rec.state is State.ACTIVE:
            if rec.pending:
                if not self._send_pending(rec):
                    break
                stale = True
            if stale:
                # An older reading would only be more cautious (a smaller
                # `written` waits, a smaller `acked` gives less credit),
                # but what the controller just sent must count.
                _, acked, queued = _sock.progress(rec.dst)
                written = acked + queued - rec.drain_base
            stale = True
            # Read `passed` afresh and publish at once when the queue is
            # empty: a sustained stream passes a new skb every few tens of
            # microseconds, and only a publish that lands before the next
            # one lets the verdict go back to redirecting.
            self._read_stats(rec)
            if rec.fifo == 0 and not rec.unmapped:
                self._publish(rec, acked)
                break
            room = rec.max - rec.bytes if rec.max else 1 << 62
            # The whole counted queue and what came since (every byte in
            # it was counted before it was queued), in one read: the fewer
            # reads, the sooner the queue is found empty and the verdict
            # may redirect again. Measured: 7-59% in the kernel instead of
            # 0.2-16% for iperf3 -P 1 -R (docs/design.md, "Known limitation").
            n = min(rec.fifo + COPY_CHUNK, room, budget)
            if rec.unmapped:
                # Its bytes are in its TCP queue, uncounted: read them all
                # at once if it can be done, to find the queue's end.
                n = min(_sock.inq(rec.src) + COPY_CHUNK, room)
            if n <= 0:
                break
            if written < rec.moved + rec.sent:
                self._later(rec)  # the drain's backlog is not empty yet
                break
            if rec.drain_in_map and rec.moved + rec.sent - (acked - rec.drain_base) >= self._eng.backlog_cap:
                # The cap binds this path too: bytes the drain's peer has
                # not acknowledged stay within it whichever path sent them.
                self._later(rec)
                break
            if rec.unmapped:
                if not self._take_direct(rec, n):
                    break
                budget -= len(rec.pending)
                continue
            try:
                data = rec.src.recv(n, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                # Counted by the verdict, not yet queued: EPOLLIN follows.
                # Not always after EOF: a connection aborted or reset while
                # bytes were passed loses its psock, and what it held comes
                # back to the TCP queue with no new edge. Look again.
                if rec.eof:
                    self._later(rec)
                break
            except OSError as e:
                self._dissolve(rec, e.errno or errno.EIO)
                break
            if not data:
                if rec.eof and _sock.tcp_state(rec.src) == _sock.TCP_CLOSE:
                    # The connection is gone (reset, or aborted by the
                    # application) with counted bytes that never reached
                    # the queue: they died with it. A cut stream.
                    self._dissolve(rec, rec.src_error or errno.ECONNRESET)
                break
            rec.taken += len(data)
            rec.pending = data
            # Past the `passed` read above, perhaps: every byte read was
            # counted before it was queued, so a fresh reading covers it.
            self._read_stats(rec)
            rec.last_copy_ns = time.monotonic_ns()
            budget -= len(data)
        else:
            if rec.state is State.ACTIVE:
                self._later(rec)  # out of budget: let other splices run
        if rec.state is State.ACTIVE:
            # The last reading of the drain: an older `acked` can only
            # make the credit smaller, never let it pass the cap.
            self._publish(rec, acked)
            if rec.paused and not rec.unmapped and not rec.pending:
                self._admit(rec)

        if rec.state is not State.ACTIVE:
            pass
        elif rec.max and rec.bytes >= rec.max and not rec.pending:
            self._dissolve(rec, errno.EFBIG)
        elif rec.eof and rec.fifo == 0 and not rec.pending and not rec.paused:
            # EPOLLRDHUP comes with a FIN and a reset alike; the probe
            # told them apart as the reset arrived (bpf/tcp_reset.c).
            self._dissolve(rec, rec.src_error)
        elif rec.idle_ns and self._idle_expired(rec):
            self._dissolve(rec, errno.ETIMEDOUT)
        if rec.state is State.DISSOLVING:
            self._move(rec)

    # -- a source that starts out of the map ---------------------------------

    def _take_direct(self, rec: SockmapRecord, n: int) -> bool:
        """One read of an unmapped source, outside the verdict; False when
        there is nothing more to read for now.

        A source that started paused is unmapped while what its peer sent
        before the splice is still coming in (_prefetch stopped short):
        once a read finds the queue's end, it stays out of the map, its
        new bytes waiting in the TCP queue, until _admit. Any other
        unmapped source is past its FIN: it is read to EOF.
        """
        try:
            with _urgent_in_band(rec.src):
                data = rec.src.recv(n, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            rec.unmapped = not rec.paused
            return False
        except OSError as e:
            self._dissolve(rec, e.errno or errno.EIO)
            return False
        if not data:
            rec.eof = True
            rec.paused = False  # nothing left to admit
            return False
        rec.taken += len(data)
        rec.q_old += len(data)  # taken without the verdict: fifo stays 0
        rec.pending = data
        rec.last_copy_ns = time.monotonic_ns()
        if rec.paused and _at_queue_end(rec.src, data, n):
            rec.unmapped = False
        return True

    def _enter_sources(self, rec: SockmapRecord) -> None:
        """Insert the source into `sources`, and run the verdict over what
        its TCP queue holds: those bytes reach the verdict only on the next
        data_ready, which SO_RCVLOWAT 1 triggers now (docs/kernel-notes.md K8). Raises the
        insert's OSError."""
        self._prog.insert(self._prog.sources_fd, rec.src_cookie, rec.src.fileno())
        # Never discarded: cookies are not reused, and a closed socket
        # leaves the map by itself (pruned in _expire_recent).
        self._sources.add(rec.src_cookie)
        _CLAIMED[rec.src_cookie] = self
        rec.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _admit(self, rec: SockmapRecord) -> None:
        """Put a source that started paused into `sources`, now that the
        bytes the controller took at the start are sent (_insert_source).

        Until then its new bytes waited in its TCP receive queue, charged
        to it, and TCP's window held its peer back; the verdict redirects
        them, in order, ahead of anything newer. Only inserts: taking a
        source out of a map while bytes arrive loses or duplicates an skb
        now and then on 6.18 (docs/design.md, "Why a source is never
        paused by leaving its map").
        """
        rec.paused = False
        try:
            self._enter_sources(rec)
        except OSError:
            # Only an ESTABLISHED socket can join a map (docs/kernel-notes.md K9): the peer's
            # FIN or a reset came while it was out. Nothing more can
            # arrive; the controller reads what is left itself, once the
            # drain has taken every byte sent before (invariant 2).
            rec.unmapped = True
            self._at(rec, 0)

    def _send_pending(self, rec: SockmapRecord) -> bool:
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

    def _want_out(self, rec: SockmapRecord, on: bool) -> None:
        if rec.want_out != on:
            rec.want_out = on
            self._reactor.modify(rec.dst.fileno(), DRAIN, rec, select.EPOLLOUT if on else 0)

    def _publish(self, rec: SockmapRecord, acked: int, force: bool = False) -> None:
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
            credit = max(0, acked - rec.drain_base - rec.sent + self._eng.backlog_cap)
            if rec.max:
                credit = min(credit, rec.max - rec.taken)
        copied = (rec.sent - rec.q_old) % U64
        notify = max(rec.moved + 1, credit - self._eng.backlog_cap // 2)
        want = (credit, copied, notify)
        if want != rec.published or force:
            # Credit before copied: the verdict reads copied first, so a
            # copied that lets it redirect comes with this credit or a
            # newer one, never one from before `taken` grew (x86-64 keeps
            # stores in order, and so do these 8-byte ctypes stores).
            c = self._prog.ctl[rec.slot]
            c.credit = credit
            c.notify_at = notify
            c.copied = copied
            rec.published = want

    def _idle_expired(self, rec: SockmapRecord) -> bool:
        deadline = rec.last_active_ns + rec.idle_ns
        if time.monotonic_ns() >= deadline:
            return True
        self._at(rec, deadline)
        return False

    def _sweep_closed(self) -> None:
        """End splices whose source or drain the application has closed."""
        for rec in list(self._eng._swept.values()):
            if rec.state is State.ACTIVE and (why := self._eng._closed_by_app(rec)) is not None:
                self._dissolve(rec, why)
                self._move(rec)

    # -- the end ------------------------------------------------------------

    def _dissolve(self, rec: SockmapRecord, error: int) -> None:
        """Stop redirecting and counting; the flush follows in _move."""
        rec.check_invariants()
        taken = self._eng._stop_taking(rec, error)
        assert taken, "only an ACTIVE splice dissolves"
        self._prog.ctl[rec.slot].source = 0

    def _finish(self, rec: SockmapRecord) -> None:
        """Flushed (or the drain is dead): release everything, report once."""
        if rec.state is State.DONE:
            return
        if rec.state is State.ACTIVE:
            self._dissolve(rec, 0)
        self._read_stats(rec)
        rec.check_invariants()
        assert self._eng._live.get(rec.src_cookie) is rec and self._eng._drains.get(rec.dst_cookie) is rec
        self._release_slot(rec)
        self._leave_maps(rec)
        if rec.fifo > 0 and self._eng._app_closed(rec, 0):
            self._reset_on_close.add(rec.src_cookie)
        for s, c, role in ((rec.src, rec.src_cookie, SOURCE), (rec.dst, rec.dst_cookie, DRAIN)):
            self._reactor.unwatch(s.fileno(), role, rec)
            if rec.borrowed:
                continue   # the application's own sockets (splice_pair)
            others = self._eng._live.get(c, rec) is not rec or self._eng._drains.get(c, rec) is not rec
            if c in self._reset_on_close and not others:
                self._reset_on_close.discard(c)
                if _sock.progress(s)[2] == 0:
                    # The application closed a source with bytes it never
                    # read, which sit in the psock queue where tcp_close()
                    # does not look: reset its peer, as a socket closed
                    # with unread data does, rather than send a FIN it
                    # would wait behind (only with nothing left to send:
                    # moved bytes still reach the other peer).
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self._eng.ended(rec)

    def _leave_maps(self, rec: SockmapRecord) -> None:
        """At the end: the drain leaves `drains`, and the source `sources`
        when it may (invariant 4).

        splice_pair()'s sockets stay in their maps, as a source does that
        is still the drain of the other direction: the verdict passes
        everything once the slot has no owner. Closing them, which is what
        a proxy does next, takes them out of every map, and the deletes
        cost a syscall and a psock teardown each, per direction.
        """
        if not rec.borrowed:
            if rec.drain_in_map:
                self._prog.delete(self._prog.drains_fd, rec.dst_cookie)
            if rec.eof and rec.fifo == 0 and rec.src_cookie not in self._eng._drains:
                # After FIN nothing more can arrive and nothing is queued:
                # the one moment a source leaves its map losslessly. Not
                # while it is the drain of the other direction: taking it
                # out of `sources` then drops its redirect backlog
                # (measured: tests/test_transfer.py::test_eof_one_way_while_other_way_busy).
                self._prog.delete(self._prog.sources_fd, rec.src_cookie)
                self._sources.discard(rec.src_cookie)
                _CLAIMED.pop(rec.src_cookie, None)
                return
        if rec.src_cookie not in self._sources:
            # Paused or unmapped when it ended: already a plain socket, its
            # unmoved bytes in its TCP queue.
            _CLAIMED.pop(rec.src_cookie, None)

    # -- what the engine asks of a backend ----------------------------------

    refresh = _read_stats
    alive_sources = _prune_sources
