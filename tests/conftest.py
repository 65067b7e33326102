"""Shared fixtures and helpers for the sosplice tests.

Everything here uses real loopback TCP sockets and the real kernel; nothing
is mocked. Every blocking step has a deadline so that a broken
implementation fails a test instead of hanging the run, and every thread a
test starts is stopped and joined before the test ends (the autouse
`no_leaks` fixture checks that, and that no fd is left behind).

The helpers are plain functions and classes so test modules can import
them (`from conftest import tcp_pair, recv_exactly, ...`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import select
import socket
import struct
import sys
import termios
import threading
import time
from typing import Callable, Iterator

import pytest

from sosplice import _sock

# Deadline for any single blocking step of a test unless it says otherwise.
STEP_TIMEOUT = 10.0
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


# Every contract test runs once per backend (the `backend` fixture below).
BACKENDS = ("bpf", "worker")
# Modules about one backend's machinery or about the tool: run once, on
# the backend $SOSPLICE_BACKEND (or "auto") picks.
SINGLE_BACKEND_MODULES = {"test_internals", "test_splicectl", "test_wheel", "test_workers"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend", choices=(*BACKENDS, "all"), default="all",
        help="run the contract tests against this backend only (default: all)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__ in SINGLE_BACKEND_MODULES:
        return
    chosen = metafunc.config.getoption("--backend")
    backends = BACKENDS if chosen == "all" else (chosen,)
    if metafunc.definition.get_closest_marker("bpf_only"):
        backends = tuple(b for b in backends if b == "bpf")
    if not backends:
        metafunc.parametrize("backend", [pytest.param(
            "bpf", marks=pytest.mark.skip(reason="bpf_only; --backend excludes bpf"))], indirect=True)
        return
    metafunc.parametrize("backend", backends, indirect=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: long-running test (1 GiB transfers); deselect with -m 'not slow'")
    config.addinivalue_line(
        "markers", "bpf_only: tests a fact of the BPF backend itself (maps, verdict, kernel "
        "quirks); not run against the worker backend")
    config.addinivalue_line(
        "markers", "soak: the long soak (make soak); deselected by default")


# --------------------------------------------------------------------------
# Sockets


def tcp_pair(family: int = socket.AF_INET, timeout: float | None = STEP_TIMEOUT
             ) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) TCP pair on loopback, port 0.

    The listener is closed after accept. Both sockets get `timeout` (None:
    blocking without a timeout; tests should keep a timeout).
    """
    host = LOOPBACK[family]
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        lst.bind((host, 0))
        lst.listen(1)
        client = socket.socket(family, socket.SOCK_STREAM)
        try:
            client.settimeout(STEP_TIMEOUT)
            client.connect(lst.getsockname()[:2])
            lst.settimeout(STEP_TIMEOUT)
            server, _ = lst.accept()
        except BaseException:
            client.close()
            raise
    client.settimeout(timeout)
    server.settimeout(timeout)
    return client, server


def fionread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def outq(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def tcp_written(sock: socket.socket) -> int:
    """Bytes ever written into a TCP socket: tcpi_bytes_acked + SIOCOUTQ.

    (docs/kernel-notes.md K4: what a drain has taken from the splice.)
    """
    # Two readings: an ACK between them moves bytes from SIOCOUTQ to acked.
    # `acked` only grows, so equal readings around SIOCOUTQ make an exact sum.
    while True:
        before = _sock.bytes_acked(sock)
        queued = outq(sock)
        if _sock.bytes_acked(sock) == before:
            return before + queued


def readable(sock: socket.socket | int, wait: float = 0.0) -> bool:
    """poll() says `sock` is readable (or has an error/hangup) within `wait`."""
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLPRI)
    return bool(p.poll(int(wait * 1000)))


def select_readable(sock: socket.socket | int, wait: float = 0.0) -> bool:
    r, _, _ = select.select([sock], [], [], wait)
    return bool(r)


def _wait_in(sock: socket.socket, deadline: float) -> None:
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLPRI)
    p.poll(max(0, int(min(deadline - time.monotonic(), 0.2) * 1000)))


