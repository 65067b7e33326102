"""Bad input to every entry point of the API, and concurrent misuse.

Every bad call must end in an OSError with the errno of docs/api.md, a
TypeError or a ValueError, with a message that says what is wrong; never a
hang, never another exception, and never damage to a splice that is not
concerned: most tests keep a "bystander" splice on the same engine moving
bytes the whole time and check its stream (hash and count) at the end.

The entry points: sosplice.splice/unsplice/getsplice/geterror (the default
engine, fixture `mod`), the same four methods of an explicit Splicer (tests
taking the `api` fixture run on both; the others use `mod`, to save an
engine per test), Splice.unsplice/wait, and Splicer(backlog_cap=...).
"""
from __future__ import annotations

import decimal
import errno
import fractions
import hashlib
import math
import os
import random
import select
import socket
import struct
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sosplice
from conftest import (Env, Receiver, Stream, Worker, assert_nothing_arrives, assert_plain_path,
                      bounded, expect_errno, fionread, readable, recv_exactly, tcp_written,
                      wait_until)

HYPOTHESIS = settings(deadline=None, max_examples=25, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])

# --------------------------------------------------------------------------
# The two ways in: module functions (default engine) or an explicit engine.


class _Module:
    name = "module"
    splice = staticmethod(sosplice.splice)
    unsplice = staticmethod(sosplice.unsplice)
    getsplice = staticmethod(sosplice.getsplice)
    geterror = staticmethod(sosplice.geterror)


class _Engine:
    name = "splicer"

    def __init__(self, eng) -> None:
        self.splice = eng.splice
        self.unsplice = eng.unsplice
        self.getsplice = eng.getsplice
        self.geterror = eng.geterror


@pytest.fixture(params=["module", "splicer"])
def api(request):
    if request.param == "module":
        return _Module()
    return _Engine(request.getfixturevalue("splicer"))


@pytest.fixture
def mod():
    return _Module()


# --------------------------------------------------------------------------
# The bystander


class Trickle(Worker):
    """Send `stream` on `sock` in small pieces until stopped; exact count."""

    def __init__(self, sock: socket.socket, stream: Stream, piece: int = 8192,
                 pause: float = 0.002, deadline: float = 300.0) -> None:
        super().__init__("trickle", deadline)
        self.sock, self.stream, self.piece, self.pause = sock, stream, piece, pause
        self.hash = hashlib.sha256()
        self.sent = 0

    def work(self) -> None:
        fd = self.sock.fileno()
        p = select.poll()
        p.register(fd, select.POLLOUT)
        while not self._expired():
            v = self.stream.view(self.sent, self.piece)
            try:
                k = os.write(fd, v)
            except (BlockingIOError, InterruptedError):
                p.poll(50)
                continue
            self.hash.update(v[:k])
            self.sent += k
            time.sleep(self.pause)


class Bystander:
    """A live splice A1 -> B0 on `api`'s engine with bytes flowing A0 -> B1."""

    def __init__(self, env: Env, api, seed: int = 77) -> None:
        self.api = api
        self.A0, self.A1 = env.pair()
        self.B0, self.B1 = env.pair()
        self.sp = api.splice(self.A1, self.B0)
        self.stream = Stream(seed)
        self.sender = env.start(Trickle(self.A0, self.stream))
        self.receiver = env.start(Receiver(self.B1, deadline=300))
        wait_until(lambda: self.receiver.count > 0, 10, "bystander traffic")

    def finish(self) -> int:
        """Stop the traffic; the stream arrived whole; dissolve cleanly."""
        assert self.sp.active, f"the bystander splice ended: error {self.sp.error}"
        self.sender.stop()
        self.sender.check()
        sent = self.sender.sent
        wait_until(lambda: self.receiver.count >= sent, 20,
                   f"bystander's {sent} bytes at its drain's peer")
        self.receiver.stop()
        self.receiver.check()
        assert self.receiver.count == sent, (self.receiver.count, sent)
        assert self.receiver.hash.hexdigest() == self.sender.hash.hexdigest() \
            == self.stream.sha256(0, sent), "bystander stream corrupted"
        assert self.sp.active and self.sp.bytes == sent
        assert self.api.getsplice(self.A1) == sent
        assert self.api.geterror(self.A1) == 0
        assert bounded(self.api.unsplice, self.A1) == sent
        assert self.sp.error == 0
        assert fionread(self.A1) == 0
        return sent


@pytest.fixture
def bystander(request, env):
    """On the test's own way in: `api` if it uses that, else `mod`."""
    way = "api" if "api" in request.fixturenames else "mod"
    return Bystander(env, request.getfixturevalue(way))


def assert_untouched(api, a: socket.socket, b: socket.socket) -> None:
    """a-b is a plain, unspliced connection that works."""
    for s in (a, b):
        expect_errno(errno.EPROTO, api.unsplice, s)
    assert_plain_path(a, b)


# --------------------------------------------------------------------------
# Wrong types

NOT_A_SOCKET_TYPE = ["3", b"3", 3.0, None, True, False, object(), [3], (3,), 1j,
                     decimal.Decimal(3), fractions.Fraction(3, 1)]


