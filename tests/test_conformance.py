"""Conformance: FreeBSD's tests/sys/kern/socket_splice.c case by case, as
docs/api.md adapts them, plus the OpenBSD behaviours the API adopts.

Every FreeBSD case is its own test, named test_freebsd_<case>, and follows
FreeBSD's setup: two TCP connections L0-L1 and R0-R1, with L1 spliced into
R0 and R0 into L1 (FreeBSD's splice_pair), so bytes written on L0 come out
of R1 and bytes written on R1 come out of L0. The limits of splice_pair
(max, idle) apply to both directions, as in FreeBSD.

FreeBSD's twelfth case, splice_capsicum, needs Capsicum rights and has no
Linux counterpart; the other eleven are all
here. The FreeBSD cases use an explicit engine (the `splicer` fixture), the
OpenBSD ones both the module-level functions and an explicit engine.

Only the public API is used, so every test runs on any backend.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import tempfile
import time

import pytest

import sosplice
from conftest import (Env, Pump, Stream, assert_nothing_arrives, assert_plain_path, bounded,
                      expect_errno, fionread, readable, recv_exactly, select_readable)

GiB = 1 << 30


def splice_conn(env: Env, eng, *, max: int = 0, idle: float | None = None,
                lfam: int = socket.AF_INET, rfam: int = socket.AF_INET):
    """FreeBSD's splice_conn_init_limits: L1 <-> R0 spliced both ways."""
    L0, L1 = env.pair(lfam)
    R0, R1 = env.pair(rfam)
    # splice_pair(fd1=L1, fd2=R0): first R0 -> L1, then L1 -> R0.
    sp_r = eng.splice(R0, L1, max=max, idle=idle)
    sp_l = eng.splice(L1, R0, max=max, idle=idle)
    return L0, L1, R0, R1, sp_l, sp_r


def check_empty(*socks: socket.socket) -> None:
    """FreeBSD's splice_conn_check_empty: FIONREAD is 0 everywhere."""
    for s in socks:
        assert fionread(s) == 0, f"unexpected data on {s.getsockname()}: {fionread(s)} bytes"


def unsplice_bounded(eng, sock) -> int:
    return bounded(eng.unsplice, sock)


# --------------------------------------------------------------------------
# FreeBSD cases


