"""FreeBSD's socket_splice test cases (tests/sys/kern/socket_splice.c), as the
contract adapts them, plus the contract's error table.

The usual setup is FreeBSD's: two TCP connections L0-L1 and R0-R1; L1 is
spliced into R0 and R0 into L1, so bytes written on L0 come out of R1 and
bytes written on R1 come out of L0.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import time

import pytest

import sosplice
from conftest import (Env, Stream, Pump, assert_nothing_arrives, assert_plain_path,
                      expect_errno, fionread, readable, recv_exactly, recv_until_eof,
                      select_readable, unsplice)


def both_ways(env: Env, lfam: int = socket.AF_INET, rfam: int = socket.AF_INET):
    L0, L1 = env.pair(lfam)
    R0, R1 = env.pair(rfam)
    return L0, L1, R0, R1


# --------------------------------------------------------------------------
# basic


def test_basic(env):
    L0, L1, R0, R1 = both_ways(env)
    assert sosplice.getsplice(L1) == 0
    assert sosplice.getsplice(R0) == 0

    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    assert sp_l.active and sp_r.active
    assert sp_l.error is None and sp_r.error is None
    assert sosplice.getsplice(L1) == 0
    assert sosplice.getsplice(R0) == 0
    assert sp_l.bytes == 0 and sp_r.bytes == 0

    L0.sendall(b"a")
    assert recv_exactly(R1, 1) == b"a"
    assert sosplice.getsplice(L1) == 1
    assert sosplice.getsplice(R0) == 0
    assert sp_l.bytes == 1

    R1.sendall(b"b")
    assert recv_exactly(L0, 1) == b"b"
    assert sosplice.getsplice(L1) == 1
    assert sosplice.getsplice(R0) == 1
    assert sp_r.bytes == 1

    assert unsplice(L1) == 1
    assert unsplice(R0) == 1
    assert not sp_l.active and not sp_r.active
    assert sp_l.error == 0 and sp_r.error == 0
    # The counts survive unsplicing.
    assert sosplice.getsplice(L1) == 1
    assert sosplice.getsplice(R0) == 1
    assert sp_l.bytes == 1 and sp_r.bytes == 1
    # Nothing was left behind or duplicated, and the connections work as
    # plain connections again.
    for s in (L0, L1, R0, R1):
        assert fionread(s) == 0
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


# --------------------------------------------------------------------------
# error: every errno of the contract's table (EPERM needs an unprivileged
# process and is not tested here).


def test_error_max_negative(env):
    L0, L1, R0, R1 = both_ways(env)
    expect_errno(errno.EINVAL, sosplice.splice, L1, R0, max=-3)
    assert sosplice.getsplice(L1) == 0
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_error_idle_negative(env):
    L0, L1, R0, R1 = both_ways(env)
    expect_errno(errno.EINVAL, sosplice.splice, L1, R0, idle=-1.0)
    assert_plain_path(L0, L1)


def test_error_source_is_drain(env):
    L0, L1 = env.pair()
    expect_errno(errno.EINVAL, sosplice.splice, L1, L1)
    expect_errno(errno.EINVAL, sosplice.splice, L1.fileno(), L1)
    assert_plain_path(L0, L1)


def test_error_unsplice_never_spliced(env):
    L0, L1 = env.pair()
    expect_errno(errno.EPROTO, sosplice.unsplice, L1)
    assert_plain_path(L0, L1)


def test_error_unsplice_twice(env):
    L0, L1, R0, R1 = both_ways(env)
    sp = sosplice.splice(L1, R0)
    L0.sendall(b"xyz")
    assert recv_exactly(R1, 3) == b"xyz"
    assert unsplice(L1) == 3
    expect_errno(errno.EPROTO, sosplice.unsplice, L1)
    expect_errno(errno.EPROTO, sp.unsplice)
    assert sosplice.getsplice(L1) == 3
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_error_busy_source(env):
    L0, L1, R0, R1 = both_ways(env)
    X0, X1 = env.pair()
    sp = sosplice.splice(L1, R0)
    expect_errno(errno.EBUSY, sosplice.splice, L1, X0)
    expect_errno(errno.EBUSY, sosplice.splice, L1, R0)
    # The first splice is unharmed and X0 was not made a drain.
    L0.sendall(b"first")
    assert recv_exactly(R1, 5) == b"first"
    assert_nothing_arrives(X1, 0.1)
    assert_plain_path(X0, X1)
    assert unsplice(sp) == 5


def test_error_busy_drain(env):
    L0, L1, R0, R1 = both_ways(env)
    X0, X1 = env.pair()
    sp = sosplice.splice(L1, R0)
    expect_errno(errno.EBUSY, sosplice.splice, X1, R0)
    # The refused source is not spliced: its bytes stay on it.
    X0.sendall(b"mine")
    assert recv_exactly(X1, 4) == b"mine"
    expect_errno(errno.EPROTO, sosplice.unsplice, X1)
    L0.sendall(b"ok")
    assert recv_exactly(R1, 2) == b"ok"
    assert_nothing_arrives(R1, 0.1)
    assert unsplice(sp) == 2


def test_reverse_direction_is_not_busy(env):
    """R0 as the source of one splice and the drain of another is fine."""
    L0, L1, R0, R1 = both_ways(env)
    sp1 = sosplice.splice(L1, R0)
    sp2 = sosplice.splice(R0, L1)
    L0.sendall(b"->")
    R1.sendall(b"<-")
    assert recv_exactly(R1, 2) == b"->"
    assert recv_exactly(L0, 2) == b"<-"
    assert unsplice(sp1) == 2 and unsplice(sp2) == 2


def test_error_not_a_socket(env, tmp_path):
    L0, L1 = env.pair()
    with open(tmp_path / "regular", "w+b") as f:
        expect_errno(errno.ENOTSOCK, sosplice.splice, f.fileno(), L1)
        expect_errno(errno.ENOTSOCK, sosplice.splice, L1, f.fileno())
    assert_plain_path(L0, L1)


def test_error_closed_fd(env):
    L0, L1 = env.pair()
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fd = dead.fileno()
    dead.close()
    assert not os.path.exists(f"/proc/self/fd/{fd}")
    expect_errno(errno.EBADF, sosplice.splice, fd, L1)
    expect_errno(errno.EBADF, sosplice.splice, L1, fd)
    # A closed socket object (fileno() == -1) is not an open fd either.
    expect_errno(errno.EBADF, sosplice.splice, dead, L1)
    expect_errno(errno.EBADF, sosplice.splice, L1, dead)
    assert_plain_path(L0, L1)


def test_error_af_unix(env):
    L0, L1 = env.pair()
    u0, u1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env.track(u0)
    env.track(u1)
    expect_errno(errno.EPROTONOSUPPORT, sosplice.splice, u0, L1)
    expect_errno(errno.EPROTONOSUPPORT, sosplice.splice, L1, u0)
    u0.sendall(b"unix")
    assert recv_exactly(u1, 4) == b"unix"
    assert_plain_path(L0, L1)


def test_error_udp(env):
    L0, L1 = env.pair()
    a = env.track(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    b = env.track(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    expect_errno(errno.EPROTONOSUPPORT, sosplice.splice, a, L1)
    expect_errno(errno.EPROTONOSUPPORT, sosplice.splice, L1, a)
    expect_errno(errno.EPROTONOSUPPORT, sosplice.splice, a, b)
    a.send(b"dgram")
    b.settimeout(5)
    assert b.recv(100) == b"dgram"
    assert_plain_path(L0, L1)


@pytest.mark.parametrize("side", ["source", "drain"])
def test_error_not_connected(env, side):
    L0, L1 = env.pair()
    lone = env.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    if side == "source":
        expect_errno(errno.ENOTCONN, sosplice.splice, lone, L1)
    else:
        expect_errno(errno.ENOTCONN, sosplice.splice, L1, lone)
    # Bound but not connected is still not connected.
    lone.bind(("127.0.0.1", 0))
    args = (lone, L1) if side == "source" else (L1, lone)
    expect_errno(errno.ENOTCONN, sosplice.splice, *args)
    assert_plain_path(L0, L1)


@pytest.mark.parametrize("side", ["source", "drain"])
def test_error_listening(env, side):
    L0, L1 = env.pair()
    lst = env.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    args = (lst, L1) if side == "source" else (L1, lst)
    expect_errno(errno.EOPNOTSUPP, sosplice.splice, *args)
    # The listener still accepts.
    c = env.track(socket.create_connection(lst.getsockname(), timeout=5))
    lst.settimeout(5)
    s, _ = lst.accept()
    env.track(s)
    assert_plain_path(c, s)
    assert_plain_path(L0, L1)


def test_error_loop(env):
    a, b = env.pair()
    expect_errno(errno.ELOOP, sosplice.splice, a, b)
    expect_errno(errno.ELOOP, sosplice.splice, b, a)
    expect_errno(errno.ELOOP, sosplice.splice, a.fileno(), b.fileno())
    assert_plain_path(a, b)


# --------------------------------------------------------------------------
# no read events on a spliced source


def test_no_read_events_on_spliced_source(env):
    L0, L1, R0, R1 = both_ways(env)
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    for s in (L1, R0):
        assert not readable(s, 0.05)
        assert not select_readable(s, 0.05)

    payload_l = os.urandom(1000)
    payload_r = os.urandom(1500)
    L0.sendall(payload_l)
    R1.sendall(payload_r)
    assert recv_exactly(R1, len(payload_l)) == payload_l
    assert recv_exactly(L0, len(payload_r)) == payload_r

    for s in (L1, R0):
        assert not readable(s, 0.1), "spliced data made the source readable"
        assert not select_readable(s, 0.05)
        # Neither a non-blocking nor a blocking recv returns a spliced byte.
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(100)
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(100)
        s.settimeout(10)
    assert sp_l.bytes == 1000 and sp_r.bytes == 1500
    assert unsplice(sp_l) == 1000
    assert unsplice(sp_r) == 1500
    for s in (L1, R0):
        assert not readable(s, 0.0)


# --------------------------------------------------------------------------
# limit bytes / limit timeout


def test_limit_bytes(env):
    L0, L1, R0, R1 = both_ways(env)
    sp = sosplice.splice(L1, R0, max=129)
    back = sosplice.splice(R0, L1)

    block = bytes(range(128))
    L0.sendall(block)
    assert recv_exactly(R1, 128) == block
    assert sosplice.getsplice(L1) == 128
    assert sp.active

    L0.sendall(b"\x80")
    assert recv_exactly(R1, 1) == b"\x80"
    assert sp.wait(timeout=5) == errno.EFBIG
    assert not sp.active and sp.error == errno.EFBIG
    assert sosplice.getsplice(L1) == 129 == sp.bytes

    # The next byte stays on L1.
    L0.sendall(b"Z")
    assert recv_exactly(L1, 1) == b"Z"
    assert_nothing_arrives(R1, 0.1)
    for s in (L0, L1, R0, R1):
        assert fionread(s) == 0
    assert unsplice(back) == 0


def test_limit_bytes_inside_one_write(env):
    """The limit cuts a single large write at the exact byte."""
    L0, L1, R0, R1 = both_ways(env)
    stream = Stream(11)
    total, limit = 300_000, 100_003
    data = stream.read(0, total)
    sp = sosplice.splice(L1, R0, max=limit)
    L0.sendall(data)
    assert recv_exactly(R1, limit) == data[:limit]
    assert sp.wait(timeout=5) == errno.EFBIG
    assert sp.bytes == limit
    assert_nothing_arrives(R1, 0.1)
    assert recv_exactly(L1, total - limit) == data[limit:]
    assert fionread(L1) == 0


def test_limit_timeout(env):
    L0, L1, R0, R1 = both_ways(env)
    sp = sosplice.splice(L1, R0, idle=0.5)
    block = os.urandom(128)
    L0.sendall(block)
    assert recv_exactly(R1, 128) == block
    last = time.monotonic()
    assert sp.wait(timeout=5) == errno.ETIMEDOUT
    quiet = time.monotonic() - last
    assert quiet >= 0.45, f"dissolved after only {quiet:.3f} s of inactivity"
    assert sp.bytes == 128
    # A new byte stays on L1.
    L0.sendall(b"!")
    assert recv_exactly(L1, 1) == b"!"
    assert_nothing_arrives(R1, 0.1)


def test_idle_is_rearmed_by_traffic(env):
    L0, L1, R0, R1 = both_ways(env)
    sp = sosplice.splice(L1, R0, idle=0.5)
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 1.5:
        L0.sendall(bytes([i]))
        assert recv_exactly(R1, 1) == bytes([i])
        i += 1
        time.sleep(0.15)
    assert sp.active, "idle timeout fired although bytes kept moving"
    last = time.monotonic()
    assert sp.wait(timeout=5) == errno.ETIMEDOUT
    assert time.monotonic() - last >= 0.3
    assert sp.bytes == i


# --------------------------------------------------------------------------
# nonblock


def test_nonblock(env):
    L0, L1, R0, R1 = both_ways(env)
    for s in (L0, L1, R0, R1):
        s.setblocking(False)
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)

    # Contract 11: beyond the sockets' own buffers the kernel holds at most
    # the splice's cap (a few MiB). So a writer must see EAGAIN once the
    # four sockets' largest buffers plus a generous 32 MiB are full.
    def sysctl_max(name: str) -> int:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])

    cap = 2 * (sysctl_max("tcp_rmem") + sysctl_max("tcp_wmem")) + (32 << 20)

    def fill(sock: socket.socket, tag: int) -> bytes:
        sent = bytearray()
        block = 0
        while True:
            data = bytes([tag, block & 0xFF, (block >> 8) & 0xFF]) + os.urandom(197)
            try:
                n = sock.send(data)
            except BlockingIOError:
                return bytes(sent)
            sent += data[:n]
            block += 1
            assert len(sent) < cap, f"no EAGAIN after {cap >> 20} MiB: no backpressure"

    out_l = fill(L0, 1)
    out_r = fill(R1, 2)
    assert len(out_l) > 0 and len(out_r) > 0
    got_l = bytearray()
    got_r = bytearray()
    deadline = time.monotonic() + 30
    while len(got_l) < len(out_l) or len(got_r) < len(out_r):
        assert time.monotonic() < deadline, (len(got_l), len(out_l), len(got_r), len(out_r))
        select.select([R1, L0], [], [], 0.2)
        for s, buf, want in ((R1, got_l, out_l), (L0, got_r, out_r)):
            if len(buf) < len(want):
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    continue
                assert data, "EOF"
                buf += data
    assert bytes(got_l) == out_l
    assert bytes(got_r) == out_r
    assert_nothing_arrives(R1, 0.05)
    assert_nothing_arrives(L0, 0.05)
    assert unsplice(sp_l) == len(out_l)
    assert unsplice(sp_r) == len(out_r)


# --------------------------------------------------------------------------
# resplice


def test_resplice(env):
    L0, L1, R0, R1 = both_ways(env)
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    L0.sendall(b"12")
    R1.sendall(b"345")
    assert recv_exactly(R1, 2) == b"12"
    assert recv_exactly(L0, 3) == b"345"
    assert unsplice(L1) == 2
    assert unsplice(R0) == 3
    assert (sosplice.getsplice(L1), sosplice.getsplice(R0)) == (2, 3)

    sp_l2 = sosplice.splice(L1, R0)
    sp_r2 = sosplice.splice(R0, L1)
    assert (sosplice.getsplice(L1), sosplice.getsplice(R0)) == (0, 0)
    assert sp_l2.bytes == 0 and sp_r2.bytes == 0
    # The old handles keep their final counts.
    assert sp_l.bytes == 2 and sp_r.bytes == 3

    L0.sendall(b"abcdefg")
    R1.sendall(b"hi")
    assert recv_exactly(R1, 7) == b"abcdefg"
    assert recv_exactly(L0, 2) == b"hi"
    assert (sosplice.getsplice(L1), sosplice.getsplice(R0)) == (7, 2)
    assert unsplice(sp_l2) == 7
    assert unsplice(sp_r2) == 2
    for s in (L0, L1, R0, R1):
        assert fionread(s) == 0


def test_resplice_after_bytes_left_on_source(env):
    """Bytes left on the source by a max-limited splice move with the next one."""
    L0, L1, R0, R1 = both_ways(env)
    stream = Stream(5)
    data = stream.read(0, 50_000)
    sp = sosplice.splice(L1, R0, max=20_000)
    L0.sendall(data)
    assert recv_exactly(R1, 20_000) == data[:20_000]
    assert sp.wait(timeout=5) == errno.EFBIG
    sp2 = sosplice.splice(L1, R0)
    assert recv_exactly(R1, 30_000) == data[20_000:]
    assert sp2.bytes == 30_000
    assert unsplice(sp2) == 30_000
    assert fionread(L1) == 0


# --------------------------------------------------------------------------
# v4v6


def test_v4v6(env):
    L0, L1, R0, R1 = both_ways(env, socket.AF_INET, socket.AF_INET6)
    assert L1.family == socket.AF_INET and R0.family == socket.AF_INET6
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    total = 4 << 20
    a = env.start(Pump(L0, R1, Stream(1), total, deadline=30))
    b = env.start(Pump(R1, L0, Stream(2), total, deadline=30))
    a.check(30)
    b.check(30)
    a.assert_intact()
    b.assert_intact()
    assert sp_l.bytes == total and sp_r.bytes == total
    # EOF both ways ends both splices with 0; the drains are left open.
    L0.shutdown(socket.SHUT_WR)
    R1.shutdown(socket.SHUT_WR)
    assert sp_l.wait(timeout=10) == 0
    assert sp_r.wait(timeout=10) == 0
    assert recv_until_eof(L1, 5) == b""
    assert recv_until_eof(R0, 5) == b""
    assert_nothing_arrives(R1, 0.05)  # R0 was not shut down by the splice
    assert_nothing_arrives(L0, 0.05)


def test_splice_under_a_default_timeout(env, splicer):
    """An application that set socket.setdefaulttimeout() splices as any
    other: the call returns at once, bytes move, and its sockets keep their
    blocking mode. (The engine's dups inherited the default timeout: on bpf
    a recv(MSG_DONTWAIT) on the source then waited out the timeout and
    splice() failed with TimeoutError; and making a dup turned O_NONBLOCK
    on in the file the application shares.)"""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    blocking = [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK) for s in (L1, R0)]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3.0)
    try:
        t0 = time.monotonic()
        sp = splicer.splice(L1, R0)
        took = time.monotonic() - t0
    finally:
        socket.setdefaulttimeout(old)
    assert took < 2.0, f"splice() took {took:.1f} s"
    if splicer.backend == "bpf":  # the worker holds O_NONBLOCK while spliced
        assert [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
                for s in (L1, R0)] == blocking
    L0.sendall(b"x" * 1000)
    assert recv_exactly(R1, 1000) == b"x" * 1000
    L0.shutdown(socket.SHUT_WR)
    assert sp.wait(timeout=10) == 0 and sp.bytes == 1000
    assert [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
            for s in (L1, R0)] == blocking
