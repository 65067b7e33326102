"""Byte limits, idle timeouts and bounded memory (docs/api.md, Semantics 4, 5, 11).

Real loopback TCP on the real kernel, nothing mocked. The setup is
FreeBSD's: two connections L0-L1 and R0-R1, L1 spliced into R0, so bytes
written on L0 come out of R1.

Self-contained: every helper lives in this file. Every blocking call has a
deadline, every thread is joined and every socket closed before a test
returns (the `lab` fixture owns them), so a bug fails a test instead of
hanging the run or leaking into the next test.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import socket
import threading
import time
from typing import Iterator

import pytest

import sosplice
from conftest import assert_nothing_arrives, fionread, readable, recv_exactly, tcp_pair

STEP = 10.0  # deadline of any single blocking step unless a test says otherwise


# --------------------------------------------------------------------------
# Helpers


def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Stream:
    """Deterministic bytes in which lost, duplicated or reordered chunks
    change the hash: chunk i is a window of a random block at an offset
    that differs for every chunk."""

    CHUNK = 64 << 10
    BASE = 4 << 20
    STEP = 7919

    def __init__(self, seed: int) -> None:
        self.base = memoryview(random.Random(seed).randbytes(self.BASE + self.CHUNK))

    def view(self, pos: int, n: int) -> memoryview:
        i, j = divmod(pos, self.CHUNK)
        off = (i * self.STEP) % self.BASE + j
        return self.base[off:off + min(n, self.CHUNK - j)]

    def sha256(self, n: int) -> str:
        h, pos = hashlib.sha256(), 0
        while pos < n:
            v = self.view(pos, n - pos)
            h.update(v)
            pos += len(v)
        return h.hexdigest()


class Worker(threading.Thread):
    """A thread with a stop event and a deadline; records its exception."""

    def __init__(self, name: str, deadline: float = 60.0) -> None:
        super().__init__(name=f"test-limits-{name}", daemon=True)
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + deadline
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:
            self.error = e

    def work(self) -> None:
        raise NotImplementedError

    def stopping(self) -> bool:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"{self.name}: deadline passed")
        return self.stop_event.is_set()

    def check(self, timeout: float = STEP) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still running after {timeout} s"
        if self.error is not None:
            raise AssertionError(f"{self.name} failed: {self.error!r}") from self.error


def write_some(fd: int, poller: select.poll, data: memoryview) -> int:
    """One non-blocking write; 0 after waiting up to 50 ms for room."""
    try:
        return os.write(fd, data)
    except (BlockingIOError, InterruptedError):
        poller.poll(50)
        return 0


def read_some(fd: int, poller: select.poll, buf: memoryview) -> int | None:
    """One non-blocking read into `buf`; None after waiting up to 50 ms."""
    try:
        return os.readv(fd, [buf])
    except (BlockingIOError, InterruptedError):
        poller.poll(50)
        return None


class Lab:
    """Owns a test's engine, sockets and threads. Teardown: stop and join
    threads, close sockets, then close the engine."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.workers: list[Worker] = []
        self.engines: list[sosplice.Splicer] = []

    def engine(self, **kw) -> sosplice.Splicer:
        e = sosplice.Splicer(**kw)
        self.engines.append(e)
        return e

    def pairs(self) -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
        """L0, L1, R0, R1."""
        L0, L1 = tcp_pair()
        self.socks += [L0, L1]
        R0, R1 = tcp_pair()
        self.socks += [R0, R1]
        return L0, L1, R0, R1

    def start(self, w: Worker) -> Worker:
        self.workers.append(w)
        w.start()
        return w

    def teardown(self) -> None:
        for w in self.workers:
            w.stop_event.set()
        for w in self.workers:
            w.join(10)
        for s in self.socks:
            s.close()
        for e in reversed(self.engines):
            e.close()
        alive = [w.name for w in self.workers if w.is_alive()]
        assert not alive, f"threads would not stop: {alive}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    lb = Lab()
    try:
        yield lb
    finally:
        lb.teardown()


# --------------------------------------------------------------------------
# 1. FreeBSD limit_bytes