class _FilenoDuck:
    """Has fileno() but is not a socket.socket: still a TypeError."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_wrong_types_for_sockets(env, api, bystander):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    junk = NOT_A_SOCKET_TYPE + [_FilenoDuck(L1.fileno())]
    for bad in junk:
        for fn, args in ((api.splice, (bad, R0)), (api.splice, (L1, bad)),
                         (api.splice, (bad, bad)), (api.unsplice, (bad,)),
                         (api.getsplice, (bad,)), (api.geterror, (bad,))):
            with pytest.raises(TypeError) as info:
                fn(*args)
            msg = str(info.value)
            assert "socket" in msg and "fd" in msg, f"{fn.__name__}{args!r}: unclear: {msg!r}"
            assert type(bad).__name__ in msg, msg
    assert api.getsplice(L1) == 0
    assert_untouched(api, L0, L1)
    assert_untouched(api, R0, R1)
    bystander.finish()


@pytest.mark.parametrize("bad", [1.0, 0.0, "1", b"1", None, True, False, [1], 1j,
                                 decimal.Decimal(1), fractions.Fraction(1, 1), object()])
def test_wrong_type_for_max(env, mod, bad):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    with pytest.raises(TypeError) as info:
        mod.splice(L1, R0, max=bad)
    assert "max" in str(info.value) and "int" in str(info.value)
    assert_untouched(mod, L0, L1)


@pytest.mark.parametrize("bad", ["1", b"1", True, False, [1], 1j, decimal.Decimal(1),
                                 fractions.Fraction(1, 2), object()])
def test_wrong_type_for_idle(env, mod, bad):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    with pytest.raises(TypeError) as info:
        mod.splice(L1, R0, idle=bad)
    assert "idle" in str(info.value) and "seconds" in str(info.value)
    assert_untouched(mod, L0, L1)


def test_types_are_checked_before_values(env, mod):
    L0, L1 = env.pair()
    with pytest.raises(TypeError):
        mod.splice("x", L1, max=-1)
    with pytest.raises(TypeError):
        mod.splice(L1, L1, max=1.5)
    with pytest.raises(TypeError):
        mod.splice(L1, None, idle=-1)
    # max and idle come before the sockets (docs/api.md, "The checks run
    # in this order").
    expect_errno(errno.EINVAL, mod.splice, L1, L1, max=-1)
    expect_errno(errno.EINVAL, mod.splice, L0, L1, idle=math.nan)
    with pytest.raises(TypeError):
        mod.splice(L1, L1, idle="soon")
    assert_untouched(mod, L0, L1)


def test_values_are_checked_before_bad_fds(env, mod):
    L0, L1 = env.pair()
    dead, _ = _closed_socket()
    with pytest.raises(TypeError):
        mod.splice(-1, L1, idle="soon")
    expect_errno(errno.EINVAL, mod.splice, dead, L1, max=-1)


# --------------------------------------------------------------------------
# Closed fds, negative fds, non-sockets


def _closed_socket() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fd = s.fileno()
    s.close()
    return s, fd


def test_closed_and_negative_fds(env, api, bystander):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    dead, dead_fd = _closed_socket()
    # A connected TCP socket, closed: still EBADF, not a use of a stale fd.
    c0, c1 = env.pair()
    c1_fd = c1.fileno()
    c1.close()
    bad_fds = [dead, c1, -1, -2, -(2 ** 31), -(2 ** 70)]
    for fd in (dead_fd, c1_fd):
        try:
            os.fstat(fd)
        except OSError:
            bad_fds.append(fd)  # still closed: may be used as a bad int fd
    for bad in bad_fds:
        for fn, args in ((api.splice, (bad, R0)), (api.splice, (L1, bad)),
                         (api.splice, (bad, bad)), (api.unsplice, (bad,)),
                         (api.getsplice, (bad,)), (api.geterror, (bad,))):
            expect_errno(errno.EBADF, fn, *args)
    assert_untouched(api, L0, L1)
    assert_untouched(api, R0, R1)
    # The peer of the closed end sees a plain close.
    c0.settimeout(5)
    assert c0.recv(10) == b""
    bystander.finish()


HUGE_FDS = [2 ** 31, 2 ** 32 + 5, 2 ** 63, 2 ** 64, 10 ** 30]


def test_huge_int_fds_are_ebadf(env, api, bystander):
    """Int fds beyond the C int range are not open fds: EBADF, not OverflowError."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    for bad in HUGE_FDS:
        for fn, args in ((api.splice, (bad, R0)), (api.splice, (L1, bad)),
                         (api.splice, (bad, bad)), (api.unsplice, (bad,)),
                         (api.getsplice, (bad,)), (api.geterror, (bad,))):
            expect_errno(errno.EBADF, fn, *args)
    assert_untouched(api, L0, L1)
    assert_untouched(api, R0, R1)
    bystander.finish()


def test_not_sockets_enotsock(env, api, bystander):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    opened: list[int] = []
    try:
        fd_file, path = tempfile.mkstemp(prefix="h1_badinput.", dir="/tmp")
        os.unlink(path)
        opened.append(fd_file)
        os.write(fd_file, b"file content")
        rp, wp = os.pipe()
        opened += [rp, wp]
        devnull = os.open(os.devnull, os.O_RDWR)
        opened.append(devnull)
        dirfd = os.open("/tmp", os.O_RDONLY)
        opened.append(dirfd)
        evfd = os.eventfd(0)
        opened.append(evfd)
        for bad in opened:
            for fn, args in ((api.splice, (bad, R0)), (api.splice, (L1, bad)),
                             (api.splice, (bad, bad)), (api.unsplice, (bad,)),
                             (api.getsplice, (bad,)), (api.geterror, (bad,))):
                e = expect_errno(errno.ENOTSOCK, fn, *args)
                assert "socket" in str(e)
        # Nothing touched them: the pipe still carries bytes, the file
        # still holds its content.
        os.write(wp, b"pipe")
        assert os.read(rp, 10) == b"pipe"
        assert os.pread(fd_file, 100, 0) == b"file content"
    finally:
        for fd in opened:
            os.close(fd)
    assert_untouched(api, L0, L1)
    assert_untouched(api, R0, R1)
    bystander.finish()


# --------------------------------------------------------------------------
# Sockets of the wrong kind or state


def _udp_pair(env: Env, family: int) -> tuple[socket.socket, socket.socket]:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    a = env.track(socket.socket(family, socket.SOCK_DGRAM))
    b = env.track(socket.socket(family, socket.SOCK_DGRAM))
    a.bind((host, 0))
    b.bind((host, 0))
    a.connect(b.getsockname()[:2])
    b.connect(a.getsockname()[:2])
    return a, b


