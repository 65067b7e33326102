"""Fault injection: what a splice does when something goes wrong mid-transfer.

Each test breaks something while bytes are in flight (a peer resets or
closes, the application closes a spliced fd, a limit fires while both
directions run at full speed, the engine or the whole process goes away, a
reader crawls, the path has a smaller MTU) and then checks what the contract
keeps (docs/api.md, Semantics 6-10):

- every byte counted in `bytes` reaches the drain's peer, in order (sha256
  against the deterministic stream that was sent);
- every byte not moved is still readable on the source, so
  moved + left on the source == sent (where the contract keeps it);
- the splice ends with the documented reason;
- nothing stays behind: no fd, no thread (the autouse `no_leaks` fixture),
  no live row in the engine's `stats()`, and (bpf_only tests) no entry in
  the BPF maps and no BPF object after the owning process is gone;
- the engine still serves a NEW splice afterwards.

Real sockets on the real kernel, loopback or network namespaces the test
creates itself. Nothing is mocked. The machine is small and shared, so the
deadlines are generous and no assertion depends on tight timing.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import sosplice
from conftest import (STEP_TIMEOUT, Env, Sender, Stream, Worker, _check_nonblocking_fd, recv_until_eof,
                      sha, unsplice, wait_until)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PY = sys.executable
SO_COOKIE = 57
LINGER_RESET = struct.pack("ii", 1, 0)
PEER_GONE = (errno.EPIPE, errno.ECONNRESET)


# --------------------------------------------------------------------------
# Helpers


def cookie(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def live_rows(engine: sosplice.Splicer) -> list:
    return [r for r in engine.stats() if r.state in ("active", "dissolving")]


def assert_no_live_rows(engine: sosplice.Splicer, timeout: float = STEP_TIMEOUT) -> None:
    wait_until(lambda: not live_rows(engine), timeout,
               f"no live rows in stats() (still: {live_rows(engine)})", interval=0.05)


def name(err: int | None) -> str:
    return "None" if err is None else errno.errorcode.get(err, str(err))


def assert_serves(env: Env, engine: sosplice.Splicer, size: int = 3 * MiB + 7) -> None:
    """The engine still serves a brand-new splice: `size` bytes each way
    through a bidirectional splice on fresh connections, hash-checked."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    a = engine.splice(L1, R0)
    b = engine.splice(R0, L1)
    sa, sb = Stream(size), Stream(size + 1)
    wa = env.start(Writer(L0, sa, size, after="shutdown"))
    wb = env.start(Writer(R1, sb, size, after="shutdown"))
    ra = env.start(Reader(R1))
    rb = env.start(Reader(L0))
    assert a.wait(timeout=30) == 0 and b.wait(timeout=30) == 0
    R0.shutdown(socket.SHUT_WR)
    L1.shutdown(socket.SHUT_WR)
    for w in (wa, wb, ra, rb):
        w.check(30)
    assert ra.eof and rb.eof
    assert a.bytes == ra.count == size and b.bytes == rb.count == size
    assert ra.hash.hexdigest() == sa.sha256(0, size), "new splice corrupted its stream"
    assert rb.hash.hexdigest() == sb.sha256(0, size), "new splice corrupted its stream"
    for s in (L0, L1, R0, R1):
        s.close()
    assert_no_live_rows(engine)