def test_limit_bytes(lab):
    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    sp = e.splice(L1, R0, max=129)

    block = bytes(range(128))
    L0.sendall(block)
    assert recv_exactly(R1, 128) == block
    assert e.getsplice(L1) == 128
    assert sp.bytes == 128
    assert sp.active and sp.error is None, "dissolved before the limit was reached"
    assert e.geterror(L1) == 0, "an active splice reports no error"

    L0.sendall(b"\x80")
    assert recv_exactly(R1, 1) == b"\x80"
    assert sp.wait(timeout=5) == errno.EFBIG
    assert not sp.active and sp.error == errno.EFBIG
    assert sp.bytes == 129 == e.getsplice(L1)

    # One more byte stays on L1, readable with a plain recv().
    L0.sendall(b"Z")
    L1.settimeout(5)
    assert L1.recv(16) == b"Z"
    assert_nothing_arrives(R1, 0.2)
    for s in (L0, L1, R0, R1):
        assert fionread(s) == 0, s
    assert e.getsplice(L1) == 129, "the count must survive the dissolve"

    assert e.geterror(L1) == errno.EFBIG
    assert e.geterror(L1) == 0, "geterror reports the reason only once"


# --------------------------------------------------------------------------
# 2. FreeBSD limit_timeout


def test_limit_timeout(lab):
    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    sp = e.splice(L1, R0, idle=0.5)

    block = os.urandom(128)
    L0.sendall(block)
    assert recv_exactly(R1, 128) == block
    last = time.monotonic()  # the kernel moved the bytes slightly before this
    assert sp.bytes == 128

    sleep_until(last + 0.4)
    assert sp.active, f"idle timeout fired after only {time.monotonic() - last:.3f} s"

    sleep_until(last + 0.55)
    # FreeBSD: after 0.55 s of quiet a new byte stays on L1.
    L0.sendall(b"!")
    assert sp.wait(timeout=2) == errno.ETIMEDOUT
    took = time.monotonic() - last
    assert sp.bytes == 128 == e.getsplice(L1), "the byte sent after the timeout was moved"
    L1.settimeout(5)
    assert L1.recv(16) == b"!"
    assert_nothing_arrives(R1, 0.2)
    assert fionread(L1) == 0 and fionread(R1) == 0
    assert e.geterror(L1) == errno.ETIMEDOUT
    assert e.geterror(L1) == 0
    assert took < 1.5, f"idle dissolve reported {took:.3f} s after the last byte"


# --------------------------------------------------------------------------
# 3. idle re-armed by a trickle


def test_idle_rearmed_by_trickle(lab):
    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    sp = e.splice(L1, R0, idle=0.5)

    start = time.monotonic()
    sent = bytearray()
    i = 0
    while time.monotonic() - start < 2.0:
        b = bytes([i & 0xFF])
        L0.sendall(b)
        sent += b
        assert recv_exactly(R1, 1, timeout=2) == b, f"byte {i} did not arrive"
        assert sp.active, f"idle timeout fired during the trickle, after byte {i}"
        i += 1
        sleep_until(start + 0.2 * i)
    assert i >= 9
    assert sp.active, "idle timeout fired although a byte moved every 0.2 s"
    assert sp.bytes == i

    last = time.monotonic()
    assert sp.wait(timeout=3) == errno.ETIMEDOUT
    quiet = time.monotonic() - last
    assert quiet >= 0.3, f"dissolved after only {quiet:.3f} s of silence"
    assert sp.bytes == i == e.getsplice(L1)
    assert_nothing_arrives(R1, 0.1)
    assert fionread(L1) == 0


# --------------------------------------------------------------------------
# 4. keep-alive HTTP-like bodies: one splice per body of known length


HDR_LEN = 16


def header(n: int) -> bytes:
    h = b"HDR:%010d\r\n" % n
    assert len(h) == HDR_LEN
    return h


def body_sizes(rng: random.Random, count: int = 30) -> list[int]:
    sizes = [1, 3 << 20, 2]
    kinds = [(1, 64), (65, 16 << 10), (16 << 10, 512 << 10), (512 << 10, 3 << 20)]
    while len(sizes) < count:
        lo, hi = kinds[rng.randrange(len(kinds))]
        sizes.append(rng.randint(lo, hi))
    rng.shuffle(sizes)
    return sizes