def test_freebsd_basic(env, splicer):
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer)
    assert splicer.getsplice(L1) == 0
    assert splicer.getsplice(R0) == 0

    # Left to right.
    L0.sendall(b"M")
    assert recv_exactly(R1, 1) == b"M"
    assert splicer.getsplice(L1) == 1
    assert splicer.getsplice(R0) == 0

    # Right to left.
    R1.sendall(b"J")
    assert recv_exactly(L0, 1) == b"J"
    assert splicer.getsplice(L1) == 1
    assert splicer.getsplice(R0) == 1
    assert (sp_l.bytes, sp_r.bytes) == (1, 1)

    # Unsplice; the counts do not change.
    assert unsplice_bounded(splicer, L1) == 1
    assert unsplice_bounded(splicer, R0) == 1
    assert splicer.getsplice(L1) == 1
    assert splicer.getsplice(R0) == 1
    assert (sp_l.error, sp_r.error) == (0, 0)
    assert not sp_l.active and not sp_r.active
    # An unsplice is not an error to report.
    assert splicer.geterror(L1) == 0 and splicer.geterror(R0) == 0
    check_empty(L0, L1, R0, R1)
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_freebsd_error(env, splicer):
    L0, L1 = env.pair()
    R0, R1 = env.pair()

    # A negative byte limit is invalid.
    expect_errno(errno.EINVAL, splicer.splice, L1, R0, max=-3)
    assert splicer.getsplice(L1) == 0

    # Can't unsplice a never-spliced socket (FreeBSD: ENOTCONN; here EPROTO).
    expect_errno(errno.EPROTO, splicer.unsplice, L1)

    # Can't double-unsplice a socket.
    sp = splicer.splice(L1, R0)
    assert unsplice_bounded(splicer, L1) == 0
    expect_errno(errno.EPROTO, splicer.unsplice, L1)
    expect_errno(errno.EPROTO, sp.unsplice)

    # Can't splice a spliced socket; can't feed a drain twice.
    sp = splicer.splice(L1, R0)
    expect_errno(errno.EBUSY, splicer.splice, L1, R1)
    expect_errno(errno.EBUSY, splicer.splice, L0, R0)
    # The refused calls did not disturb the splice, nor splice L0.
    L0.sendall(b"still")
    assert recv_exactly(R1, 5) == b"still"
    assert splicer.getsplice(L1) == 5
    assert splicer.getsplice(L0) == 0
    expect_errno(errno.EPROTO, splicer.unsplice, L0)
    assert unsplice_bounded(splicer, L1) == 5

    # Can't splice to a non-socket.
    fd, path = tempfile.mkstemp(prefix="h1_splice_error.", dir="/tmp")
    try:
        expect_errno(errno.ENOTSOCK, splicer.splice, L1, fd)
        expect_errno(errno.ENOTSOCK, splicer.splice, fd, R0)
    finally:
        os.close(fd)
        os.unlink(path)

    # Can't splice to an invalid fd (the one just closed).
    with pytest.raises(OSError):
        os.fstat(fd)
    expect_errno(errno.EBADF, splicer.splice, L1, fd)
    expect_errno(errno.EBADF, splicer.splice, fd, R0)

    # Can't splice a unix stream socket, either way.
    u0, u1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env.track(u0)
    env.track(u1)
    expect_errno(errno.EPROTONOSUPPORT, splicer.splice, L1, u0)
    expect_errno(errno.EPROTONOSUPPORT, splicer.splice, u1, L1)

    # Can't splice an unconnected TCP socket, either way.
    sd = env.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    expect_errno(errno.ENOTCONN, splicer.splice, L1, sd)
    expect_errno(errno.ENOTCONN, splicer.splice, sd, R0)

    # Nothing of the above left anything spliced.
    for s in (L0, L1, R0, R1):
        expect_errno(errno.EPROTO, splicer.unsplice, s)
    assert splicer.getsplice(L1) == 5
    check_empty(L0, L1, R0, R1)
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_freebsd_no_read_events(env, splicer):
    """FreeBSD's splice_kevent: no read event on a spliced source, before
    or after traffic (here: epoll registered before, poll and select)."""
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer)
    ep = select.epoll()
    try:
        ep.register(L1.fileno(), select.EPOLLIN | select.EPOLLPRI)
        ep.register(R0.fileno(), select.EPOLLIN | select.EPOLLPRI)
        assert ep.poll(0) == []
        assert not readable(L1) and not select_readable(L1)

        L0.sendall(b"M")
        assert recv_exactly(R1, 1) == b"M"
        assert ep.poll(0.1) == [], "spliced data made a source readable"
        assert not readable(L1, 0.05) and not select_readable(L1)

        R1.sendall(b"J")
        assert recv_exactly(L0, 1) == b"J"
        assert ep.poll(0.1) == [], "spliced data made a source readable"
        assert not readable(R0, 0.05) and not select_readable(R0)
    finally:
        ep.close()
    for s in (L1, R0):
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(16)
        s.settimeout(10)
    assert (sp_l.bytes, sp_r.bytes) == (1, 1)
    assert unsplice_bounded(splicer, L1) == 1
    assert unsplice_bounded(splicer, R0) == 1
    check_empty(L0, L1, R0, R1)


def test_freebsd_limit_bytes(env, splicer):
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer, max=128 + 1)

    L0.sendall(b"A" * 128)
    assert recv_exactly(R1, 128) == b"A" * 128
    assert splicer.getsplice(L1) == 128
    assert splicer.getsplice(R0) == 0
    assert sp_l.active

    # Writing the last byte dissolves the splice.
    L0.sendall(b"B")
    assert recv_exactly(R1, 1) == b"B"
    assert sp_l.wait(timeout=10) == errno.EFBIG
    assert splicer.getsplice(L1) == 129 == sp_l.bytes

    # The next byte appears on L1 rather than going through the splice.
    L0.sendall(b"C")
    assert recv_exactly(L1, 1) == b"C"
    assert_nothing_arrives(R1, 0.1)
    check_empty(L0, L1, R0, R1)

    # The other direction, with the same limit, is untouched.
    assert sp_r.active
    R1.sendall(b"D" * 129)
    assert recv_exactly(L0, 129) == b"D" * 129
    assert sp_r.wait(timeout=10) == errno.EFBIG
    assert splicer.getsplice(R0) == 129
    check_empty(L0, L1, R0, R1)