# A note on I/O in these helpers: Python's socket methods on a socket with a
# timeout first poll for up to that timeout, even with MSG_DONTWAIT, and
# raise TimeoutError rather than BlockingIOError. The helpers therefore poll
# themselves and then use os.read/os.readv/os.write on the fd, which (for a
# socket with a timeout, whose fd is O_NONBLOCK) never wait.


def _check_nonblocking_fd(sock: socket.socket) -> None:
    assert sock.gettimeout() is not None, \
        "helpers need a socket with a timeout or non-blocking, not a blocking one"


def recv_exactly(sock: socket.socket, n: int, timeout: float = STEP_TIMEOUT) -> bytes:
    """Read exactly `n` bytes; AssertionError on EOF or when `timeout` passes.

    Works whatever the socket's own timeout, and with fds above FD_SETSIZE.
    """
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s with {len(buf)} of {n} bytes")
        _wait_in(sock, deadline)
        if not readable(sock):
            continue
        try:
            data = os.read(sock.fileno(), min(n - len(buf), 1 << 20))
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def recv_until_eof(sock: socket.socket, timeout: float = STEP_TIMEOUT,
                   limit: int = 1 << 30) -> bytes:
    """Read until EOF; AssertionError after `timeout` or beyond `limit` bytes."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no EOF within {timeout} s ({len(buf)} bytes read)")
        _wait_in(sock, deadline)
        if not readable(sock):
            continue
        try:
            data = os.read(sock.fileno(), 1 << 20)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            return bytes(buf)
        buf += data
        if len(buf) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")


def assert_nothing_arrives(sock: socket.socket, wait: float = 0.2) -> None:
    """No byte (and no EOF) becomes readable on `sock` within `wait`."""
    if readable(sock, wait):
        try:
            data = sock.recv(64, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except OSError as e:
            raise AssertionError(f"socket became readable with an error: {e!r}") from None
        raise AssertionError(f"unexpected readable data: {data!r}")


def wait_until(pred: Callable[[], bool], timeout: float = STEP_TIMEOUT,
               what: str = "condition", interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def expect_errno(code: int, fn: Callable, *args, **kwargs) -> OSError:
    """`fn(*args, **kwargs)` raises OSError with errno `code` and a message."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    e = info.value
    assert e.errno == code, (
        f"expected {errno.errorcode.get(code, code)}, got "
        f"{errno.errorcode.get(e.errno, e.errno)}: {e}")
    assert str(e).strip(), "the error has no message"
    assert e.strerror and e.strerror.strip(), "the error has no message"
    return e