class ChunkSender(Worker):
    """Write `data` on `sock` in random chunk sizes, never waiting between
    records."""

    def __init__(self, sock: socket.socket, data: bytes, rng: random.Random) -> None:
        super().__init__("chunk-sender", deadline=90)
        self.fd, self.data, self.rng = sock.fileno(), memoryview(data), rng
        self.poller = select.poll()
        self.poller.register(sock, select.POLLOUT)
        self.sent = 0

    def work(self) -> None:
        while self.sent < len(self.data):
            if self.stopping():
                return
            r = self.rng.random()
            n = self.rng.randint(1, 16) if r < 0.2 else self.rng.randint(17, 300 << 10)
            end = min(len(self.data), self.sent + n)
            while self.sent < end:
                if self.stopping():
                    return
                self.sent += write_some(self.fd, self.poller, self.data[self.sent:end])


class Collector(Worker):
    """Read from `sock` until `expect` bytes have arrived; keep them."""

    def __init__(self, sock: socket.socket, expect: int) -> None:
        super().__init__("collector", deadline=90)
        self.fd, self.expect = sock.fileno(), expect
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.data = bytearray()

    def work(self) -> None:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        while len(self.data) < self.expect:
            if self.stopping():
                return
            k = read_some(self.fd, self.poller, mv[:min(len(buf), self.expect - len(self.data))])
            if k is None:
                continue
            if k == 0:
                raise AssertionError(f"EOF after {len(self.data)} of {self.expect} bytes")
            self.data += mv[:k]


def test_keepalive_bodies_one_splice_each(lab):
    rng = random.Random(20240601)
    sizes = body_sizes(rng)
    bodies = [rng.randbytes(n) for n in sizes]
    wire = b"".join(header(len(b)) + b for b in bodies)
    total_bodies = sum(sizes)

    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    rx = lab.start(Collector(R1, total_bodies))
    tx = lab.start(ChunkSender(L0, wire, random.Random(7)))

    for i, body in enumerate(bodies):
        hdr = recv_exactly(L1, HDR_LEN, timeout=20)
        assert hdr == header(len(body)), \
            f"record {i}: the proxy read {hdr!r} where header {header(len(body))!r} belongs " \
            f"(a splice moved too few or too many bytes of the previous body)"
        sp = e.splice(L1, R0, max=len(body))
        err = sp.wait(timeout=20)
        assert err == errno.EFBIG, f"record {i} ({len(body)} B): ended with {err}"
        assert sp.bytes == len(body) == e.getsplice(L1), (i, sp.bytes, len(body))
        assert e.geterror(L1) == errno.EFBIG

    tx.check(timeout=20)
    assert tx.sent == len(wire)
    rx.check(timeout=30)
    assert_nothing_arrives(L1, 0.1)
    assert_nothing_arrives(R1, 0.2)
    assert fionread(L1) == 0 and fionread(R1) == 0
    got = bytes(rx.data)
    assert len(got) == total_bodies
    # Exactly the bodies' length arrived and every body hashes right: no
    # header (16 bytes each) reached the receiver.
    pos = 0
    for i, body in enumerate(bodies):
        part = got[pos:pos + len(body)]
        assert sha(part) == sha(body), f"body {i} ({len(body)} B at {pos}) corrupted"
        pos += len(body)


@pytest.mark.parametrize("spliced_before", [False, True], ids=["fresh_source", "resplice"])
def test_bytes_read_by_app_before_splice_are_not_moved(lab, spliced_before):
    """The first step of the keep-alive pattern in isolation: the proxy
    reads a header that shares an skb with the body, then splices. The
    bytes it read must not also be moved (docs/api.md, Semantics 2, 3: a byte the app
    takes is never also moved); the rest of the skb must be."""
    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    if spliced_before:
        first = e.splice(L1, R0, max=1)
        L0.sendall(b"x")
        assert recv_exactly(R1, 1) == b"x"
        assert first.wait(timeout=5) == errno.EFBIG
    data = bytes(range(100))
    L0.sendall(data)  # one skb
    deadline = time.monotonic() + 5
    while fionread(L1) < len(data) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert L1.recv(10) == data[:10]
    sp = e.splice(L1, R0, max=90)
    got = recv_exactly(R1, 90)
    assert sp.wait(timeout=5) == errno.EFBIG
    extra = R1.recv(1000, socket.MSG_DONTWAIT) if readable(R1, 0.2) else b""
    assert got + extra == data[10:], \
        f"the drain received {len(got + extra)} bytes starting {(got + extra)[:12]!r}; " \
        f"expected the 90 bytes after the 10 the application read"
    assert sp.bytes == 90