def test_freebsd_limit_timeout(env, splicer):
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer, idle=0.5)

    L0.sendall(b"A" * 128)
    assert recv_exactly(R1, 128) == b"A" * 128
    quiet_from = time.monotonic()
    assert splicer.getsplice(L1) == 128
    assert splicer.getsplice(R0) == 0

    # FreeBSD sleeps 0.55 s. The engine may be a little late on a busy
    # machine, so wait for the dissolve itself, with slack.
    time.sleep(0.55)
    assert sp_l.wait(timeout=10) == errno.ETIMEDOUT
    quiet = time.monotonic() - quiet_from
    assert quiet >= 0.45, f"dissolved after only {quiet:.3f} s without traffic"
    # R0 never moved a byte: it timed out too.
    assert sp_r.wait(timeout=10) == errno.ETIMEDOUT
    assert (sp_l.bytes, sp_r.bytes) == (128, 0)

    # The next byte appears on L1 rather than going through the splice.
    L0.sendall(b"C")
    assert recv_exactly(L1, 1) == b"C"
    assert_nothing_arrives(R1, 0.1)
    check_empty(L0, L1, R0, R1)


def test_freebsd_listen(env, splicer):
    # listen() fails on spliced (connected) sockets.
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer)
    for s in (L1, R0):
        with pytest.raises(OSError) as info:
            s.listen(1)
        assert info.value.errno == errno.EINVAL
    # ...and the failed listen() did not disturb the splices.
    L0.sendall(b"after listen")
    assert recv_exactly(R1, 12) == b"after listen"
    R1.sendall(b"back")
    assert recv_exactly(L0, 4) == b"back"
    assert unsplice_bounded(splicer, L1) == 12
    assert unsplice_bounded(splicer, R0) == 4

    # A listening socket can be spliced in neither direction (FreeBSD:
    # EINVAL; here EOPNOTSUPP as on OpenBSD).
    sd0, sd1 = env.pair()
    sd2 = env.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sd2.bind(("127.0.0.1", 0))
    sd2.listen(1)
    expect_errno(errno.EOPNOTSUPP, splicer.splice, sd1, sd2)
    expect_errno(errno.EOPNOTSUPP, splicer.splice, sd2, sd1)
    # A listening socket cannot be unspliced either: it is not spliced.
    expect_errno(errno.EPROTO, splicer.unsplice, sd2)
    assert splicer.getsplice(sd2) == 0

    # The listener still accepts and sd0-sd1 is a plain connection.
    c = env.track(socket.create_connection(sd2.getsockname(), timeout=10))
    sd2.settimeout(10)
    s, _ = sd2.accept()
    env.track(s)
    assert_plain_path(c, s)
    assert_plain_path(sd0, sd1)
    expect_errno(errno.EPROTO, splicer.unsplice, sd1)


def test_freebsd_loop(env, splicer):
    """The two ends of one local connection spliced into each other spin
    forever on FreeBSD; here it is refused with ELOOP."""
    sd0, sd1 = env.pair()
    expect_errno(errno.ELOOP, splicer.splice, sd1, sd0)
    expect_errno(errno.ELOOP, splicer.splice, sd0, sd1)
    expect_errno(errno.ELOOP, splicer.splice, sd0.fileno(), sd1.fileno())
    # FreeBSD's child writes one byte each way: here they are plain bytes.
    sd0.sendall(bytes([42]))
    sd1.sendall(bytes([24]))
    assert recv_exactly(sd1, 1) == bytes([42])
    assert recv_exactly(sd0, 1) == bytes([24])
    assert_nothing_arrives(sd0, 0.1)
    assert_nothing_arrives(sd1, 0.05)
    for s in (sd0, sd1):
        expect_errno(errno.EPROTO, splicer.unsplice, s)
        assert splicer.getsplice(s) == 0
    # Closing both ends is clean.
    sd0.close()
    sd1.close()


def test_freebsd_nonblock(env, splicer):
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer)
    for s in (L0, L1, R0, R1):
        s.setblocking(False)

    # FreeBSD writes 200-byte blocks of 'A' until EAGAIN. Each block here
    # also carries its index, so a lost, doubled or reordered block shows.
    # Contract 11 bounds the kernel's memory, so EAGAIN must come.
    def sysctl_max(name: str) -> int:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])

    cap = 2 * (sysctl_max("tcp_rmem") + sysctl_max("tcp_wmem")) + (64 << 20)
    sent = bytearray()
    i = 0
    while True:
        block = i.to_bytes(4, "big") + b"A" * 196
        try:
            n = L0.send(block)
        except BlockingIOError:
            break
        sent += block[:n]
        i += 1
        assert len(sent) < cap, f"no EAGAIN after {len(sent)} bytes: no backpressure"
    assert len(sent) > 0

    got = bytearray()
    deadline = time.monotonic() + 60
    while len(got) < len(sent):
        assert time.monotonic() < deadline, f"{len(got)} of {len(sent)} bytes arrived"
        try:
            data = R1.recv(1 << 20)
        except BlockingIOError:
            select.select([R1], [], [], 0.1)
            continue
        assert data, f"EOF after {len(got)} of {len(sent)} bytes"
        got += data
    assert bytes(got) == bytes(sent)
    assert_nothing_arrives(R1, 0.1)
    assert splicer.getsplice(L1) == len(sent)
    assert splicer.getsplice(R0) == 0
    assert unsplice_bounded(splicer, L1) == len(sent)
    assert unsplice_bounded(splicer, R0) == 0
    check_empty(L0, L1, R0, R1)