def bounded(fn: Callable, *args, timeout: float = STEP_TIMEOUT, **kwargs):
    """Call `fn` in a helper thread; fail if it does not return in `timeout`.

    For API calls that block without a timeout of their own (unsplice waits
    for the flush), so a broken implementation fails the test instead of
    hanging the run.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="test-bounded", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} did not return within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def unsplice(target, timeout: float = STEP_TIMEOUT) -> int:
    """`sosplice.unsplice(sock)` or `splice.unsplice()`, bounded in time."""
    import sosplice

    if isinstance(target, sosplice.Splice):
        return bounded(target.unsplice, timeout=timeout)
    return bounded(sosplice.unsplice, target, timeout=timeout)


def assert_plain_path(a: socket.socket, b: socket.socket, payload: bytes = b"ping") -> None:
    """`a` and `b` are the two ends of a working, unspliced connection."""
    a.sendall(payload)
    assert recv_exactly(b, len(payload)) == payload
    b.sendall(payload[::-1])
    assert recv_exactly(a, len(payload)) == payload[::-1]


# --------------------------------------------------------------------------
# Data


class Stream:
    """A deterministic, random-access byte stream.

    Position p lives in chunk p // CHUNK, which is a window of a random base
    block at an offset that differs for every chunk of the first 2**22
    chunks; so lost, duplicated or reordered chunks change the hash, and any
    slice can be regenerated to check bytes left on a source.
    """

    CHUNK = 256 << 10
    BASE = 4 << 20
    STEP = 7919  # odd: i * STEP mod BASE is distinct for i < BASE

    def __init__(self, seed: int) -> None:
        self.base = memoryview(random.Random(seed).randbytes(self.BASE + self.CHUNK))

    def view(self, pos: int, n: int) -> memoryview:
        """Up to `n` bytes at `pos`, never crossing a chunk boundary."""
        i, j = divmod(pos, self.CHUNK)
        off = (i * self.STEP) % self.BASE + j
        return self.base[off:off + min(n, self.CHUNK - j)]

    def read(self, pos: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            v = self.view(pos, n)
            out += v
            pos += len(v)
            n -= len(v)
        return bytes(out)

    def sha256(self, pos: int, n: int) -> str:
        h = hashlib.sha256()
        while n > 0:
            v = self.view(pos, n)
            h.update(v)
            pos += len(v)
            n -= len(v)
        return h.hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Worker threads. Each has a stop event and a deadline, records its error
# instead of raising, and is always joined by the `env` fixture.


class Worker(threading.Thread):
    def __init__(self, name: str, deadline: float) -> None:
        super().__init__(name=f"test-{name}", daemon=True)
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + deadline
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # reported by check()
            self.error = e

    def work(self) -> None:
        raise NotImplementedError

    def check(self, timeout: float = STEP_TIMEOUT) -> None:
        """Join; fail if still running or if it raised."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still running after {timeout} s ({self.progress()})"
        if self.error is not None:
            raise AssertionError(f"{self.name} failed: {self.error!r} ({self.progress()})") \
                from self.error

    def progress(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in ("sent", "received", "count")
                         if hasattr(self, k))

    def _expired(self) -> bool:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"{self.name}: deadline passed")
        return self.stop_event.is_set()


class Sender(Worker):
    """Send `total` bytes of `stream` on `sock` with send(), counting exactly.

    `sent` is exact even when a send fails. With `shutdown`, SHUT_WR after
    the last byte. With `gate_at`, pause at that offset until `gate` is set.
    With `reset_ok`, EPIPE/ECONNRESET end the sender quietly (in `reset`).
    """

    def __init__(self, sock: socket.socket, stream: Stream, total: int, *,
                 shutdown: bool = True, piece: int = 1 << 20, gate_at: int | None = None,
                 deadline: float = 120.0, hash_sent: bool = True,
                 reset_ok: bool = False) -> None:
        super().__init__("sender", deadline)
        self.reset_ok = reset_ok
        self.reset: OSError | None = None
        _check_nonblocking_fd(sock)
        self.sock, self.stream, self.total = sock, stream, total
        self.fd = sock.fileno()
        self.shutdown, self.piece = shutdown, piece
        self.gate_at, self.gate = gate_at, threading.Event()
        self.hash = hashlib.sha256() if hash_sent else None
        self.sent = 0
        self.done = False

    def work(self) -> None:
        p = select.poll()
        p.register(self.sock, select.POLLOUT)
        while self.sent < self.total:
            if self._expired():
                return
            if self.gate_at is not None and self.sent >= self.gate_at and not self.gate.is_set():
                self.gate.wait(0.05)
                continue
            n = min(self.piece, self.total - self.sent)
            if self.gate_at is not None and self.sent < self.gate_at:
                n = min(n, self.gate_at - self.sent)
            v = self.stream.view(self.sent, n)
            try:
                k = os.write(self.fd, v)
            except (BlockingIOError, InterruptedError):
                p.poll(50)
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                if not self.reset_ok:
                    raise
                self.reset = e
                return
            if self.hash is not None:
                self.hash.update(v[:k])
            self.sent += k
        self.after_last_byte()
        self.done = True

    def after_last_byte(self) -> None:
        if self.shutdown:
            self.sock.shutdown(socket.SHUT_WR)