# --------------------------------------------------------------------------
# 5. bounded memory with a stopped reader


class StreamSender(Worker):
    """Send `stream` on `sock` until stopped or `limit` bytes; then SHUT_WR.
    `sent` is exact; `hash` covers exactly the bytes sent."""

    def __init__(self, sock: socket.socket, stream: Stream, limit: int, *,
                 deadline: float = 90) -> None:
        super().__init__("stream-sender", deadline)
        self.sock, self.fd, self.stream = sock, sock.fileno(), stream
        self.limit = limit
        self.poller = select.poll()
        self.poller.register(sock, select.POLLOUT)
        self.hash = hashlib.sha256()
        self.sent = 0
        self.done = False

    def work(self) -> None:
        while self.sent < self.limit and not self.stopping():
            v = self.stream.view(self.sent, self.limit - self.sent)
            k = write_some(self.fd, self.poller, v)
            self.hash.update(v[:k])
            self.sent += k
        self.sock.shutdown(socket.SHUT_WR)
        self.done = True


class StreamReader(Worker):
    """Read from `sock`, hashing; stop once `target` (set later) is reached.
    Held at a gate until `go` is set. With `pause_rng`, reads random sizes
    and sometimes sleeps (a drain reader that pauses in short bursts)."""

    def __init__(self, sock: socket.socket, *, target: int | None = None,
                 pause_rng: random.Random | None = None, deadline: float = 90) -> None:
        super().__init__("stream-reader", deadline)
        self.fd = sock.fileno()
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.target = target
        self.go = threading.Event()
        self.rng = pause_rng
        self.hash = hashlib.sha256()
        self.count = 0
        self.pauses = 0

    def work(self) -> None:
        while not self.go.wait(0.05):
            if self.stopping():
                return
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        while self.target is None or self.count < self.target:
            if self.stopping():
                return
            size = len(buf)
            if self.target is not None:
                size = min(size, self.target - self.count)
            if self.rng is not None:
                size = min(size, self.rng.randint(1, 1 << 20))
            k = read_some(self.fd, self.poller, mv[:size])
            if k is None:
                continue
            if k == 0:
                raise AssertionError(f"EOF on the drain's peer after {self.count} bytes")
            self.hash.update(mv[:k])
            self.count += k
            if self.rng is not None and self.rng.random() < 0.1:
                self.pauses += 1
                time.sleep(self.rng.uniform(0.002, 0.05))