def test_wrong_socket_kinds(env, api, bystander):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    u4a, u4b = _udp_pair(env, socket.AF_INET)
    u6a, _ = _udp_pair(env, socket.AF_INET6)
    lone_udp = env.track(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    us0, us1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ud0, ud1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    usq0, usq1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (us0, us1, ud0, ud1, usq0, usq1):
        env.track(s)
    sctp_like = []
    try:
        # A raw IPPROTO_TCP socket: right protocol number, wrong type.
        sctp_like.append(env.track(socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                 socket.IPPROTO_TCP)))
    except OSError:
        pass
    lst = env.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    lst6 = env.track(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    lst6.bind(("::1", 0))
    lst6.listen(4)
    fresh = env.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    bound = env.track(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    bound.bind(("::1", 0))

    cases = [(s, errno.EPROTONOSUPPORT) for s in
             (u4a, u6a, lone_udp, us0, ud0, usq0, *sctp_like)]
    cases += [(lst, errno.EOPNOTSUPP), (lst6, errno.EOPNOTSUPP),
              (fresh, errno.ENOTCONN), (bound, errno.ENOTCONN)]
    for bad, code in cases:
        for args in ((bad, R0), (L1, bad), (bad, bad)):
            e = expect_errno(code, api.splice, *args)
            assert len(str(e)) > 20, f"message too thin: {e}"
        # Not spliced: unsplice says so, and there is nothing to report.
        expect_errno(errno.EPROTO, api.unsplice, bad)
        assert api.getsplice(bad) == 0
        assert api.geterror(bad) == 0
    # Two wrong kinds at once: the source is checked first.
    expect_errno(errno.EPROTONOSUPPORT, api.splice, u4a, lst)
    expect_errno(errno.EOPNOTSUPP, api.splice, lst, u4a)
    expect_errno(errno.ENOTCONN, api.splice, fresh, lst)

    # They all still work as what they are.
    u4a.send(b"dgram")
    u4b.settimeout(5)
    assert u4b.recv(100) == b"dgram"
    us0.sendall(b"unix")
    us1.settimeout(5)
    assert us1.recv(100) == b"unix"
    c = env.track(socket.create_connection(lst.getsockname(), timeout=5))
    lst.settimeout(5)
    s, _ = lst.accept()
    env.track(s)
    assert_plain_path(c, s)
    assert_untouched(api, L0, L1)
    assert_untouched(api, R0, R1)
    bystander.finish()


def test_shut_down_sockets(env, mod, bystander):
    """A source that shut down its side: ENOTCONN; a drain that shut down
    for writing: EPIPE (docs/api.md). A source whose peer sent FIN is fine."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    X1.shutdown(socket.SHUT_WR)
    e = expect_errno(errno.ENOTCONN, mod.splice, X1, R0)
    assert "shutdown" in str(e)
    expect_errno(errno.EPIPE, mod.splice, L1, X1)
    assert mod.getsplice(L1) == 0 and mod.getsplice(X1) == 0
    # Nothing was spliced and R0 was not made a drain.
    sp = mod.splice(L1, R0)
    L0.sendall(b"fine")
    assert recv_exactly(R1, 4) == b"fine"
    assert bounded(mod.unsplice, L1) == 4 == sp.bytes
    assert X0.recv(1) == b""  # X1's shutdown went through as usual
    bystander.finish()


def test_reset_and_half_closed_peers(env, mod, bystander):
    """A socket whose peer reset it is not connected, either way; a drain
    whose peer has closed is accepted and fails with EPIPE on the first
    byte, which is counted; a source whose peer has closed hands over what
    it holds and ends with 0."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()

    def reset_end() -> socket.socket:
        a, b = env.pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()
        wait_until(lambda: readable(b), 5, "the reset")
        return b

    e = expect_errno(errno.ENOTCONN, mod.splice, reset_end(), R0)
    assert "connect" in str(e)
    expect_errno(errno.ENOTCONN, mod.splice, L1, reset_end())

    c0, c1 = env.pair()
    c0.close()
    wait_until(lambda: readable(c1), 5, "the FIN")
    sp = mod.splice(L1, c1)
    L0.sendall(b"abc")
    assert sp.wait(timeout=10) == errno.EPIPE
    assert sp.bytes == 3  # taken from L1, then dropped by the dead drain
    L0.sendall(b"rest")
    assert recv_exactly(L1, 4) == b"rest"

    d0, d1 = env.pair()
    d0.sendall(b"last words")
    d0.close()
    wait_until(lambda: fionread(d1) == 10, 5, "bytes and FIN queued")
    sp = mod.splice(d1, R0)
    assert sp.wait(timeout=10) == 0
    assert sp.bytes == 10
    assert recv_exactly(R1, 10) == b"last words"
    assert_untouched(mod, R0, R1)
    bystander.finish()


def test_refused_by_another_engine_keeps_queued_bytes(request, env, splicer):
    """A former source of the default engine holds bytes; a second engine
    refuses to splice it (EBUSY, docs: use one engine) or splices it. Either
    way not a byte is lost."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    sp = sosplice.splice(L1, R0)
    L0.sendall(b"abc")
    assert recv_exactly(R1, 3) == b"abc"
    assert bounded(sosplice.unsplice, L1) == 3 == sp.bytes
    L0.sendall(b"queued bytes")
    wait_until(lambda: fionread(L1) == 12, 5, "queued bytes on L1")
    try:
        sp2 = splicer.splice(L1, X0)
    except OSError as e:
        assert e.errno == errno.EBUSY, e
        assert fionread(L1) == 12, "the refused splice took the source's bytes"
        assert recv_exactly(L1, 12) == b"queued bytes"
    else:
        assert recv_exactly(X1, 12) == b"queued bytes"
        assert bounded(splicer.unsplice, L1) == 12 == sp2.bytes
    assert_nothing_arrives(R1, 0.05)


def test_refused_when_maps_full_keeps_queued_bytes(request, env):
    """An engine whose maps are full refuses a splice (or, without maps,
    makes it); the source keeps its queued bytes or they move, never lost."""
    eng = sosplice.Splicer(max_sockets=1)
    env.closers.append(eng.close)
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    Y0, Y1 = env.pair()
    sp = eng.splice(L1, R0)
    L0.sendall(b"abc")
    assert recv_exactly(R1, 3) == b"abc"
    assert bounded(eng.unsplice, L1) == 3 == sp.bytes  # L1 stays a former source
    X0.sendall(b"queued on X1")
    wait_until(lambda: fionread(X1) == 12, 5, "queued bytes on X1")
    try:
        sp2 = eng.splice(X1, Y0)
    except OSError as e:
        assert str(e).strip()
        assert fionread(X1) == 12, f"the refused splice ({e}) took the source's bytes"
        assert recv_exactly(X1, 12) == b"queued on X1"
    else:
        assert recv_exactly(Y1, 12) == b"queued on X1"
        assert bounded(eng.unsplice, X1) == 12 == sp2.bytes
    assert_untouched(eng, R0, R1)


# --------------------------------------------------------------------------
# max and idle values


@pytest.mark.parametrize("bad", [-1, -3, -(2 ** 31), -(2 ** 63), -(2 ** 64), -(10 ** 40)])
def test_negative_max_einval(env, mod, bad):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    e = expect_errno(errno.EINVAL, mod.splice, L1, R0, max=bad)
    assert "max" in str(e) and ">= 0" in str(e)
    assert mod.getsplice(L1) == 0
    assert_untouched(mod, L0, L1)
    assert_untouched(mod, R0, R1)


def test_huge_max_is_a_limit_never_reached(env, mod, bystander):
    """A max far beyond any transfer is a limit never reached; one too big
    to handle may be refused with EINVAL, and says so."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    limits = [2 ** 40, 2 ** 61, 2 ** 62 - 1]
    maybe_refused = [2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 64 + 1, 10 ** 30]
    for m in limits + maybe_refused:
        try:
            sp = mod.splice(L1, R0, max=m)
        except OSError as e:
            assert m in maybe_refused, f"max={m} refused: {e}"
            assert e.errno == errno.EINVAL and "max" in str(e), e
            continue
        data = Stream(m % 1000).read(0, 70_000)
        L0.sendall(data)
        assert recv_exactly(R1, len(data)) == data
        assert sp.active, f"max={m} dissolved after {sp.bytes} bytes: {sp.error}"
        assert bounded(mod.unsplice, L1) == len(data)
        assert sp.error == 0
    assert_nothing_arrives(R1, 0.05)
    assert fionread(L1) == 0
    bystander.finish()


@pytest.mark.parametrize("bad", [-1, -1e-9, -0.5, -(2 ** 70), float("-inf"), float("inf"),
                                 float("nan"), -float("nan")])
def test_bad_idle_einval(env, mod, bad):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    e = expect_errno(errno.EINVAL, mod.splice, L1, R0, idle=bad)
    assert "idle" in str(e)
    assert_untouched(mod, L0, L1)
    assert_untouched(mod, R0, R1)


@pytest.mark.parametrize("ok", [None, 0, 0.0, -0.0, 30, 30.0, 1e9, 2 ** 40])
def test_idle_values_that_mean_not_soon(env, mod, ok):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = mod.splice(L1, R0, idle=ok)
    L0.sendall(b"x" * 1000)
    assert recv_exactly(R1, 1000) == b"x" * 1000
    time.sleep(0.2)
    L0.sendall(b"y")
    assert recv_exactly(R1, 1) == b"y"
    assert sp.active
    assert bounded(mod.unsplice, L1) == 1001
    assert sp.error == 0


@pytest.mark.parametrize("big", [1e300, 10 ** 400], ids=["1e300", "10**400"])
def test_idle_huge_finite(env, mod, big):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    try:
        sp = mod.splice(L1, R0, idle=big)
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        L0.sendall(b"z")
        assert recv_exactly(R1, 1) == b"z"
        assert bounded(mod.unsplice, L1) == 1 == sp.bytes
    assert_untouched(mod, L0, L1)


def test_idle_huge_finite_does_no_harm(request, env, mod, bystander):
    """Whatever it raises, a failed huge idle leaves everything as it was,
    and no fd behind."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    fds = len(os.listdir("/proc/self/fd"))
    for big in (1e300, 10 ** 400):
        try:
            sp = mod.splice(L1, R0, idle=big)
        except (OSError, OverflowError):
            pass
        else:
            assert bounded(mod.unsplice, L1) == 0 == sp.bytes
    assert len(os.listdir("/proc/self/fd")) == fds, "a failed splice left fds behind"
    assert_untouched(mod, L0, L1)
    assert_untouched(mod, R0, R1)
    # R0 can still be the drain of a new splice.
    sp = mod.splice(L1, R0)
    L0.sendall(b"ok")
    assert recv_exactly(R1, 2) == b"ok"
    assert bounded(mod.unsplice, L1) == 2 == sp.bytes
    bystander.finish()


def test_idle_tiny_positive_times_out(env, mod):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = mod.splice(L1, R0, idle=1e-10)
    try:
        assert sp.wait(timeout=2) == errno.ETIMEDOUT
    finally:
        if sp.active:
            bounded(mod.unsplice, L1)


def test_junk_max_and_idle_property(env, mod):
    """Random values of every type for max and idle: the documented
    exception, or a working splice that then unsplices cleanly."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    moved = {"n": 0}
    numbers = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                        st.floats(allow_nan=True, allow_infinity=True,
                                  min_value=None, max_value=None).filter(
                                      lambda f: not math.isfinite(f) or abs(f) < 1e6))
    junk = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=3),
                     st.binary(max_size=3), st.lists(st.integers(), max_size=2),
                     st.decimals(allow_nan=False, allow_infinity=False),
                     st.fractions(), st.complex_numbers(max_magnitude=10))

    def expected(max_, idle) -> set:
        """The outcomes the docs allow: TypeError, an errno, or None (a splice)."""
        wrong_type = isinstance(max_, bool) or not isinstance(max_, int) or (
            idle is not None and (isinstance(idle, bool) or not isinstance(idle, (int, float))))
        bad_value = (isinstance(max_, int) and not isinstance(max_, bool) and max_ < 0) or (
            isinstance(idle, (int, float)) and not isinstance(idle, bool)
            and (not math.isfinite(idle) or idle < 0))
        if wrong_type and bad_value:  # the docs do not order these two
            return {TypeError, errno.EINVAL}
        if wrong_type:
            return {TypeError}
        if bad_value:
            return {errno.EINVAL}
        if max_ >= 1 << 62:  # beyond any transfer: may be refused
            return {None, errno.EINVAL}
        return {None}

    @HYPOTHESIS
    @given(max_=st.one_of(junk, st.integers(min_value=0, max_value=2 ** 65)),
           idle=st.one_of(st.none(), junk))
    def run(max_, idle):
        want = expected(max_, idle)
        try:
            sp = mod.splice(L1, R0, max=max_, idle=idle)
        except TypeError as e:
            assert TypeError in want, f"max={max_!r} idle={idle!r}: {e!r}"
            assert "max" in str(e) or "idle" in str(e), e
            return
        except OSError as e:
            assert e.errno in want, f"max={max_!r} idle={idle!r}: {e!r}"
            assert "max" in str(e) or "idle" in str(e), e
            return
        assert None in want, f"max={max_!r} idle={idle!r} was accepted"
        # One byte; it moves unless a (tiny) idle timeout ended the splice.
        L0.sendall(b"!")
        wait_until(lambda: readable(R1) or not sp.active, 10, "the byte or the end")
        try:
            n = bounded(mod.unsplice, L1)
        except OSError as e:
            assert e.errno == errno.EPROTO, e
            assert sp.wait(timeout=10) in (errno.EFBIG, errno.ETIMEDOUT), sp.error
            n = sp.bytes
        else:
            assert sp.error == 0
        assert n == sp.bytes
        moved["n"] += n
        if n:
            assert n == 1 and recv_exactly(R1, 1) == b"!"
        else:
            assert recv_exactly(L1, 1) == b"!"

    run()
    assert fionread(L1) == 0
    assert_nothing_arrives(R1, 0.05)
    assert_untouched(mod, L0, L1)


