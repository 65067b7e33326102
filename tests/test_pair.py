"""splice_pair(): both directions of a connection in one call, the engine
sharing the application's two sockets (no dup; docs/api.md, splice_pair).

Layout as in test_basic: connections L0-L1 and R0-R1, L1 and R0 paired, so
bytes written on L0 come out of R1 and bytes written on R1 out of L0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import time

import pytest

from conftest import (Pump, Receiver, Stream, _fd_count, assert_nothing_arrives, assert_plain_path,
                      expect_errno, recv_exactly)

MiB = 1 << 20


def test_pair_moves_both_ways_on_the_callers_fds(env, splicer, backend):
    """Each direction is intact (sha256), ends with 0 at its EOF, and the
    engine holds no fd of its own for the sockets: bpf adds none, worker
    only the two pipes (4 fds)."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    for s in (L0, R1):
        s.setblocking(False)
    before = _fd_count()
    assert L1.gettimeout() != 0.0
    ab, ba = splicer.splice_pair(L1, R0, label="t")
    assert _fd_count() - before == (0 if backend == "bpf" else 4)
    assert L1.gettimeout() == 0.0 and R0.gettimeout() == 0.0
    size = 24 * MiB
    a = env.start(Pump(L0, R1, Stream(11), size, shutdown=True, deadline=60))
    b = env.start(Pump(R1, L0, Stream(12), size + 7, shutdown=True, deadline=60))
    a.check(70)
    b.check(70)
    a.assert_intact()
    b.assert_intact()
    assert ab.wait(10) == 0 and ba.wait(10) == 0
    assert (ab.bytes, ba.bytes) == (size, size + 7)
    rows = {(r.source_cookie, r.drain_cookie): r for r in splicer.stats()}
    assert len(rows) == 2 and {r.label for r in rows.values()} == {"t"}
    # Ended, the sockets are still the caller's, open, and nothing more
    # arrives at either peer.
    assert _fd_count() == before
    for s in (L1, R0):
        assert s.fileno() >= 0 and os.fstat(s.fileno())
    assert_nothing_arrives(R1, 0.05)
    assert_nothing_arrives(L0, 0.05)


def test_pair_unspliced_leaves_plain_sockets(env, splicer):
    """unsplice() of each direction: what moved arrived, and the sockets
    carry bytes as plain connections again."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    ab, ba = splicer.splice_pair(L1, R0)
    L0.sendall(b"x" * 1000)
    R1.sendall(b"y" * 2000)
    assert recv_exactly(R1, 1000) == b"x" * 1000
    assert recv_exactly(L0, 2000) == b"y" * 2000
    assert ab.unsplice() == 1000 and ba.unsplice() == 2000
    assert ab.error == 0 and ba.error == 0
    L1.setblocking(True)
    R0.setblocking(True)
    L1.settimeout(5)
    R0.settimeout(5)
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)
    # And they can be paired again.
    ab, ba = splicer.splice_pair(L1, R0)
    L0.sendall(b"again")
    assert recv_exactly(R1, 5) == b"again"
    ab.unsplice()
    ba.unsplice()


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _abort(s: socket.socket) -> None:
    """connect(AF_UNSPEC): the connection is reset at once (what
    `splicectl proxy` does to cut one)."""
    _libc.connect(s.fileno(), bytes(16), 16)


@pytest.mark.parametrize("side", ["one", "both"])
def test_pair_ends_when_the_connection_is_aborted(env, splicer, side):
    """Aborting a paired socket's connection (or both) ends both splices
    promptly, with traffic running: the proxy closes the fds only then.

    With one side aborted, the splice from it still delivers what arrived
    before the abort (semantics 7), so the other side's peer keeps
    reading: the pump that read it stops when its own writes fail."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    for s in (L0, R1):
        s.setblocking(False)
    ab, ba = splicer.splice_pair(L1, R0)
    a = env.start(Pump(L0, R1, Stream(21), 1 << 40, deadline=30))
    b = env.start(Pump(R1, L0, Stream(22), 1 << 40, deadline=30))
    deadline = time.monotonic() + 20
    while (ab.bytes < 4 * MiB or ba.bytes < 4 * MiB) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ab.bytes >= 4 * MiB and ba.bytes >= 4 * MiB
    _abort(L1)
    if side == "both":
        _abort(R0)
    else:
        env.start(Receiver(R1, deadline=20))
    errs = ab.wait(10), ba.wait(10)
    assert any(errs), f"an aborted connection ended as clean: {errs}"
    a.stop()
    b.stop()