def test_bounded_memory_with_stopped_reader(lab):
    cap = 4 << 20
    e = lab.engine(backlog_cap=cap)
    L0, L1, R0, R1 = lab.pairs()
    sp = e.splice(L1, R0)
    stream = Stream(5)

    mem0 = mem_available()
    tx = lab.start(StreamSender(L0, stream, 2 << 30))
    rx = lab.start(StreamReader(R1))  # gated: the reader is stopped
    time.sleep(3.0)
    held = tx.sent
    mem1 = mem_available()
    assert tx.is_alive() and tx.error is None, tx.error
    assert sp.active

    bufs = (L0.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            + L1.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            + R0.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            + R1.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    fell = mem0 - mem1
    detail = (f"sender got {held / 2**20:.1f} MiB in while the reader was stopped; "
              f"the four sockets' buffers are {bufs / 2**20:.1f} MiB, cap {cap >> 20} MiB; "
              f"MemAvailable fell by {fell / 2**20:.1f} MiB")
    print(detail)
    assert held < 64 << 20, "the sender was not held back: " + detail
    assert held <= bufs + cap + (1 << 20), "more held than buffers + cap: " + detail
    assert fell < 256 << 20, "kernel memory grew: " + detail

    # Still held: nothing more gets in during another half second.
    time.sleep(0.5)
    assert tx.sent - held < 2 << 20, f"sender kept going: {held} -> {tx.sent}"

    # Let the reader run; the stream resumes; then end it.
    rx.go.set()
    tx.limit = held + (96 << 20)
    deadline = time.monotonic() + 20
    while tx.sent < held + (16 << 20) and time.monotonic() < deadline and tx.is_alive():
        time.sleep(0.01)
    assert tx.sent >= held + (16 << 20), f"flow did not resume: {tx.sent} after {held}"
    tx.stop_event.set()
    tx.check(timeout=10)
    assert tx.done
    rx.target = tx.sent
    assert sp.wait(timeout=30) == 0, "EOF on the source must dissolve the splice with 0"
    rx.check(timeout=30)
    assert rx.count == tx.sent, (rx.count, tx.sent)
    assert rx.hash.hexdigest() == tx.hash.hexdigest() == stream.sha256(tx.sent), \
        "bytes lost, duplicated or reordered"
    assert sp.bytes == tx.sent
    assert_nothing_arrives(R1, 0.1)  # the drain is not shut down
    assert fionread(L1) == 0


# --------------------------------------------------------------------------
# 6. transitions between the kernel path and the copy path under load


def test_transitions_under_load(lab):
    total = 64 << 20
    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    sp = e.splice(L1, R0)
    stream = Stream(6)

    rx = lab.start(StreamReader(R1, target=total, pause_rng=random.Random(66)))
    rx.go.set()
    tx = lab.start(StreamSender(L0, stream, total))
    throttled = 0
    samples = 0
    while tx.is_alive() or rx.is_alive():
        rows = [r for r in e.stats() if r.state == "active"]
        samples += 1
        throttled += any(r.throttled for r in rows)
        time.sleep(0.002)
        if time.monotonic() > tx.deadline:
            break
    tx.check(timeout=30)
    assert sp.wait(timeout=30) == 0
    rx.check(timeout=30)
    assert rx.count == tx.sent == total
    assert rx.hash.hexdigest() == tx.hash.hexdigest() == stream.sha256(total), \
        f"stream corrupted ({rx.pauses} reader pauses, throttled in {throttled}/{samples} samples)"
    assert sp.bytes == total
    assert_nothing_arrives(R1, 0.1)
    print(f"{rx.pauses} pauses, throttled in {throttled}/{samples} samples")
    assert rx.pauses >= 5
    # The test is about transitions: the copy path must have been used.
    assert throttled > 0, f"never saw the splice throttled in {samples} samples"


# --------------------------------------------------------------------------
# 7. the limit falls in the middle of an skb


@pytest.mark.parametrize("how", ["one_send", "waiting_before_splice", "trickle"])
def test_limit_in_the_middle_of_an_skb(lab, how):
    e = lab.engine()
    L0, L1, R0, R1 = lab.pairs()
    L0.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = random.Random(77).randbytes(10 << 10)
    limit = 1000

    if how == "waiting_before_splice":
        L0.sendall(data)
        deadline = time.monotonic() + 5
        while fionread(L1) < len(data) and time.monotonic() < deadline:
            time.sleep(0.005)
        sp = e.splice(L1, R0, max=limit)
    elif how == "one_send":
        sp = e.splice(L1, R0, max=limit)
        L0.sendall(data)
    else:
        # Slow pieces of 333 bytes: the limit falls inside the fourth.
        sp = e.splice(L1, R0, max=limit)
        for i in range(0, 4 * 333, 333):
            L0.sendall(data[i:i + 333])
            time.sleep(0.05)
        L0.sendall(data[4 * 333:])

    assert recv_exactly(R1, limit) == data[:limit]
    assert sp.wait(timeout=5) == errno.EFBIG
    assert sp.bytes == limit == e.getsplice(L1)
    assert_nothing_arrives(R1, 0.2)
    assert recv_exactly(L1, len(data) - limit) == data[limit:], \
        "the bytes past the limit are not on the source in order"
    assert fionread(L1) == 0 and fionread(R1) == 0
    assert e.geterror(L1) == errno.EFBIG