def test_freebsd_resplice(env, splicer):
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer)

    def one_each_way() -> None:
        L0.sendall(b"M")
        assert recv_exactly(R1, 1) == b"M"
        assert splicer.getsplice(L1) == 1
        assert splicer.getsplice(R0) == 0
        R1.sendall(b"J")
        assert recv_exactly(L0, 1) == b"J"
        assert splicer.getsplice(L1) == 1
        assert splicer.getsplice(R0) == 1

    one_each_way()
    assert unsplice_bounded(splicer, L1) == 1
    assert unsplice_bounded(splicer, R0) == 1
    assert splicer.getsplice(L1) == 1
    assert splicer.getsplice(R0) == 1

    # Splice again: both counts are reset.
    sp_r2 = splicer.splice(R0, L1)
    sp_l2 = splicer.splice(L1, R0)
    assert splicer.getsplice(L1) == 0
    assert splicer.getsplice(R0) == 0
    assert (sp_l2.bytes, sp_r2.bytes) == (0, 0)
    assert (sp_l.bytes, sp_r.bytes) == (1, 1)  # the old handles keep theirs

    one_each_way()
    assert unsplice_bounded(splicer, L1) == 1
    assert unsplice_bounded(splicer, R0) == 1
    check_empty(L0, L1, R0, R1)


@pytest.mark.slow
def test_freebsd_throughput(env, splicer):
    """Two threads push 1 GiB each way at once, all four sockets
    non-blocking; every byte arrives, hash-checked. (FreeBSD picks a random
    size from 1 B to 1 GiB; this always moves the whole GiB.)"""
    L0, L1, R0, R1, sp_l, sp_r = splice_conn(env, splicer)
    for s in (L0, L1, R0, R1):
        s.setblocking(False)
    right = env.start(Pump(L0, R1, Stream(101), GiB, deadline=900))
    left = env.start(Pump(R1, L0, Stream(202), GiB, deadline=900))
    right.check(900)
    left.check(900)
    right.assert_intact()
    left.assert_intact()
    assert splicer.getsplice(L1) == GiB
    assert splicer.getsplice(R0) == GiB
    assert (sp_l.bytes, sp_r.bytes) == (GiB, GiB)
    assert_nothing_arrives(R1, 0.05)
    assert_nothing_arrives(L0, 0.05)
    assert unsplice_bounded(splicer, L1) == GiB
    assert unsplice_bounded(splicer, R0) == GiB
    check_empty(L0, L1, R0, R1)


def test_freebsd_v4v6(env, splicer):
    sd40, sd41 = env.pair(socket.AF_INET)
    sd60, sd61 = env.pair(socket.AF_INET6)
    assert sd41.family == socket.AF_INET and sd60.family == socket.AF_INET6
    sp4 = splicer.splice(sd41, sd60)
    sp6 = splicer.splice(sd60, sd41)

    sd40.sendall(b"M")
    assert recv_exactly(sd61, 1) == b"M"
    sd61.sendall(b"J")
    assert recv_exactly(sd40, 1) == b"J"
    assert splicer.getsplice(sd41) == 1
    assert splicer.getsplice(sd60) == 1

    # And a larger amount each way, to cross the families in bulk.
    data4, data6 = Stream(4).read(0, 300_000), Stream(6).read(0, 200_000)
    sd40.sendall(data4)
    assert recv_exactly(sd61, len(data4)) == data4
    sd61.sendall(data6)
    assert recv_exactly(sd40, len(data6)) == data6
    assert unsplice_bounded(splicer, sd41) == 1 + len(data4) == sp4.bytes
    assert unsplice_bounded(splicer, sd60) == 1 + len(data6) == sp6.bytes
    check_empty(sd40, sd41, sd60, sd61)


# --------------------------------------------------------------------------
# OpenBSD behaviours the contract adopts. Each runs against the module-level
# functions (the default engine) and against an explicit engine.


class _Module:
    splice = staticmethod(sosplice.splice)
    unsplice = staticmethod(sosplice.unsplice)
    getsplice = staticmethod(sosplice.getsplice)
    geterror = staticmethod(sosplice.geterror)


@pytest.fixture(params=["module", "splicer"])
def api(request):
    if request.param == "module":
        return _Module()
    return request.getfixturevalue("splicer")