def test_pair_refusals(env, splicer):
    """Bad pairs are refused with the errno of splice(), and a refused pair
    leaves both sockets unspliced and untouched."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    with pytest.raises(TypeError):
        splicer.splice_pair(L1.fileno(), R0)
    expect_errno(errno.EINVAL, splicer.splice_pair, L1, L1)
    expect_errno(errno.ELOOP, splicer.splice_pair, L0, L1)
    lone = env.track(socket.socket())
    expect_errno(errno.ENOTCONN, splicer.splice_pair, L1, lone)
    closed = socket.socket()
    closed.close()
    expect_errno(errno.EBADF, splicer.splice_pair, closed, R0)
    # One socket already spliced: EBUSY, and the other is not spliced.
    X0, X1 = env.pair()
    sp = splicer.splice(X1, R0)
    expect_errno(errno.EBUSY, splicer.splice_pair, L1, R0)
    expect_errno(errno.EBUSY, splicer.splice_pair, R0, L1)
    assert sp.active and splicer.getsplice(L1) == 0
    assert {(r.source_cookie, r.state) for r in splicer.stats()} == {(sp._rec.src_cookie, "active")}
    sp.unsplice()
    assert_plain_path(L0, L1)


def test_pair_and_splice_mix_on_one_engine(env, splicer):
    """A pair's sockets and separately spliced sockets in one engine: fd
    numbers of one never confuse the other's events (one watch per fd)."""
    pairs, singles = [], []
    for i in range(8):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        if i % 2:
            pairs.append((L0, R1, splicer.splice_pair(L1, R0)))
        else:
            singles.append((L0, R1, (splicer.splice(L1, R0), splicer.splice(R0, L1))))
    for k, (L0, R1, (ab, ba)) in enumerate(pairs + singles):
        msg = f"{k}".encode() * 1000
        L0.sendall(msg)
        R1.sendall(msg[::-1])
        assert recv_exactly(R1, len(msg)) == msg
        assert recv_exactly(L0, len(msg)) == msg[::-1]
    for _, _, (ab, ba) in pairs + singles:
        ab.unsplice()
        ba.unsplice()


def test_engine_driven_by_the_applications_loop(env, backend):
    """Splicer(thread=False): on bpf no controller thread runs; the test's
    own loop drives the engine through fileno()/timeout()/reap(), and
    wait() and unsplice() drive it themselves. Bulk both ways stays
    intact (sha256), and an ended splice is reaped through fileno()."""
    import select
    import threading

    import sosplice

    before = {t.name for t in threading.enumerate()}
    eng = sosplice.Splicer(backend=backend, thread=False)
    env.closers.append(eng.close)
    if backend == "bpf":
        assert {t.name for t in threading.enumerate()} == before
        assert eng.timeout() is not None
    else:
        assert eng.timeout() is None   # the worker backend runs its threads
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    for s in (L0, R1):
        s.setblocking(False)
    ab, ba = eng.splice_pair(L1, R0)
    size = 16 * MiB
    a = env.start(Pump(L0, R1, Stream(31), size, shutdown=True, deadline=60))
    b = env.start(Pump(R1, L0, Stream(32), size, deadline=60))
    reaped = []
    deadline = time.monotonic() + 60
    # The engine moves only while driven: until both pumps are done.
    while (ab not in reaped or a.is_alive() or b.is_alive()) and time.monotonic() < deadline:
        t = eng.timeout()
        select.select([eng.fileno()], [], [], 0.5 if t is None else min(t, 0.5))
        reaped += eng.reap()
    assert reaped == [ab] and ab.error == 0 and ab.bytes == size
    a.check(1)
    b.check(1)
    a.assert_intact()
    b.assert_intact()
    assert ba.active
    assert ba.unsplice() == size    # drives the engine until flushed
    assert ba.wait(1) == 0