def read_rest(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """What is left on a former source, up to EOF (its peer has shut down)."""
    return recv_until_eof(sock, timeout, limit=1 << 31)


def assert_left_is_tail(stream: Stream, moved: int, left: bytes, sent: int) -> None:
    assert moved + len(left) == sent, (
        f"moved {moved} + left on the source {len(left)} = {moved + len(left)} "
        f"!= sent {sent} (lost or duplicated {sent - moved - len(left)})")
    assert sha(left) == stream.sha256(moved, len(left)), \
        "the bytes left on the source are not the unmoved tail of the stream"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


# --------------------------------------------------------------------------
# Workers that inject the fault themselves, so that no thread ever touches an
# fd that another thread has closed.


class Writer(Sender):
    """A `Sender` that a peer's reset or EPIPE ends quietly (`failed`), and
    that after its last byte does `after`: "none", "shutdown" (SHUT_WR),
    "close" (a normal close) or "reset" (SO_LINGER 0 + close: the peer
    gets an RST)."""

    def __init__(self, sock: socket.socket, stream: Stream, total: int, *, after: str = "none",
                 gate_at: int | None = None, deadline: float = 120.0) -> None:
        super().__init__(sock, stream, total, shutdown=after == "shutdown", gate_at=gate_at,
                         deadline=deadline, hash_sent=False, reset_ok=True)
        self.after = after

    @property
    def failed(self) -> OSError | None:
        return self.reset

    def after_last_byte(self) -> None:
        super().after_last_byte()
        if self.after == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        if self.after in ("close", "reset"):
            self.sock.close()


class Reader(Worker):
    """Read from `sock` until EOF, hashing. Reads only while `go` is set
    (set at start unless `paused`). `rate`: bytes per second (None: full
    speed). With `stop_at`, read exactly that many bytes, then `after`
    ("close" or "reset") and return."""

    def __init__(self, sock: socket.socket, *, paused: bool = False, rate: float | None = None,
                 stop_at: int | None = None, after: str = "none",
                 deadline: float = 120.0) -> None:
        super().__init__("reader", deadline)
        _check_nonblocking_fd(sock)
        self.sock, self.fd = sock, sock.fileno()
        self.go = threading.Event()
        if not paused:
            self.go.set()
        self.rate, self.stop_at, self.after = rate, stop_at, after
        self.hash = hashlib.sha256()
        self.count = 0
        self.eof = False
        self.failed: OSError | None = None

    def work(self) -> None:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        t0, base = time.monotonic(), 0
        while True:
            if self._expired():
                return
            if not self.go.is_set():
                self.go.wait(0.05)
                t0, base = time.monotonic(), self.count
                continue
            if self.stop_at is not None and self.count >= self.stop_at:
                break
            size = len(buf)
            rate = self.rate
            if rate:
                size = 64 << 10
            if self.stop_at is not None:
                size = min(size, self.stop_at - self.count)
            try:
                k = os.readv(self.fd, [mv[:size]])
            except (BlockingIOError, InterruptedError):
                p.poll(50)
                continue
            except (ConnectionResetError, BrokenPipeError) as e:
                self.failed = e
                return
            if k == 0:
                self.eof = True
                return
            self.hash.update(mv[:k])
            self.count += k
            if rate:
                ahead = t0 + (self.count - base) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(min(ahead, 0.2))
        if self.after == "close":
            self.sock.close()
        elif self.after == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.sock.close()


def wait_stalled(w: Writer, at_least: int = 2 * MiB, quiet: float = 0.5,
                 timeout: float = 60) -> int:
    """Wait until the writer has sent `at_least` bytes and then made no
    progress for `quiet` seconds (every buffer on its path is full)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        assert time.monotonic() < deadline, f"writer never stalled ({w.sent} sent)"
        if not w.is_alive():
            assert w.error is None and w.failed is None, (w.error, w.failed)
            return w.sent
        now = w.sent
        if now != last:
            last, since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - since >= quiet:
            return now
        time.sleep(0.02)


def wait_moved(sp: sosplice.Splice, n: int, what: str = "", timeout: float = 30) -> None:
    wait_until(lambda: sp.bytes >= n, timeout, f"{n} bytes through the splice {what}".strip(),
               interval=0.01)


# --------------------------------------------------------------------------
# 1. A peer resets or closes while bytes are in flight


@pytest.mark.parametrize("reader", ["reading", "paused"])
@pytest.mark.parametrize("how", ["reset", "close", "shutdown"])
def test_source_peer_goes_away_mid_transfer(env, splicer, how, reader):
    """L0 (the source's peer) resets, closes or half-closes right after its
    last write, while bytes are queued everywhere between it and R1."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    total = 24 * MiB + 4321
    stream = Stream(11)
    sp = splicer.splice(L1, R0)
    rd = env.start(Reader(R1, paused=(reader == "paused")))
    wr = env.start(Writer(L0, stream, total, after=how))
    if reader == "paused":
        # Let the buffers fill, then let the reader go only after the fault.
        wait_stalled(wr)
        rd.go.set()
    wr.check(60)
    assert wr.done and wr.sent == total
    err = sp.wait(timeout=60)
    moved = sp.bytes
    if how == "reset":
        # The reset source ends like EOF, or with the error its recv() got;
        # what it still held goes with it.
        assert err in (0, errno.ECONNRESET), f"ended with {name(err)}"
        assert moved <= total
    else:
        assert err == 0, f"EOF on the source ended the splice with {name(err)}"
        assert moved == total
    # Every moved byte reaches the drain's peer, in order; then our EOF.
    R0.shutdown(socket.SHUT_WR)
    rd.check(60)
    assert rd.eof
    assert rd.count == moved, f"drain's peer got {rd.count}, the splice moved {moved}"
    assert rd.hash.hexdigest() == stream.sha256(0, moved), "moved bytes corrupted"
    if how == "reset":
        # Whatever the source still yields is the continuation, never a
        # byte that was also moved.
        try:
            rest = read_rest(L1)
        except ConnectionResetError:
            rest = b""
        assert moved + len(rest) <= total
        assert sha(rest) == stream.sha256(moved, len(rest))
    else:
        assert read_rest(L1) == b""
    assert splicer.getsplice(L1) == moved
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


@pytest.mark.parametrize("reader_state", ["reading", "stalled"])
@pytest.mark.parametrize("how", ["reset", "close"])
def test_drain_peer_goes_away_mid_transfer(env, splicer, how, reader_state):
    """R1 (the drain's peer) resets or closes while L0 pushes at full speed.
    "stalled": R1 stops reading for a while first, so the drain's queues are
    full when it goes."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(22)
    sp = splicer.splice(L1, R0)
    wr = env.start(Writer(L0, stream, 1 << 40))
    rd = env.start(Reader(R1, stop_at=6 * MiB + 17, after=how,
                          paused=(reader_state == "stalled")))
    if reader_state == "stalled":
        wait_stalled(wr)
        rd.go.set()
    rd.check(60)
    err = sp.wait(timeout=60)
    assert err in PEER_GONE, f"a dead drain ended the splice with {name(err)}"
    assert splicer.geterror(L1) == err
    assert splicer.geterror(L1) == 0
    wr.stop()
    wr.check(30)
    assert wr.failed is None, "the source's peer must not see a failure"
    L0.shutdown(socket.SHUT_WR)
    moved = sp.bytes
    assert moved >= rd.count == 6 * MiB + 17
    assert rd.hash.hexdigest() == stream.sha256(0, rd.count)
    # Counted but dropped by the dead drain is still counted: nothing lost.
    assert_left_is_tail(stream, moved, read_rest(L1), wr.sent)
    assert splicer.getsplice(L1) == moved
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


# --------------------------------------------------------------------------
# 2. The application closes a spliced fd


def _close_source_mid_transfer(env: Env, engine: sosplice.Splicer, reader: str, stream: Stream):
    """L0 pushes into the spliced L1 -> R0 until the app closes L1, with R1
    reading, or paused at the close (bytes queued for the drain and on the
    throttled source); R1 goes on reading half a second later."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = engine.splice(L1, R0)
    wr = env.start(Writer(L0, stream, 1 << 40))
    rd = env.start(Reader(R1, paused=(reader == "paused")))
    if reader == "paused":
        wait_stalled(wr)
    else:
        wait_until(lambda: rd.count >= 8 * MiB, 30, "8 MiB through the splice")
    L1.close()
    closed_at = time.monotonic()
    if reader == "paused":
        time.sleep(0.5)
        rd.go.set()
    return L0, R0, R1, sp, wr, rd, closed_at


@pytest.mark.parametrize("reader", ["reading", "paused"])
def test_app_closes_source_while_spliced(env, splicer, reader):
    """Closing the source ends the splice with 0; every counted byte still
    reaches the drain's peer in order."""
    stream = Stream(33)
    L0, R0, R1, sp, wr, rd, _ = _close_source_mid_transfer(env, splicer, reader, stream)
    err = sp.wait(timeout=30)
    assert err == 0, f"closing the source ended the splice with {name(err)}"
    moved = sp.bytes
    R0.shutdown(socket.SHUT_WR)
    rd.check(60)
    assert rd.eof and rd.count == moved, f"drain's peer got {rd.count}, splice moved {moved}"
    assert rd.hash.hexdigest() == stream.sha256(0, moved)
    wr.stop()
    wr.check(30)
    # Only now: the writer counts a write once it returns, and the splice
    # may have moved those bytes, ended, and woken us before that.
    assert moved <= wr.sent
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


@pytest.mark.parametrize("reader", ["reading", "paused"])
def test_source_peer_sees_app_close(env, splicer, backend, reader, request):
    """The peers see the close (docs/api.md, Semantics 10). A socket closed with bytes it
    never read resets its peer, so the source's peer, still pushing, gets
    ECONNRESET/EPIPE at once (as without a splice: ~0.5 s here)."""
    L0, R0, R1, sp, wr, rd, closed_at = _close_source_mid_transfer(env, splicer, reader,
                                                                  Stream(34))
    assert sp.wait(timeout=30) == 0
    wr.join(10)
    took = time.monotonic() - closed_at
    saw = wr.failed is not None
    wr.stop()
    wr.check(10)
    assert saw, (f"the source's peer still writing {took:.0f} s after the app closed the "
                 f"source (TCP state {sosplice._sock.tcp_state(L0)}, "
                 f"{wr.sent} bytes sent)")


@pytest.mark.parametrize("reader", ["reading", "paused"])
def test_app_closes_drain_while_spliced(env, splicer, reader):
    """Closing the drain ends the splice with EPIPE; every counted byte
    still reaches the drain's peer in order, followed by the close; every
    byte not moved stays on the source."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(44)
    sp = splicer.splice(L1, R0)
    wr = env.start(Writer(L0, stream, 1 << 40))
    rd = env.start(Reader(R1, paused=(reader == "paused")))
    if reader == "paused":
        wait_stalled(wr)
    else:
        wait_until(lambda: rd.count >= 8 * MiB, 30, "8 MiB through the splice")
    R0.close()
    if reader == "paused":
        time.sleep(0.5)  # the drain's peer reads only after the close
        rd.go.set()
    err = sp.wait(timeout=30)
    assert err == errno.EPIPE, f"closing the drain ended the splice with {name(err)}"
    moved = sp.bytes
    rd.check(60)
    assert rd.eof, f"the drain's peer did not see the close cleanly ({rd.failed!r})"
    assert rd.count == moved, f"drain's peer got {rd.count}, splice moved {moved}"
    assert rd.hash.hexdigest() == stream.sha256(0, moved)
    wr.stop()
    wr.check(30)
    assert wr.failed is None
    L0.shutdown(socket.SHUT_WR)
    assert_left_is_tail(stream, moved, read_rest(L1), wr.sent)
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


# --------------------------------------------------------------------------
# 3. unsplice / max / idle while both directions run at full speed


class Both:
    """L0-L1 and R0-R1, L1 -> R0 ("a") and R0 -> L1 ("b") spliced, a writer
    and a reader per direction."""

    def __init__(self, env: Env, engine: sosplice.Splicer, *, total_a: int, total_b: int,
                 kw_a: dict, kw_b: dict, gate_a: int | None = None) -> None:
        self.env, self.engine = env, engine
        self.L0, self.L1 = env.pair()
        self.R0, self.R1 = env.pair()
        self.sa, self.sb = Stream(101), Stream(202)
        self.a = engine.splice(self.L1, self.R0, **kw_a)
        self.b = engine.splice(self.R0, self.L1, **kw_b)
        self.wa = env.start(Writer(self.L0, self.sa, total_a, gate_at=gate_a))
        self.wb = env.start(Writer(self.R1, self.sb, total_b))
        self.ra = env.start(Reader(self.R1))
        self.rb = env.start(Reader(self.L0))

    def finish_b(self) -> None:
        """Direction b's writer stops and half-closes: b ends at EOF with
        0, every byte in order."""
        self.wb.stop()
        self.wb.check(30)
        assert self.wb.failed is None
        self.wb.total = self.wb.sent
        self.R1.shutdown(socket.SHUT_WR)
        assert self.b.wait(timeout=60) == 0
        assert self.b.bytes == self.wb.total
        self.L1.shutdown(socket.SHUT_WR)  # the drain of b: its peer gets EOF
        self.rb.check(60)
        assert self.rb.eof and self.rb.count == self.wb.total
        assert self.rb.hash.hexdigest() == self.sb.sha256(0, self.wb.total), \
            "direction b corrupted"

    def finish_a(self, moved: int) -> None:
        """Direction a ended early after `moved` bytes: R1 got exactly those,
        the rest is on L1."""
        self.wa.stop()
        self.wa.check(30)
        assert self.wa.failed is None
        self.L0.shutdown(socket.SHUT_WR)
        assert_left_is_tail(self.sa, moved, read_rest(self.L1), self.wa.sent)
        self.R0.shutdown(socket.SHUT_WR)
        self.ra.check(60)
        assert self.ra.eof and self.ra.count == moved, \
            f"R1 got {self.ra.count}, direction a moved {moved}"
        assert self.ra.hash.hexdigest() == self.sa.sha256(0, moved), "direction a corrupted"


def test_unsplice_while_both_directions_run(env, splicer):
    both = Both(env, splicer, total_a=1 << 40, total_b=1 << 40, kw_a={}, kw_b={})
    wait_until(lambda: both.ra.count >= 16 * MiB and both.rb.count >= 16 * MiB, 60,
               "16 MiB each way")
    moved = unsplice(both.a, timeout=30)
    assert not both.a.active and both.a.error == 0 and both.a.bytes == moved
    assert both.b.active, "unsplicing a ended b"
    both.finish_b()
    both.finish_a(moved)
    assert splicer.getsplice(both.L1) == moved
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


def test_max_fires_while_both_directions_run(env, splicer):
    limit = 24 * MiB + 12345
    both = Both(env, splicer, total_a=1 << 40, total_b=1 << 40, kw_a={"max": limit}, kw_b={})
    assert both.a.wait(timeout=60) == errno.EFBIG
    assert both.a.bytes == limit == splicer.getsplice(both.L1)
    assert both.b.active, "the limit on a ended b"
    before = both.rb.count
    wait_until(lambda: both.rb.count >= before + 4 * MiB, 30, "b still moving after a's limit")
    assert splicer.geterror(both.L1) == errno.EFBIG
    both.finish_b()
    both.finish_a(limit)
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


def test_idle_fires_while_other_direction_runs(env, splicer):
    """a goes quiet (its writer pauses at a gate) and times out while b
    runs at full speed with an idle timeout of its own that its traffic
    keeps re-arming. Bytes written to a after the timeout stay on L1."""
    gate = 20 * MiB + 99
    both = Both(env, splicer, total_a=48 * MiB, total_b=1 << 40,
                kw_a={"idle": 1.5}, kw_b={"idle": 5.0}, gate_a=gate)
    assert both.a.wait(timeout=60) == errno.ETIMEDOUT
    assert both.a.bytes == gate, "a timed out before its writer paused"
    assert both.b.active, f"b ended with {name(both.b.error)} while its bytes were moving"
    before = both.rb.count
    wait_until(lambda: both.rb.count >= before + 8 * MiB, 30, "b still moving after a's timeout")
    both.wa.gate.set()  # these bytes now stay on L1
    wait_until(lambda: both.wa.sent >= gate + MiB, 30, "a's writer going again")
    # b: its writer stops and half-closes; b dissolves at EOF, not on idle.
    both.finish_b()
    both.finish_a(gate)
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


# --------------------------------------------------------------------------
# 4. The engine is closed, or the process ends, with live splices


@pytest.mark.parametrize("traffic", ["quiet", "drain_stalled", "full_speed"])
def test_splicer_closed_with_live_splices(env, backend, traffic):
    """close() on a private Splicer with a live bidirectional splice ends
    both splices with 0; every moved byte reaches the drain's peers in
    order; every byte not moved is readable on the former sources, which
    are plain sockets again (moved + left == sent), and the connections
    keep working.

    quiet: the writers wait at a gate and everything sent has arrived.
    drain_stalled: the writers wait at a gate, a's drain's peer is not
    reading (a is throttled: bytes wait on its source); it reads again
    half a second into the close. full_speed: both ways at full speed."""
    eng = sosplice.Splicer()
    env.closers.append(eng.close)
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sa, sb = Stream(55), Stream(66)
    full = traffic == "full_speed"
    total = 1 << 40 if full else 40 * MiB
    a = eng.splice(L1, R0)
    b = eng.splice(R0, L1)
    wa = env.start(Writer(L0, sa, total, gate_at=None if full else 8 * MiB))
    wb = env.start(Writer(R1, sb, total, gate_at=None if full else 16 * MiB))
    ra = env.start(Reader(R1, paused=(traffic == "drain_stalled")))
    rb = env.start(Reader(L0))
    if traffic == "quiet":
        wait_until(lambda: ra.count == wa.sent == 8 * MiB and rb.count == wb.sent == 16 * MiB,
                   60, "everything up to the gates arrived")
    elif traffic == "drain_stalled":
        wait_until(lambda: wa.sent == 8 * MiB and rb.count == wb.sent == 16 * MiB, 60,
                   "both writers at their gates")
        time.sleep(0.3)
    else:
        wait_until(lambda: ra.count >= 16 * MiB and rb.count >= 16 * MiB, 60, "16 MiB each way")
    assert a.active and b.active
    closer = threading.Thread(target=eng.close, name="test-close", daemon=True)
    closer.start()
    time.sleep(0.5)
    ra.go.set()
    closer.join(30)
    assert not closer.is_alive(), "Splicer.close() did not return within 30 s"
    assert a.wait(timeout=1) == 0 and b.wait(timeout=1) == 0
    assert not live_rows(eng)
    with pytest.raises(RuntimeError):
        eng.splice(L1, R0)
    # The former sources are plain sockets again: read their tails while
    # the writers finish.
    ta = env.start(Reader(L1))
    tb = env.start(Reader(R0))
    if full:
        time.sleep(0.5)
        wa.stop()
        wb.stop()
    wa.gate.set()
    wb.gate.set()
    wa.check(10)
    wb.check(10)
    L0.shutdown(socket.SHUT_WR)
    R1.shutdown(socket.SHUT_WR)
    ta.check(10)
    tb.check(10)
    assert ta.eof and tb.eof
    R0.shutdown(socket.SHUT_WR)
    L1.shutdown(socket.SHUT_WR)
    ra.check(30)
    rb.check(30)
    assert ra.eof and rb.eof
    for sp, w, got, tail, stream, d in ((a, wa, ra, ta, sa, "a"), (b, wb, rb, tb, sb, "b")):
        moved = sp.bytes
        assert got.count == moved, f"{d}: the drain's peer got {got.count}, moved {moved}"
        assert got.hash.hexdigest() == stream.sha256(0, moved), f"{d}: moved bytes corrupted"
        assert moved + tail.count == w.sent, \
            f"{d}: moved {moved} + left {tail.count} != sent {w.sent}"
        assert tail.hash.hexdigest() == stream.sha256(moved, tail.count), f"{d}: tail corrupted"
    # The process's engines still work.
    fresh = sosplice.Splicer()
    env.closers.append(fresh.close)
    assert_serves(env, fresh)
    assert_serves(env, sosplice.default_engine())


CHILD = r"""
import atexit, json, os, socket, sys, time
port_l, port_r, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
final = {}
def report():
    # Registered before the default engine exists, so it runs after the
    # engine's own atexit close(): the splice's end is known by then.
    sp = final.get("sp")
    if sp is not None:
        print(json.dumps({"final": sp.bytes, "error": sp.error, "active": sp.active}), flush=True)
atexit.register(report)
import sosplice
src = socket.create_connection(("127.0.0.1", port_l))
dst = socket.create_connection(("127.0.0.1", port_r))
final["sp"] = sp = sosplice.splice(src, dst)
info = {"spliced": True}
eng = sosplice.default_engine()
prog = getattr(eng._backend, "_prog", None)
if prog is not None:
    def fdinfo(fd, key):
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    info["map_ids"] = [fdinfo(fd, "map_id") for fd in (prog.sources_fd, prog.drains_fd)]
    info["prog_id"] = fdinfo(prog._fn.fd, "prog_id")
print(json.dumps(info), flush=True)
while sp.bytes < 4 << 20:
    time.sleep(0.01)
print(json.dumps({"moving": sp.bytes}), flush=True)
sys.stdin.readline()   # the parent says when to go
if mode == "exit":
    sys.exit(0)
time.sleep(60)
"""


def _bpf_id_exists(cmd: int, obj_id: int) -> bool:
    """BPF_PROG_GET_FD_BY_ID (13) / BPF_MAP_GET_FD_BY_ID (14)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("I", obj_id), 64)
    fd = libc.syscall(321, cmd, attr, 64)  # __NR_bpf on x86_64
    if fd >= 0:
        os.close(fd)
        return True
    e = ctypes.get_errno()
    assert e == errno.ENOENT, f"bpf({cmd}, id {obj_id}): {os.strerror(e)}"
    return False


def _run_child(env: Env, mode: str, check_bpf: bool) -> None:
    """A child process splices one connection (source: the child's end of a
    connection from our L0; drain: its end of one to our R1) and exits
    normally or is SIGKILLed while bytes flow. We hold both peers."""
    if platform_machine() != "x86_64" and check_bpf:
        pytest.skip("the bpf syscall number below is x86_64's")
    stream = Stream(77)
    lst_l = env.track(socket.create_server(("127.0.0.1", 0)))
    lst_r = env.track(socket.create_server(("127.0.0.1", 0)))
    run_dir = tempfile.mkdtemp(prefix="h2_run_", dir="/tmp")
    envvars = dict(os.environ, SOSPLICE_RUN_DIR=run_dir)
    p = subprocess.Popen(
        [PY, "-c", CHILD, str(lst_l.getsockname()[1]), str(lst_r.getsockname()[1]), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        env=envvars, cwd=ROOT)
    try:
        lst_l.settimeout(30)
        lst_r.settimeout(30)
        L0 = env.track(lst_l.accept()[0])
        R1 = env.track(lst_r.accept()[0])
        L0.settimeout(STEP_TIMEOUT)
        R1.settimeout(STEP_TIMEOUT)
        wr = env.start(Writer(L0, stream, 1 << 40))
        rd = env.start(Reader(R1))
        info = _child_line(p)
        assert info.get("spliced"), info
        assert "moving" in _child_line(p)
        wait_until(lambda: rd.count >= 8 * MiB, 30, "8 MiB through the child's splice")
        if mode == "exit":
            p.stdin.write(b"go\n")
        else:
            p.send_signal(signal.SIGKILL)
        rc = p.wait(30)
        out = (_child_buf.pop(p.pid, b"") + p.stdout.read()).decode()
        err = p.stderr.read().decode()
        # The peers see the close: the drain's peer reads to EOF (or a
        # reset); the source's peer gets a FIN or a reset.
        rd.check(60)
        assert rd.eof or rd.failed is not None
        wr.stop()
        wr.check(10)
        assert _sees_close(L0, 20), "the source's peer never saw the close"
        # What arrived is the stream's start, in order.
        assert rd.hash.hexdigest() == stream.sha256(0, rd.count), "drain's peer got corrupt bytes"
        if mode == "exit":
            assert rc == 0, err
            final = json.loads(out.strip().splitlines()[-1])
            # atexit closed the engine: every live splice ended with 0 and
            # every moved byte reached the drain's peer before its close.
            assert final["error"] == 0 and final["active"] is False, final
            assert rd.eof, f"the drain's peer got {rd.failed!r} instead of a clean close"
            assert rd.count == final["final"], \
                f"drain's peer got {rd.count} bytes, the splice moved {final['final']}"
            assert final["final"] <= wr.sent
        else:
            assert rc == -signal.SIGKILL
            assert rd.count <= wr.sent
        if check_bpf:
            for mid in info["map_ids"]:
                wait_until(lambda: not _bpf_id_exists(14, mid), 20,
                           f"BPF map {mid} freed after the process ended", interval=0.1)
            wait_until(lambda: not _bpf_id_exists(13, info["prog_id"]), 20,
                       f"BPF program {info['prog_id']} freed", interval=0.1)
    finally:
        _child_buf.pop(p.pid, None)
        if p.poll() is None:
            p.kill()
            p.wait(10)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
        for fn in os.listdir(run_dir):
            os.unlink(os.path.join(run_dir, fn))
        os.rmdir(run_dir)


def platform_machine() -> str:
    return os.uname().machine


_child_buf: dict[int, bytes] = {}


def _child_line(p: subprocess.Popen, timeout: float = 60) -> dict:
    """The child's next stdout line, read from the raw pipe (no hidden
    buffering, so a second line that came with the first is not lost)."""
    deadline = time.monotonic() + timeout
    buf = _child_buf.pop(p.pid, b"")
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        r, _, _ = select.select([p.stdout], [], [], max(0, left))
        data = os.read(p.stdout.fileno(), 65536) if r else b""
        if not data:
            p.kill()
            raise AssertionError(f"child said nothing (rc {p.wait()}): "
                                 f"{p.stderr.read()[-2000:].decode(errors='replace')}")
        buf += data
    line, _, rest = buf.partition(b"\n")
    _child_buf[p.pid] = rest
    return json.loads(line)


def _sees_close(sock: socket.socket, timeout: float) -> bool:
    """`sock` reads EOF or a reset within `timeout` (discarding data)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        try:
            if not os.read(sock.fileno(), 1 << 20):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (BlockingIOError, InterruptedError):
            pass
    return False


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_process_ends_with_live_splice(env, mode):
    _run_child(env, mode, check_bpf=False)
    assert_serves(env, sosplice.default_engine())


@pytest.mark.bpf_only
@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_process_end_frees_bpf_objects(env, mode):
    _run_child(env, mode, check_bpf=True)


# --------------------------------------------------------------------------
# 5. A slow reader for a long time: memory stays bounded


@pytest.mark.parametrize("seconds", [10, pytest.param(180, marks=pytest.mark.soak)],
                         ids=["quick", "soak"])
def test_slow_reader_memory_bounded(env, splicer, seconds):
    rate = 8e6  # bytes/s the drain's peer reads
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(88)
    sp = splicer.splice(L1, R0)
    mem0 = mem_available()
    wr = env.start(Writer(L0, stream, 1 << 40, deadline=seconds + 120))
    rd = env.start(Reader(R1, rate=rate, deadline=seconds + 120))
    t0 = time.monotonic()
    samples = []
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        assert wr.error is None and rd.error is None and sp.active
        samples.append((time.monotonic() - t0, wr.sent, rd.count, mem0 - mem_available()))
    inflight = [s - r for _, s, r, _ in samples]
    worst = max(inflight)
    fell = max(m for *_, m in samples)
    elapsed = samples[-1][0]
    print(f"\n{seconds} s slow reader: read {rd.count / MiB:.0f} MiB "
          f"({rd.count / elapsed / 1e6:.1f} MB/s), in flight at most {worst / MiB:.1f} MiB, "
          f"MemAvailable fell by at most {fell / MiB:.0f} MiB")
    # The writer is held to the reader's pace by flow control: what is in
    # flight is bounded by the sockets' buffers plus the cap, and does not
    # grow over time.
    assert worst < 64 * MiB, f"{worst / MiB:.1f} MiB in flight"
    third = max(1, len(inflight) // 3)
    assert max(inflight[-third:]) <= max(inflight[:third]) + 8 * MiB, \
        f"in-flight bytes grew: {inflight}"
    assert rd.count >= rate * elapsed * 0.3, "the reader made too little progress"
    # MemAvailable is machine-wide and other test runs share the machine:
    # only a gross leak shows there; the in-flight bound above is the
    # precise check.
    limit = 512 * MiB if seconds <= 30 else 2048 * MiB
    assert fell < limit, f"MemAvailable fell by {fell / MiB:.0f} MiB"
    # End: the reader speeds up, the writer stops and half-closes.
    rd.rate = None
    wr.stop()
    wr.check(30)
    L0.shutdown(socket.SHUT_WR)
    assert sp.wait(timeout=60) == 0
    R0.shutdown(socket.SHUT_WR)
    rd.check(60)
    assert rd.eof and rd.count == sp.bytes == wr.sent
    assert rd.hash.hexdigest() == stream.sha256(0, wr.sent)
    assert_no_live_rows(splicer)
    assert_serves(env, splicer)


# --------------------------------------------------------------------------
# 6. Client, proxy and server in three network namespaces, MTU 1400


NS_END = r"""
import hashlib, json, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from conftest import Stream
role, addr, port, seed, total = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
if role == "server":
    ls = socket.create_server((addr, port))
    print(ls.getsockname()[1], flush=True)
    ls.settimeout(120)
    s, _ = ls.accept()
else:
    s = socket.create_connection((addr, port), timeout=30)
s.settimeout(120)
stream = Stream(seed)
out = {"sent": 0}
def send():
    pos = 0
    while pos < total:
        pos += s.send(stream.view(pos, total - pos))
    out["sent"] = pos
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
h, n = hashlib.sha256(), 0
while True:
    d = s.recv(1 << 20)
    if not d:
        break
    h.update(d)
    n += len(d)
t.join()
mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
print(json.dumps({"received": n, "hash": h.hexdigest(), "sent": out["sent"], "mss": mss}),
      flush=True)
"""


class Netns:
    """Three namespaces (client, proxy, server) joined by two veth pairs
    with MTU 1400; addresses 10.199.1.0/24 and 10.199.2.0/24 exist only
    inside them. Built with pyroute2; processes run in them through
    `ip netns exec`, which also gives each its own /sys."""

    MTU = 1400
    serial = 0

    def __init__(self) -> None:
        Netns.serial += 1
        pfx = f"sosplice-t-{os.getpid()}-{Netns.serial}"
        self.c, self.p, self.s = (f"{pfx}-{x}" for x in "cps")
        self.made: list[str] = []

    def up(self) -> None:
        from pyroute2 import NetNS, netns
        for ns in (self.c, self.p, self.s):
            netns.create(ns)
            self.made.append(ns)
        # Each end is created directly inside its namespace: the host's
        # own interfaces are never touched.
        with NetNS(self.c) as c:
            c.link("add", ifname="c0", kind="veth", peer={"ifname": "p0", "net_ns_fd": self.p})
        with NetNS(self.p) as p:
            p.link("add", ifname="p1", kind="veth", peer={"ifname": "s0", "net_ns_fd": self.s})
        for ns, dev, addr in ((self.c, "c0", "10.199.1.1"), (self.p, "p0", "10.199.1.2"),
                              (self.p, "p1", "10.199.2.1"), (self.s, "s0", "10.199.2.2")):
            with NetNS(ns) as n:
                (lo,) = n.link_lookup(ifname="lo")
                n.link("set", index=lo, state="up")
                (i,) = n.link_lookup(ifname=dev)
                n.link("set", index=i, mtu=self.MTU)
                n.addr("add", index=i, address=addr, prefixlen=24)
                n.link("set", index=i, state="up")

    def down(self) -> None:
        from pyroute2 import netns
        for ns in self.made:
            netns.remove(ns)
        self.made.clear()

    def popen(self, ns: str, args: list[str], env: dict) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root")
def test_proxy_across_namespaces_small_mtu():
    total = 64 * MiB
    seed_c, seed_s = 901, 902
    net = Netns()
    procs: list[subprocess.Popen] = []
    run_dir = tempfile.mkdtemp(prefix="h2_run_", dir="/tmp")
    envvars = dict(os.environ, SOSPLICE_RUN_DIR=run_dir)
    try:
        net.up()
        server = net.popen(net.s, [PY, "-c", NS_END, str(TESTS), "server", "10.199.2.2", "0",
                                   str(seed_s), str(total)], envvars)
        procs.append(server)
        r, _, _ = select.select([server.stdout], [], [], 30)
        sport = int(server.stdout.readline()) if r else None
        assert sport, f"server did not start: {server.stderr.read() if server.poll() else ''}"
        proxy = net.popen(net.p, [PY, "-m", "splicectl", "proxy", "--no-check",
                                  "10.199.1.2:0", f"10.199.2.2:{sport}"], envvars)
        procs.append(proxy)
        r, _, _ = select.select([proxy.stdout], [], [], 60)
        line = proxy.stdout.readline() if r else ""
        assert line.startswith("listening on "), \
            f"proxy did not start: {line!r} {proxy.stderr.read() if proxy.poll() else ''}"
        pport = int(line.split()[2].rstrip(",").rpartition(":")[2])
        client = net.popen(net.c, [PY, "-c", NS_END, str(TESTS), "client", "10.199.1.2",
                                   str(pport), str(seed_c), str(total)], envvars)
        procs.append(client)
        cout, cerr = client.communicate(timeout=150)
        sout, serr = server.communicate(timeout=30)
        assert client.returncode == 0, cerr
        assert server.returncode == 0, serr
        c, s = json.loads(cout), json.loads(sout)
        assert c["sent"] == s["sent"] == total, (c, s)
        assert s["received"] == total and s["hash"] == Stream(seed_c).sha256(0, total), \
            f"client -> server through the proxy: {s['received']} of {total} bytes or corrupted"
        assert c["received"] == total and c["hash"] == Stream(seed_s).sha256(0, total), \
            f"server -> client through the proxy: {c['received']} of {total} bytes or corrupted"
        # The path really had the small MTU (MSS = MTU - 40 at most).
        assert c["mss"] <= net.MTU - 40 and s["mss"] <= net.MTU - 40, (c["mss"], s["mss"])
        proxy.send_signal(signal.SIGTERM)
        pout, perr = proxy.communicate(timeout=30)
        assert proxy.returncode == 0, perr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception:
                pass
        net.down()
        for fn in os.listdir(run_dir):
            os.unlink(os.path.join(run_dir, fn))
        os.rmdir(run_dir)
    from pyroute2 import netns
    listed = netns.listnetns()
    assert net.c not in listed and net.p not in listed and net.s not in listed


# --------------------------------------------------------------------------
# 7. BPF maps are empty after every fault once the sockets are closed


def _bpf_maps(engine: sosplice.Splicer) -> dict[str, int]:
    prog = engine._backend._prog
    return {"sources": len(prog.keys(prog.sources_fd)),
            "drains": len(prog.keys(prog.drains_fd)),
            # ctl and stats are arrays: count the slots still owned, and
            # the sources that still map to a slot.
            "ctl": sum(1 for c in prog.ctl if c.source),
            "slots": len(prog.keys(prog.slots_fd))}


@pytest.mark.bpf_only
def test_bpf_maps_empty_after_faults(env, splicer):
    """One engine through one of each fault; after each, with the sockets
    closed, every map of the engine is empty and the cookies are gone."""
    empty = {"sources": 0, "drains": 0, "ctl": 0, "slots": 0}
    for fault in ("source_reset", "drain_reset", "close_source", "close_drain", "unsplice",
                  "max", "idle"):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        cookies = {cookie(s) for s in (L1, R0)}
        stream = Stream(5)
        a = splicer.splice(L1, R0, max=(4 * MiB + 3 if fault == "max" else 0),
                           idle=(0.5 if fault == "idle" else None))
        b = splicer.splice(R0, L1)
        gate = 6 * MiB if fault == "idle" else None
        wa = env.start(Writer(L0, stream, 1 << 40, gate_at=gate))
        wb = env.start(Writer(R1, stream, 1 << 40))
        ra = env.start(Reader(R1))
        rb = env.start(Reader(L0))
        wait_until(lambda: ra.count >= 2 * MiB and rb.count >= 2 * MiB, 30, f"{fault}: flowing")
        if fault == "source_reset":
            wa.stop()
            wa.check(10)
            L0.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            rb.stop()
            rb.check(10)
            L0.close()
        elif fault == "drain_reset":
            ra.stop()
            wb.stop()
            ra.check(10)
            wb.check(10)
            R1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            R1.close()
        elif fault == "close_source":
            L1.close()
        elif fault == "close_drain":
            R0.close()
        elif fault == "unsplice":
            unsplice(a, timeout=30)
        a.wait(timeout=60)
        for w in (wa, wb, ra, rb):
            w.stop()
        for w in (wa, wb, ra, rb):
            w.join(30)
            assert not w.is_alive()
        for s in (L0, L1, R0, R1):
            s.close()
        a.wait(timeout=30)
        b.wait(timeout=30)
        assert_no_live_rows(splicer)
        wait_until(lambda: _bpf_maps(splicer) == empty, 10,
                   f"{fault}: maps empty (now {_bpf_maps(splicer)})", interval=0.05)
        prog = splicer._backend._prog
        assert not cookies & (prog.keys(prog.sources_fd) | prog.keys(prog.drains_fd))
    assert_serves(env, splicer)
    assert _bpf_maps(splicer) == empty