def test_openbsd_efbig_reported_once(env, api):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    assert api.geterror(L1) == 0  # never spliced
    sp = api.splice(L1, R0, max=10)
    assert api.geterror(L1) == 0  # active
    data = bytes(range(25))
    L0.sendall(data)
    assert recv_exactly(R1, 10) == data[:10]
    assert sp.wait(timeout=10) == errno.EFBIG
    assert api.geterror(L1) == errno.EFBIG
    assert api.geterror(L1) == 0
    assert api.geterror(L1) == 0
    assert sp.error == errno.EFBIG  # the handle keeps its reason
    assert api.getsplice(L1) == 10
    assert recv_exactly(L1, 15) == data[10:]
    assert_nothing_arrives(R1, 0.05)
    # A drain is not a source: nothing to report on it.
    assert api.geterror(R0) == 0


def test_openbsd_etimedout_reported_once(env, api):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = api.splice(L1, R0, idle=0.3)
    L0.sendall(b"0123456789")
    assert recv_exactly(R1, 10) == b"0123456789"
    assert sp.wait(timeout=10) == errno.ETIMEDOUT
    assert api.geterror(L1) == errno.ETIMEDOUT
    assert api.geterror(L1) == 0
    assert api.geterror(L1) == 0
    assert api.getsplice(L1) == 10
    L0.sendall(b"left")
    assert recv_exactly(L1, 4) == b"left"
    assert_nothing_arrives(R1, 0.05)

    # A new splice forgets an unread reason; its own unsplice reports 0.
    sp2 = api.splice(L1, R0, idle=0.3)
    assert sp2.wait(timeout=10) == errno.ETIMEDOUT
    sp3 = api.splice(L1, R0)
    assert api.geterror(L1) == 0
    assert bounded(api.unsplice, L1) == 0
    assert sp3.error == 0
    assert api.geterror(L1) == 0


def test_openbsd_unsplice_not_spliced_eproto(env, api):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    # Never spliced.
    e = expect_errno(errno.EPROTO, api.unsplice, L1)
    assert "splice" in str(e)
    expect_errno(errno.EPROTO, api.unsplice, L1.fileno())
    # After an unsplice.
    sp = api.splice(L1, R0)
    L0.sendall(b"abc")
    assert recv_exactly(R1, 3) == b"abc"
    assert bounded(api.unsplice, L1) == 3
    expect_errno(errno.EPROTO, api.unsplice, L1)
    expect_errno(errno.EPROTO, sp.unsplice)
    # After a dissolve at the byte limit.
    sp = api.splice(L1, R0, max=2)
    L0.sendall(b"xy")
    assert recv_exactly(R1, 2) == b"xy"
    assert sp.wait(timeout=10) == errno.EFBIG
    expect_errno(errno.EPROTO, api.unsplice, L1)
    expect_errno(errno.EPROTO, sp.unsplice)
    # After a dissolve at EOF.
    sp = api.splice(L1, R0)
    L0.sendall(b"end")
    L0.shutdown(socket.SHUT_WR)
    assert sp.wait(timeout=10) == 0
    assert recv_exactly(R1, 3) == b"end"
    expect_errno(errno.EPROTO, api.unsplice, L1)
    expect_errno(errno.EPROTO, sp.unsplice)
    # A drain is not spliced either.
    expect_errno(errno.EPROTO, api.unsplice, R0)
    assert api.getsplice(L1) == 3
    assert_nothing_arrives(R1, 0.05)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_openbsd_eloop_own_peer(env, api, family):
    a, b = env.pair(family)
    e = expect_errno(errno.ELOOP, api.splice, a, b)
    assert "connection" in str(e)
    expect_errno(errno.ELOOP, api.splice, b, a)
    expect_errno(errno.ELOOP, api.splice, b.fileno(), a.fileno())
    expect_errno(errno.ELOOP, api.splice, a, b, max=5, idle=1.0)
    for s in (a, b):
        expect_errno(errno.EPROTO, api.unsplice, s)
        assert api.getsplice(s) == 0
    # Still refused while `a` is legitimately spliced elsewhere.
    c, d = env.pair(family)
    sp = api.splice(a, c)
    expect_errno(errno.ELOOP, api.splice, b, a)
    b.sendall(b"via a")
    assert recv_exactly(d, 5) == b"via a"
    assert bounded(api.unsplice, a) == 5 == sp.bytes
    expect_errno(errno.EPROTO, api.unsplice, b)
    assert_plain_path(a, b, b"no loop")
    assert_nothing_arrives(d, 0.05)