class Receiver(Worker):
    """Read from `sock` until EOF (or `expect` bytes when `until_eof` is False).

    `slow`: (reads, size, sleep) — the first `reads` recv calls take at most
    `size` bytes and sleep `sleep` seconds each. `keep`: keep the bytes.
    """

    def __init__(self, sock: socket.socket, *, expect: int | None = None,
                 until_eof: bool = True, slow: tuple[int, int, float] | None = None,
                 keep: bool = False, deadline: float = 120.0) -> None:
        super().__init__("receiver", deadline)
        _check_nonblocking_fd(sock)
        self.fd = sock.fileno()
        self.sock, self.expect, self.until_eof = sock, expect, until_eof
        self.slow, self.keep = slow, keep
        self.hash = hashlib.sha256()
        self.count = 0
        self.data = bytearray()
        self.eof = False
        self.eof_at: float | None = None
        self.reset: OSError | None = None

    def work(self) -> None:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        p = select.poll()
        p.register(self.sock, select.POLLIN)
        reads = 0
        while True:
            if not self.until_eof and self.count >= (self.expect or 0):
                return
            if self._expired():
                return
            size = len(buf)
            if self.slow and reads < self.slow[0]:
                size = self.slow[1]
            try:
                k = os.readv(self.fd, [mv[:size]])
            except (BlockingIOError, InterruptedError):
                p.poll(50)
                continue
            except (ConnectionResetError, BrokenPipeError) as e:
                self.reset = e
                return
            if k == 0:
                self.eof, self.eof_at = True, time.monotonic()
                return
            reads += 1
            self.hash.update(mv[:k])
            if self.keep:
                self.data += mv[:k]
            self.count += k
            if self.slow and reads < self.slow[0]:
                time.sleep(self.slow[2])


class Pump(Worker):
    """One thread for one direction: send `total` bytes of `stream` on
    `out`, read `total` bytes on `inp`, both non-blocking, hashing both.

    With `shutdown`, SHUT_WR on `out` after the last byte. Stops reading at
    `total` (a spliced drain is not shut down by the splice).
    """

    def __init__(self, out: socket.socket, inp: socket.socket, stream: Stream, total: int, *,
                 shutdown: bool = False, deadline: float = 120.0) -> None:
        super().__init__("pump", deadline)
        _check_nonblocking_fd(out)
        _check_nonblocking_fd(inp)
        self.out, self.inp, self.stream, self.total = out, inp, stream, total
        self.shutdown = shutdown
        self.sent = self.received = 0
        self.sent_hash = hashlib.sha256()
        self.recv_hash = hashlib.sha256()

    def work(self) -> None:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        p = select.poll()
        out_fd, in_fd = self.out.fileno(), self.inp.fileno()
        shut_done = False
        while self.received < self.total or (self.shutdown and not shut_done):
            if self._expired():
                return
            progress = False
            if self.sent < self.total:
                v = self.stream.view(self.sent, self.total - self.sent)
                try:
                    k = os.write(out_fd, v)
                    self.sent_hash.update(v[:k])
                    self.sent += k
                    progress = True
                except (BlockingIOError, InterruptedError):
                    pass
            elif self.shutdown and not shut_done:
                self.out.shutdown(socket.SHUT_WR)
                shut_done = True
            if self.received < self.total:
                try:
                    k = os.readv(in_fd, [mv[:min(len(buf), self.total - self.received)]])
                    if k == 0:
                        raise AssertionError(f"EOF after {self.received} of {self.total} bytes")
                    self.recv_hash.update(mv[:k])
                    self.received += k
                    progress = True
                except (BlockingIOError, InterruptedError):
                    pass
            if not progress:
                p = select.poll()
                if self.sent < self.total:
                    p.register(out_fd, select.POLLOUT)
                if self.received < self.total:
                    p.register(in_fd, select.POLLIN)
                p.poll(100)

    def assert_intact(self) -> None:
        assert self.sent == self.total, (self.sent, self.total)
        assert self.received == self.total, (self.received, self.total)
        assert self.recv_hash.hexdigest() == self.sent_hash.hexdigest() \
            == self.stream.sha256(0, self.total), "stream corrupted"


# --------------------------------------------------------------------------
# Fixtures


def _open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd listdir itself used, or one closed meanwhile
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


_default_engines: dict[str, object] = {}