# --------------------------------------------------------------------------
# Same socket, busy source, busy drain


def test_same_socket_einval(env, mod, bystander):
    L0, L1 = env.pair()
    dup_fd = os.dup(L1.fileno())
    dup = socket.socket(fileno=dup_fd)
    env.track(dup)
    for a, b in ((L1, L1), (L1.fileno(), L1), (L1, L1.fileno()), (L1, dup), (dup_fd, L1)):
        e = expect_errno(errno.EINVAL, mod.splice, a, b)
        assert "same socket" in str(e)
    # The bystander's own source into itself: refused, and it keeps going.
    expect_errno(errno.EINVAL, mod.splice, bystander.A1, bystander.A1)
    expect_errno(errno.EINVAL, mod.splice, bystander.B0, bystander.B0)
    assert_untouched(mod, L0, L1)
    bystander.finish()


def test_busy_source_and_drain(env, api, bystander):
    X0, X1 = env.pair()
    Y0, Y1 = env.pair()
    A1, B0 = bystander.A1, bystander.B0
    # The bystander's source is busy, whatever the drain; its drain is
    # fed, whatever the source. Through a socket object, its fd, a dup.
    dup = env.track(socket.socket(fileno=os.dup(A1.fileno())))
    for src in (A1, A1.fileno(), dup):
        e = expect_errno(errno.EBUSY, api.splice, src, X0)
        assert "unsplice" in str(e)
        expect_errno(errno.EBUSY, api.splice, src, B0)
    ddup = env.track(socket.socket(fileno=os.dup(B0.fileno())))
    for dst in (B0, B0.fileno(), ddup):
        e = expect_errno(errno.EBUSY, api.splice, X1, dst)
        assert "drain" in str(e)
    # Refusals with limits too.
    expect_errno(errno.EBUSY, api.splice, A1, X0, max=1, idle=0.001)
    expect_errno(errno.EBUSY, api.splice, X1, B0, max=1, idle=0.001)
    # The refused sources were not spliced; their bytes stay with them.
    X0.sendall(b"mine")
    assert recv_exactly(X1, 4) == b"mine"
    expect_errno(errno.EPROTO, api.unsplice, X1)
    # The bystander's drain is not a source: nothing to unsplice there.
    expect_errno(errno.EPROTO, api.unsplice, B0)
    assert api.getsplice(B0) == 0
    # But it may be the source of a splice of its own (the other way).
    back = api.splice(B0, Y0)
    assert bounded(api.unsplice, B0) == 0 == back.bytes
    # A second splice of our own into a busy drain, then a free one.
    sp = api.splice(X1, Y0)
    expect_errno(errno.EBUSY, api.splice, A1, Y0)
    X0.sendall(b"xy")
    assert recv_exactly(Y1, 2) == b"xy"
    assert bounded(api.unsplice, X1) == 2 == sp.bytes
    bystander.finish()


@pytest.mark.bpf_only
def test_source_spliced_by_another_engine(env, splicer):
    """One socket, two engines: the second is refused with EBUSY, and the
    first splice keeps working."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    sp = sosplice.splice(L1, R0)
    e = expect_errno(errno.EBUSY, splicer.splice, L1, X0)
    assert "engine" in str(e)
    L0.sendall(b"one engine")
    assert recv_exactly(R1, 10) == b"one engine"
    assert_nothing_arrives(X1, 0.05)
    assert bounded(sosplice.unsplice, L1) == 10 == sp.bytes
    expect_errno(errno.EPROTO, splicer.unsplice, L1)
    assert splicer.getsplice(L1) == 0


# --------------------------------------------------------------------------
# Unsplice and Splice methods in the wrong state


def test_unsplice_states(env, api, bystander):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    e = expect_errno(errno.EPROTO, api.unsplice, L1)
    assert "not spliced" in str(e)
    sp = api.splice(L1, R0)
    L0.sendall(b"abc")
    assert recv_exactly(R1, 3) == b"abc"
    assert bounded(sp.unsplice) == 3
    e = expect_errno(errno.EPROTO, sp.unsplice)
    assert "dissolved" in str(e)
    expect_errno(errno.EPROTO, api.unsplice, L1)
    # Many unsplices of a dissolved splice, from many threads at once.
    results: list[object] = []

    def again() -> None:
        try:
            results.append(api.unsplice(L1))
        except OSError as e:
            results.append(e.errno)

    threads = [threading.Thread(target=again, name=f"test-again-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert results == [errno.EPROTO] * 8
    assert api.getsplice(L1) == 3
    bystander.finish()


def test_concurrent_unsplice_of_one_splice(env, mod, bystander):
    """Eight threads unsplice one live splice: all return its count, or
    EPROTO once it has ended; the splice ends once, losslessly."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(31)
    data = stream.read(0, 500_000)
    sp = mod.splice(L1, R0)
    L0.sendall(data)
    assert recv_exactly(R1, len(data)) == data
    results: list[object] = []
    gate = threading.Barrier(8)

    def go() -> None:
        gate.wait(10)
        try:
            results.append(mod.unsplice(L1))
        except OSError as e:
            results.append(("errno", e.errno))

    threads = [threading.Thread(target=go, name=f"test-unsplice-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "unsplice hung"
    assert len(results) == 8
    assert all(r == len(data) or r == ("errno", errno.EPROTO) for r in results), results
    assert len(data) in results
    assert sp.error == 0 and sp.bytes == len(data)
    assert mod.geterror(L1) == 0
    L0.sendall(b"after")
    assert recv_exactly(L1, 5) == b"after"
    assert_nothing_arrives(R1, 0.05)
    bystander.finish()


def test_wait_timeouts(env, mod, bystander):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = mod.splice(L1, R0)
    for t in (-1, 0, 0.0, -math.inf, math.nan, 0.05):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            sp.wait(timeout=t)
        assert time.monotonic() - t0 < 5
    for bad in ("1", b"1", [1], object()):
        with pytest.raises(TypeError):
            sp.wait(timeout=bad)
    assert sp.active and sp.error is None
    L0.sendall(b"live")
    assert recv_exactly(R1, 4) == b"live"
    assert bounded(sp.unsplice) == 4
    # Ended: every timeout returns the error at once.
    for t in (None, -1, 0, math.nan, 1e9, 1e300, math.inf):
        assert sp.wait(timeout=t) == 0
    bystander.finish()


@pytest.mark.parametrize("t", [math.inf, 1e300])
def test_wait_infinite_timeout(env, mod, t):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = mod.splice(L1, R0)
    timer = threading.Timer(0.3, lambda: L0.shutdown(socket.SHUT_WR))
    timer.start()
    try:
        assert bounded(lambda: sp.wait(timeout=t)) == 0
    finally:
        timer.join(5)
        sp.wait(timeout=10)  # the EOF ends it in any case
    assert sp.error == 0 and sp.bytes == 0


# --------------------------------------------------------------------------
# Splicer(backlog_cap=...)


@pytest.mark.parametrize("bad", [65535, 0, -1, -(2 ** 64), 1 << 15, 65536.0, 1e9, "65536",
                                 b"65536", None, True, [65536], decimal.Decimal(65536),
                                 fractions.Fraction(65536, 1)])
def test_backlog_cap_bad(bad):
    with pytest.raises(ValueError) as info:
        sosplice.Splicer(backlog_cap=bad)
    assert "backlog_cap" in str(info.value) and "65536" in str(info.value)


def test_backlog_cap_smallest(env):
    """The smallest cap allowed works and still moves a stream intact."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    eng = sosplice.Splicer(backlog_cap=65536)
    env.closers.append(eng.close)
    stream = Stream(65)
    data = stream.read(0, 3 << 20)
    sp = eng.splice(L1, R0)
    reader = env.start(Receiver(R1, until_eof=False, expect=len(data), keep=True, deadline=60))
    L0.sendall(data)
    reader.check(60)
    assert bytes(reader.data) == data
    assert bounded(eng.unsplice, L1) == len(data) == sp.bytes


@pytest.mark.parametrize("cap", [1 << 30, 1 << 40, 1 << 64])
def test_backlog_cap_huge(request, env, cap):
    """A huge cap is refused with ValueError, or it works."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    try:
        eng = sosplice.Splicer(backlog_cap=cap)
    except ValueError as e:
        assert "backlog_cap" in str(e)
        return
    env.closers.append(eng.close)
    sp = eng.splice(L1, R0)
    L0.sendall(b"big cap")
    assert recv_exactly(R1, 7) == b"big cap"
    assert bounded(eng.unsplice, L1) == 7 == sp.bytes


def test_backlog_cap_huge_does_no_harm(env):
    """Whatever a huge cap gives, the failure leaves the sockets plain."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    try:
        eng = sosplice.Splicer(backlog_cap=1 << 40)
    except ValueError:
        return
    env.closers.append(eng.close)
    try:
        sp = eng.splice(L1, R0)
    except (OSError, TypeError, ValueError, OverflowError):
        pass
    else:
        assert bounded(eng.unsplice, L1) == 0 == sp.bytes
    expect_errno(errno.EPROTO, eng.unsplice, L1)
    assert eng.getsplice(L1) == 0
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_closed_engine(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    eng = sosplice.Splicer()
    eng.close()
    with pytest.raises(RuntimeError) as info:
        eng.splice(L1, R0)
    assert "closed" in str(info.value)
    eng.close()  # again: nothing
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_splice_racing_engine_close(env):
    """A splice() made while close() is waiting for another splice's drain
    is refused (RuntimeError), or it is a splice like any other: every byte
    it counts reaches its drain's peer, which keeps reading."""
    SO_RCVBUFFORCE = 33
    eng = sosplice.Splicer(backlog_cap=65536)
    env.closers.append(eng.close)
    # S1: a splice whose drain takes its time, so close() has to wait.
    A0, A1 = env.pair()
    B0, B1 = env.pair()
    B1.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s1 = eng.splice(A1, B0)
    B0.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    A0.setblocking(False)
    block, last, pushed = b"s" * 65536, time.monotonic(), 0
    while time.monotonic() - last < 0.5 and pushed < (256 << 20):
        try:
            pushed += A0.send(block)
            last = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    # The racing splice: 1 MiB already waiting on its source, and a drain
    # whose send queue is full of P bytes of its own (written before the
    # splice), so the splice cannot move its bytes on at once.
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    try:
        L1.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    except PermissionError:  # not root: as much as rmem_max allows
        L1.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    R1.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    R0.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    R0.setblocking(False)
    prefill, last = 0, time.monotonic()
    while time.monotonic() - last < 0.3:
        try:
            prefill += R0.send(b"p" * 65536)
            last = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    R0.settimeout(10)
    stream = Stream(99)
    total = 1 << 20
    L0.sendall(stream.read(0, total))
    wait_until(lambda: fionread(L1) == total, 10, "1 MiB waiting on L1")

    closer = threading.Thread(target=eng.close, name="test-close")
    closer.start()
    try:
        wait_until(lambda: not closer.is_alive() or any(
            r.state == "dissolving" for r in eng.stats()), 10, "close() under way")
        try:
            h = eng.splice(L1, R0)
        except RuntimeError as e:
            h = None
            assert "closed" in str(e)
        # Both drains' peers read now; R1 slowly (at most 1.6 MB/s), so
        # the racing splice needs a while, far below close()'s 10 s.
        rx = env.start(Receiver(R1, slow=(1 << 30, 16384, 0.01), deadline=120))
        env.start(Receiver(B1, deadline=120))
    finally:
        closer.join(30)
    assert not closer.is_alive(), "close() hung"
    if h is None:
        return
    assert h.wait(timeout=10) == 0
    counted = h.bytes
    assert 0 < counted <= total
    # Ended means flushed: the drain has taken every counted byte.
    written = tcp_written(R0)
    assert written == prefill + counted, (
        f"the racing splice counted {counted} bytes but its drain took only "
        f"{written - prefill}: {prefill + counted - written} lost")
    wait_until(lambda: rx.count >= prefill + counted, 20,
               f"the {counted} bytes the racing splice counted (after {prefill} of the "
               f"drain's own) at its drain's peer")
    time.sleep(0.05)
    assert rx.count == prefill + counted
    want = hashlib.sha256(b"p" * prefill)
    want.update(stream.read(0, counted))
    assert rx.hash.hexdigest() == want.hexdigest()
    assert not s1.active


# --------------------------------------------------------------------------
# Splicing during a dissolve; many threads at once


def _run_together(*fns, timeout: float = 15.0) -> list[object]:
    """Run `fns` at once (barrier); each result or its exception."""
    gate = threading.Barrier(len(fns))
    out: list[object] = [None] * len(fns)

    def wrap(i: int, fn) -> None:
        try:
            gate.wait(timeout)
            out[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            out[i] = e

    threads = [threading.Thread(target=wrap, args=(i, fn), name=f"test-together-{i}")
               for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"hung: {hung}"
    return out


def test_splice_during_dissolve(env, mod):
    """One thread unsplices L1 while another splices L1 again, to R0 or to
    X0, forty times, with bytes arriving all along. Each call succeeds or
    gives a clear OSError; no byte is lost, doubled or misplaced."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    stream = Stream(4242)
    sender = env.start(Trickle(L0, stream, piece=4096, pause=0.001))
    rx = {id(R0): env.start(Receiver(R1, keep=True, deadline=300)),
          id(X0): env.start(Receiver(X1, keep=True, deadline=300))}
    handles: list[tuple[object, socket.socket]] = [(mod.splice(L1, R0), R0)]
    rng = random.Random(6)
    outcomes: dict[str, int] = {}
    for _ in range(40):
        drain = rng.choice((R0, X0))
        # The splice comes at once (during the dissolve: EBUSY) or a few
        # ms later (often after it: a new splice).
        delay = rng.choice((0.0, rng.random() * 0.01))

        def again(drain=drain, delay=delay):
            time.sleep(delay)
            return mod.splice(L1, drain)

        unspliced, spliced = _run_together(lambda: mod.unsplice(L1), again)
        if isinstance(unspliced, BaseException):
            assert isinstance(unspliced, OSError) and unspliced.errno == errno.EPROTO, \
                repr(unspliced)
            assert str(unspliced).strip()
        else:
            assert isinstance(unspliced, int) and unspliced >= 0
        if isinstance(spliced, BaseException):
            assert isinstance(spliced, OSError), repr(spliced)
            assert spliced.errno in (errno.EBUSY, errno.EAGAIN), repr(spliced)
            assert len(str(spliced)) > 20
            outcomes[errno.errorcode[spliced.errno]] = outcomes.get(
                errno.errorcode[spliced.errno], 0) + 1
        else:
            handles.append((spliced, drain))
            outcomes["spliced"] = outcomes.get("spliced", 0) + 1
        live = [h for h, _ in handles if h.active]
        assert len(live) <= 1, "two live splices from one source"
        if not live:
            handles.append((mod.splice(L1, drain), drain))
        time.sleep(rng.random() * 0.02)
    for h, _ in handles:
        if h.active:
            bounded(h.unsplice)
    sender.stop()
    sender.check()
    sent = sender.sent
    # Handles are in the order their splices ran: each took the next
    # stretch of the stream, for its own drain.
    want = {id(R0): bytearray(), id(X0): bytearray()}
    off = 0
    for h, d in handles:
        assert not h.active and h.error == 0, (h, h.error)
        want[id(d)] += stream.read(off, h.bytes)
        off += h.bytes
    assert off <= sent
    for key, r in rx.items():
        wait_until(lambda: r.count >= len(want[key]), 20, "drained bytes at the peers")
    time.sleep(0.1)
    for key, r in rx.items():
        r.stop()
        r.check()
        assert r.count == len(want[key]), (r.count, len(want[key]))
        assert bytes(r.data) == bytes(want[key]), "bytes misplaced"
    left = recv_exactly(L1, sent - off) if sent > off else b""
    assert left == stream.read(off, sent - off)
    assert fionread(L1) == 0
    assert outcomes.get("spliced", 0) + outcomes.get("EBUSY", 0) + outcomes.get("EAGAIN", 0) \
        == 40


def test_many_threads_share_pairs(env, api):
    """Sixteen threads call splice/unsplice/getsplice/geterror/wait at
    random on four shared source-drain pairs with bytes flowing. Only the
    documented errors; no hang; every byte accounted for."""
    npairs, nthreads, ops = 4, 16, 100
    pairs = []
    for i in range(npairs):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        stream = Stream(900 + i)
        sender = env.start(Trickle(L0, stream, piece=2048, pause=0.003))
        receiver = env.start(Receiver(R1, deadline=300))
        pairs.append({"L1": L1, "R0": R0, "stream": stream, "sender": sender,
                      "receiver": receiver, "handles": [], "lock": threading.Lock()})
    errors: list[BaseException] = []
    counts: dict[str, int] = {}
    counts_lock = threading.Lock()

    def note(what: str) -> None:
        with counts_lock:
            counts[what] = counts.get(what, 0) + 1

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(ops):
                p = rng.choice(pairs)
                op = rng.choice(("splice", "splice", "splice_max", "unsplice", "unsplice",
                                 "getsplice", "geterror", "wait", "handle_unsplice"))
                t0 = time.monotonic()
                try:
                    if op in ("splice", "splice_max"):
                        m = rng.randrange(1, 50_000) if op == "splice_max" else 0
                        h = api.splice(p["L1"], p["R0"], max=m)
                        with p["lock"]:
                            p["handles"].append((h, m))
                    elif op == "unsplice":
                        n = api.unsplice(p["L1"])
                        assert isinstance(n, int) and n >= 0
                    elif op == "getsplice":
                        n = api.getsplice(p["L1"])
                        assert isinstance(n, int) and n >= 0
                    elif op == "geterror":
                        assert api.geterror(p["L1"]) in (0, errno.EFBIG)
                    elif op in ("wait", "handle_unsplice"):
                        with p["lock"]:
                            hs = list(p["handles"])
                        if hs:
                            h, _ = rng.choice(hs)
                            if op == "wait":
                                try:
                                    assert h.wait(timeout=0.01) in (0, errno.EFBIG)
                                except TimeoutError:
                                    pass
                            else:
                                assert h.unsplice() >= 0
                    note(op)
                except OSError as e:
                    allowed = {"splice": (errno.EBUSY, errno.EAGAIN),
                               "splice_max": (errno.EBUSY, errno.EAGAIN),
                               "unsplice": (errno.EPROTO,),
                               "handle_unsplice": (errno.EPROTO,)}.get(op, ())
                    assert e.errno in allowed, f"{op}: {e!r}"
                    assert len(str(e)) > 20, f"{op}: thin message {e!r}"
                    note(f"{op}:{errno.errorcode[e.errno]}")
                assert time.monotonic() - t0 < 15, f"{op} took {time.monotonic() - t0:.1f} s"
                time.sleep(rng.random() * 0.01)
        except BaseException as e:  # noqa: BLE001 - collected
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), name=f"test-many-{k}")
               for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "API calls hung"
    assert not errors, errors

    for p in pairs:
        for h, _ in p["handles"]:
            if h.active:
                try:
                    bounded(h.unsplice)
                except OSError as e:  # ended meanwhile
                    assert e.errno == errno.EPROTO
        p["sender"].stop()
        p["sender"].check()
    for p in pairs:
        sent = p["sender"].sent
        moved = 0
        for h, m in p["handles"]:
            assert not h.active
            assert h.error in (0, errno.EFBIG), h.error
            if m:
                assert h.bytes <= m
                if h.error == errno.EFBIG:
                    assert h.bytes == m
            else:
                assert h.error == 0
            moved += h.bytes
        r = p["receiver"]
        wait_until(lambda: r.count >= moved, 20, "moved bytes at the drains' peers")
        time.sleep(0.05)
        r.stop()
        r.check()
        assert r.count == moved, (r.count, moved)
        assert r.hash.hexdigest() == p["stream"].sha256(0, moved)
        left = recv_exactly(p["L1"], sent - moved) if sent > moved else b""
        assert left == p["stream"].read(moved, sent - moved)
        assert fionread(p["L1"]) == 0
    # The mix really raced: splices and unsplices both succeeded and failed.
    for what in ("splice", "unsplice", "splice:EBUSY", "unsplice:EPROTO"):
        assert counts.get(what, 0) > 0, counts


# --------------------------------------------------------------------------
# Random sequences of operations against a model of the bytes


OPS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(min_value=1, max_value=120_000)),
    st.tuples(st.just("splice"), st.sampled_from([0, 0, 1, 7, 1000, 65_536, 100_001])),
    st.tuples(st.just("unsplice"), st.booleans()),
    st.tuples(st.just("getsplice"), st.none()),
    st.tuples(st.just("geterror"), st.none()),
    st.tuples(st.just("read_left"), st.none()),
), min_size=1, max_size=14)


def test_random_operation_sequences(env, api):
    """Random splice/unsplice/send/... sequences against a model: every
    byte of L0's stream ends up at R1 or read from L1, exactly once, in
    order; every count, error and errno is the one the model predicts."""
    stream = Stream(1234)
    runs = {"n": 0, "moved": 0}

    @settings(HYPOTHESIS, max_examples=35)
    @given(ops=OPS)
    def run(ops):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        try:
            sequence(ops, L0, L1, R0, R1)
        finally:
            for s in (L0, L1, R0, R1):
                s.close()
        runs["n"] += 1

    def sequence(ops, L0, L1, R0, R1):
        sent = consumed = 0         # stream positions: sent by L0, gone from L1
        h = None                    # the live splice, if any
        rem = None                  # bytes it may still move (None: no limit)
        count = 0                   # getsplice() as the model says
        pending_err = 0             # geterror() as the model says

        def move_queued() -> None:
            nonlocal consumed, rem, h, count, pending_err
            k = sent - consumed
            if rem is not None:
                k = min(k, rem)
            if k:
                got = recv_exactly(R1, k)
                assert got == stream.read(consumed, k), "wrong bytes at the drain's peer"
                consumed += k
                count += k
                runs["moved"] += k
            if rem is not None:
                rem -= k
                if rem == 0:
                    assert h.wait(timeout=10) == errno.EFBIG
                    assert h.bytes == count
                    pending_err = errno.EFBIG
                    h, rem = None, None

        for op, arg in ops:
            if op == "send":
                n = arg
                if h is None and sent - consumed + n > 400_000:
                    n = max(0, 400_000 - (sent - consumed))
                if n == 0:
                    continue
                L0.sendall(stream.read(sent, n))
                sent += n
                if h is not None:
                    move_queued()
            elif op == "splice":
                if h is not None:
                    expect_errno(errno.EBUSY, api.splice, L1, R0, max=arg)
                    continue
                h = api.splice(L1, R0, max=arg)
                rem = arg or None
                count, pending_err = 0, 0
                move_queued()
            elif op == "unsplice":
                if h is None:
                    expect_errno(errno.EPROTO, api.unsplice, L1)
                    continue
                n = bounded(h.unsplice) if arg else bounded(api.unsplice, L1)
                assert n == count
                assert h.error == 0
                h, rem, pending_err = None, None, 0
            elif op == "getsplice":
                assert api.getsplice(L1) == count
            elif op == "geterror":
                assert api.geterror(L1) == pending_err
                pending_err = 0
            elif op == "read_left":
                if h is not None:
                    continue  # never read a spliced source
                k = sent - consumed
                if k:
                    assert recv_exactly(L1, k) == stream.read(consumed, k)
                    consumed = sent
                assert fionread(L1) == 0
        # The end: dissolve, then the rest is on L1 and nothing more at R1.
        if h is not None:
            assert bounded(api.unsplice, L1) == count
        k = sent - consumed
        if k:
            assert recv_exactly(L1, k) == stream.read(consumed, k)
        assert fionread(L1) == 0
        assert_nothing_arrives(R1, 0.02)
        assert fionread(R1) == 0

    run()
    assert runs["n"] > 0 and runs["moved"] > 0, runs