def _default_engine_for(name: str):
    """One module-level default engine per backend, for the whole session.

    The module-level functions share one engine per process; the tests
    swap it per backend. Each lives for the session, so its own fds (BPF
    maps, epolls, eventfds) are taken before any test's fd baseline.
    """
    import sosplice

    if name not in _default_engines:
        _default_engines[name] = sosplice.Splicer(backend=name)
    return _default_engines[name]


@pytest.fixture(scope="session", autouse=True)
def _default_engines_warm(request: pytest.FixtureRequest) -> Iterator[None]:
    chosen = request.config.getoption("--backend")
    for name in BACKENDS if chosen == "all" else (chosen,):
        try:
            _default_engine_for(name)
        except Exception:
            pass  # the tests themselves will report a broken import or load
    yield
    for eng in _default_engines.values():
        eng.close()


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend this test runs on: "bpf" or "worker".

    Parametrised by pytest_generate_tests. The module-level functions and
    every `Splicer()` made without a backend use it for the test.
    """
    import sosplice

    # Not parametrised: whatever $SOSPLICE_BACKEND says; "auto" is bpf if
    # its programs load, as in Splicer(backend="auto").
    name = getattr(request, "param", None) or os.environ.get("SOSPLICE_BACKEND") or "auto"
    if name == "auto":
        try:
            name = _default_engine_for("bpf").backend
        except Exception:
            name = "worker"
    monkeypatch.setenv("SOSPLICE_BACKEND", name)
    monkeypatch.setattr(sosplice, "_default", _default_engine_for(name))
    return name


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves an fd or a thread behind (2 s to settle).

    Threads whose name starts with "sosplice" (the engines' controllers)
    are exempt: the default engine lives for the whole session.
    """
    fds_before = _open_fds()
    count_before = _fd_count()
    threads_before = set(threading.enumerate())
    yield

    def extra_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t not in threads_before and t.is_alive() and not t.name.startswith("sosplice")]

    deadline = time.monotonic() + 2.0
    while (_fd_count() > count_before or extra_threads()) and time.monotonic() < deadline:
        # A closed bpf engine keeps its programs until its former sources
        # are closed (sosplice._sockmap.reap_retired): the test has closed
        # them by now.
        if (sm := sys.modules.get("sosplice._sockmap")) is not None:
            sm.reap_retired()
        time.sleep(0.02)
    threads = extra_threads()
    assert not threads, f"threads outlived the test: {[t.name for t in threads]}"
    if _fd_count() > count_before:
        now = _open_fds()
        new = {fd: target for fd, target in now.items() if fds_before.get(fd) != target}
        pytest.fail(f"fd leak: {count_before} fds before the test, {len(now)} after; "
                    f"new or changed: {new}", pytrace=False)


class Env:
    """Per-test owner of sockets, worker threads and engines.

    Teardown order: stop and join workers, close sockets, then run the
    registered closers (engines), so an engine never waits on a socket the
    test still holds.
    """

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.workers: list[Worker] = []
        self.closers: list[Callable[[], None]] = []

    def pair(self, family: int = socket.AF_INET, timeout: float | None = STEP_TIMEOUT
             ) -> tuple[socket.socket, socket.socket]:
        a, b = tcp_pair(family, timeout)
        self.socks += [a, b]
        return a, b

    def track(self, sock: socket.socket) -> socket.socket:
        self.socks.append(sock)
        return sock

    def start(self, w: Worker) -> Worker:
        self.workers.append(w)
        w.start()
        return w

    def teardown(self) -> None:
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(5)
        for s in self.socks:
            s.close()
        for fn in reversed(self.closers):
            fn()
        alive = [w.name for w in self.workers if w.is_alive()]
        assert not alive, f"workers would not stop: {alive}"


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        e.teardown()


@pytest.fixture
def splicer(env: Env, backend: str):
    """A fresh `sosplice.Splicer()` on the test's backend, closed after its sockets."""
    import sosplice

    eng = sosplice.Splicer(backend=backend)
    env.closers.append(eng.close)
    yield eng
