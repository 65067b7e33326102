"""Bulk transfers through splices: integrity, EOF, unsplice, drain failure,
many splices at once. Every test checks the bytes with sha256 against the
deterministic stream that was sent.
"""
from __future__ import annotations

import errno
import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

import sosplice
from conftest import (Pump, Receiver, Sender, Stream, _fd_count, assert_nothing_arrives,
                      fionread, recv_exactly, recv_until_eof, sha, tcp_pair, tcp_written,
                      unsplice, wait_until)

MiB = 1 << 20
STEP = 10.0


def _is_live(rec) -> bool:
    """A stats() record describes a splice that has not finished."""
    state = getattr(rec, "state", None)
    if state is not None:
        return str(getattr(state, "value", state)) in ("active", "dissolving")
    active = getattr(rec, "active", None)
    if active is not None:
        return bool(active)
    return getattr(rec, "error", None) is None


# --------------------------------------------------------------------------
# throughput


@pytest.mark.slow
def test_throughput_1gib_each_way(env):
    """FreeBSD's throughput case: 1 GiB each way at the same time."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    total = 1 << 30
    t0 = time.monotonic()
    a = env.start(Pump(L0, R1, Stream(101), total, deadline=300))
    b = env.start(Pump(R1, L0, Stream(202), total, deadline=300))
    a.check(310)
    b.check(310)
    elapsed = time.monotonic() - t0
    print(f"\n2 x 1 GiB through a bidirectional splice in {elapsed:.1f} s "
          f"({2 * total / elapsed / 1e9:.2f} GB/s total)")
    a.assert_intact()
    b.assert_intact()
    assert sp_l.bytes == total and sp_r.bytes == total
    L0.shutdown(socket.SHUT_WR)
    R1.shutdown(socket.SHUT_WR)
    assert sp_l.wait(timeout=10) == 0
    assert sp_r.wait(timeout=10) == 0
    assert sosplice.getsplice(L1) == total and sosplice.getsplice(R0) == total


# --------------------------------------------------------------------------
# under CPU load


@pytest.fixture
def cpu_hogs():
    """Two busy-loop processes beside the test, as many as this VM has CPUs:
    the bpf backend once duplicated bytes only when its controller, the
    verdict and the endpoints fought for the CPUs (docs/design.md, "Why the
    ctl value lives in an array"). Killed and reaped at teardown."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        yield hogs
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def _bulk_both_ways_under_load(env, reps: int, size: int, how: str) -> None:
    for rep in range(reps):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        if how == "pair":
            sp_l, sp_r = sosplice.splice_pair(L1, R0)
        else:
            sp_l = sosplice.splice(L1, R0)
            sp_r = sosplice.splice(R0, L1)
        # Different streams each way: a byte sent back the way it came (a
        # verdict that read the other direction's drain) fails the hash too.
        a = env.start(Pump(L0, R1, Stream(300 + rep), size, deadline=120))
        b = env.start(Pump(R1, L0, Stream(400 + rep), size, deadline=120))
        a.check(130)
        b.check(130)
        a.assert_intact()
        b.assert_intact()
        assert sp_l.bytes == size and sp_r.bytes == size
        # Nothing beyond the stream arrives on either side.
        assert_nothing_arrives(R1, 0.05)
        assert_nothing_arrives(L0, 0.05)
        unsplice(L1)
        unsplice(R0)


@pytest.mark.parametrize("how", ["two_splices", "pair"])
def test_bulk_both_ways_under_cpu_load(env, cpu_hogs, how):
    """Bidirectional bulk with two CPU hogs beside it, sha256 at both ends
    (issue 11, item 1: 130,224 bytes duplicated in 2 x 128 MiB on bpf);
    as two splice() calls, and as splice_pair(), whose two directions
    share each socket's fd (one epoll registration for two roles)."""
    _bulk_both_ways_under_load(env, reps=4 if how == "two_splices" else 2, size=64 * MiB, how=how)


@pytest.mark.soak
@pytest.mark.parametrize("how", ["two_splices", "pair"])
def test_bulk_both_ways_under_cpu_load_soak(env, cpu_hogs, how):
    """The same, long: 100 runs of 2 x 128 MiB (make soak)."""
    _bulk_both_ways_under_load(env, reps=100, size=128 * MiB, how=how)


@pytest.mark.parametrize("size", [1, 1000, 65536 + 3, 3 * MiB + 5])
def test_transfer_sizes_both_ways(env, size):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    a = env.start(Pump(L0, R1, Stream(size), size, shutdown=True, deadline=10))
    b = env.start(Pump(R1, L0, Stream(size + 1), size, shutdown=True, deadline=10))
    a.check(15)
    b.check(15)
    a.assert_intact()
    b.assert_intact()
    assert sp_l.wait(timeout=10) == 0
    assert sp_r.wait(timeout=10) == 0
    assert sp_l.bytes == size and sp_r.bytes == size
    # Both sources are at EOF and empty; the drains were left open.
    assert recv_until_eof(L1, 5) == b""
    assert recv_until_eof(R0, 5) == b""
    assert_nothing_arrives(R1, 0.05)
    assert_nothing_arrives(L0, 0.05)


# --------------------------------------------------------------------------
# EOF with a slow reader


def test_eof_waits_for_slow_drain(env):
    """EOF dissolves with 0 only once the drain's socket took every byte;
    the app then shuts the drain down and the peer gets all of it + EOF."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    total = 20_000_000
    stream = Stream(20)
    # Bytes the drain's socket has taken, counted from here (a client's
    # tcpi_bytes_acked includes its SYN).
    base = tcp_written(R0)
    sp = sosplice.splice(L1, R0)
    sender = env.start(Sender(L0, stream, total, shutdown=True, deadline=60))
    # Slow at first: 4 KiB reads with 3 ms sleeps for about a second.
    reader = env.start(Receiver(R1, slow=(300, 4096, 0.003), deadline=60))

    assert sp.wait(timeout=60) == 0
    taken = tcp_written(R0) - base
    sender.check(5)
    assert sender.sent == total
    assert sp.bytes == total
    # "Dissolved" means flushed: the drain's socket holds (or has sent)
    # every moved byte, so shutting it down now loses nothing.
    assert taken == total, f"wait() returned with only {taken} of {total} bytes in the drain"
    assert not reader.eof, "the splice shut the drain down; the contract says it must not"
    shut_at = time.monotonic()
    R0.shutdown(socket.SHUT_WR)

    reader.check(30)
    assert reader.eof and reader.eof_at >= shut_at
    assert reader.count == total
    assert reader.hash.hexdigest() == sender.hash.hexdigest() == stream.sha256(0, total)
    # The source is a normal socket at EOF now.
    assert recv_until_eof(L1, 5) == b""
    assert sosplice.getsplice(L1) == total


def test_eof_one_way_while_other_way_busy(env):
    """Bidirectional splice: EOF ends R0->L1 while L1->R0 is moving bytes
    into R0 at full speed. Every byte of L1->R0 must still arrive, intact.

    Repeated because the window is a race (about 1 in 10 lost 256 KiB
    with the first implementation).
    """
    total = 16 * MiB
    for trial in range(10):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        stream = Stream(1000 + trial)
        sp_l = sosplice.splice(L1, R0)
        sp_r = sosplice.splice(R0, L1)
        sender = env.start(Sender(L0, stream, total, shutdown=False, deadline=8))
        reader = env.start(Receiver(R1, expect=total, until_eof=False, deadline=8))
        wait_until(lambda: reader.count >= total // 4, 8, "a quarter through the splice")
        R1.shutdown(socket.SHUT_WR)
        assert sp_r.wait(timeout=5) == 0
        assert sp_r.bytes == 0
        sender.join(10)
        reader.join(10)
        assert sender.sent == reader.count == total, (
            f"trial {trial}: sent {sender.sent}, R1 got {reader.count} of {total}, "
            f"splice says {sp_l.bytes} moved")
        sender.check(0)
        reader.check(0)
        assert reader.hash.hexdigest() == stream.sha256(0, total), f"trial {trial}: corrupted"
        assert sp_l.active
        L0.shutdown(socket.SHUT_WR)
        assert sp_l.wait(timeout=5) == 0
        assert sp_l.bytes == total
        for s in (L0, L1, R0, R1):
            s.close()


# --------------------------------------------------------------------------
# unsplice in the middle of a transfer


def test_unsplice_mid_transfer_is_lossless(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    total = 64 * MiB
    stream = Stream(64)
    sp = sosplice.splice(L1, R0)
    # The sender pauses at 24 MiB until the test has unspliced, so the
    # unsplice always lands while the transfer is under way.
    sender = env.start(Sender(L0, stream, total, shutdown=True, gate_at=24 * MiB, deadline=60))
    reader = env.start(Receiver(R1, deadline=60))
    wait_until(lambda: reader.count >= 8 * MiB, 20, "8 MiB through the splice")
    moved = unsplice(L1)
    assert 8 * MiB <= moved <= 24 * MiB
    assert not sp.active and sp.error == 0 and sp.bytes == moved
    sender.gate.set()

    # Everything moved reaches the drain's peer; then the app's EOF.
    R0.shutdown(socket.SHUT_WR)
    reader.check(30)
    assert reader.eof
    assert reader.count == moved, f"drain's peer got {reader.count}, splice moved {moved}"

    # The rest is read from the source with plain recv, until the sender's EOF.
    h = reader.hash.copy()
    rest = 0
    deadline = time.monotonic() + 30
    L1.settimeout(1.0)
    while True:
        assert time.monotonic() < deadline, f"source EOF missing after {rest} bytes"
        try:
            data = L1.recv(MiB)
        except TimeoutError:
            continue
        if not data:
            break
        h.update(data)
        rest += len(data)
    sender.check(10)
    assert sender.sent == total
    assert moved + rest == total, (moved, rest, total)
    assert h.hexdigest() == sender.hash.hexdigest() == stream.sha256(0, total)
    assert sosplice.getsplice(L1) == moved


def test_sockets_are_plain_after_the_engine_closes(env, backend):
    """Issue 11, item 2: after `Splicer.close()` a former source and drain
    behave as plain sockets. Bytes the close left on the source (passed by
    a throttled splice and never taken) are readable there, in order after
    what reached the drain; so are bytes sent after the close, and the
    drain carries a plain send both ways. On bpf the former source stayed
    in a sockmap that close() tore down under it: FIONREAD showed the bytes
    and recv() never returned them."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    M0, M1 = env.pair()
    N0, N1 = env.pair()
    stream = Stream(77)
    first = 8 * MiB
    eng = sosplice.Splicer(backend=backend, backlog_cap=1 << 16)
    try:
        sp = eng.splice(L1, R0)
        other = eng.splice(M1, N0)
        M0.sendall(b"before")
        assert recv_exactly(N1, 6) == b"before"
        # R1 reads nothing at first: the splice throttles, bytes wait on L1.
        sender = env.start(Sender(L0, stream, first, shutdown=False, deadline=60))
        last = -1
        while sp.bytes != last:
            last = sp.bytes
            time.sleep(0.3)
        assert sp.bytes < first, "the splice never throttled"
        drained = env.start(Receiver(R1, keep=True, deadline=60))
    finally:
        eng.close()
    M0.sendall(b"right after close")
    assert not sp.active and sp.error == 0 and other.error == 0
    moved = sp.bytes
    R0.shutdown(socket.SHUT_WR)
    drained.check(30)
    assert drained.count == moved
    rest = env.start(Receiver(L1, expect=first - moved, until_eof=False, keep=True, deadline=60))
    rest.check(60)                                     # what was left on the source
    sender.check(10)
    assert sha(bytes(drained.data) + bytes(rest.data)) == stream.sha256(0, first)
    L0.sendall(b"after close")
    assert recv_exactly(L1, 11) == b"after close"
    assert fionread(L1) == 0
    R1.sendall(b"up")
    assert recv_exactly(R0, 2) == b"up"
    # The case: bytes sent right after close(), while a bpf engine
    # used to tear its sockmap down under the former source.
    assert recv_exactly(M1, 17) == b"right after close"
    N1.sendall(b"back")
    assert recv_exactly(N0, 4) == b"back"


# --------------------------------------------------------------------------
# a drain reset by its peer


def test_drain_reset_by_peer(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(7)
    sp = sosplice.splice(L1, R0)
    sender = env.start(Sender(L0, stream, 1 << 34, shutdown=False, deadline=60))
    first = recv_exactly(R1, MiB)
    assert first == stream.read(0, MiB)

    R1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    R1.close()
    err = sp.wait(timeout=10)
    assert err == errno.EPIPE, f"dissolved with {errno.errorcode.get(err, err)}"
    assert sosplice.geterror(L1) == err
    assert sosplice.geterror(L1) == 0

    # Stop the sender, end its stream, and take what is left on the source.
    sender.stop()
    sender.check(10)
    L0.shutdown(socket.SHUT_WR)
    left = recv_until_eof(L1, 20, limit=1 << 31)
    moved = sp.bytes
    assert moved >= MiB
    assert moved + len(left) == sender.sent, (moved, len(left), sender.sent)
    # What stayed on the source is exactly the unmoved tail of the stream.
    assert sha(left) == stream.sha256(moved, len(left))
    assert sosplice.getsplice(L1) == moved


@pytest.mark.parametrize("back_busy", [False, True], ids=["back_quiet", "back_busy"])
def test_source_reset_by_peer_ends_with_econnreset(env, splicer, back_busy):
    """Issue 11, item 3: a source whose peer resets ends its splice with
    ECONNRESET, never 0, after moving every byte that came before the
    reset; the opposite splice, whose drain is that socket, ends with
    EPIPE. Ten connections in a row, the opposite direction quiet or
    streaming when the reset comes. (bpf ended it with 0: EPOLLRDHUP comes
    with a FIN and a reset alike, and the reset's sk_err is consumed by
    the first send on the socket, often the kernel's own. The worker did
    the same 4 times in 40 when the opposite direction's send took it.)"""
    for i in range(10):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        stream = Stream(80 + i)
        sp = splicer.splice(L1, R0)
        back = splicer.splice(R0, L1)
        if back_busy:
            pump = env.start(Sender(R1, Stream(90 + i), 1 << 40, shutdown=False, deadline=60))
            # L0 stops reading after 1 MiB: the opposite splice then has
            # bytes queued for L0 when it resets (and L0 closes unread).
            sink = env.start(Receiver(L0, expect=MiB, until_eof=False, deadline=60))
            sink.check(30)
        L0.sendall(stream.read(0, 300_000))
        assert recv_exactly(R1, 300_000) == stream.read(0, 300_000)
        L0.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        L0.close()
        err = sp.wait(timeout=10)
        assert err == errno.ECONNRESET, f"run {i}: ended with {errno.errorcode.get(err, err)}"
        assert sp.bytes == 300_000
        if not back_busy:
            R1.sendall(b"to a reset peer")
        err = back.wait(timeout=10)
        assert err == errno.EPIPE, f"run {i}: opposite ended with {errno.errorcode.get(err, err)}"
        if back_busy:
            pump.stop()
            pump.check(10)
        R1.close()


# --------------------------------------------------------------------------
# many splices at once


def test_500_concurrent_splices(env, splicer):
    n = 500
    stream = Stream(500)
    fds_before = _fd_count()
    pairs = [(env.pair(), env.pair()) for _ in range(n)]
    sizes = [1024 + (i * 2654435761) % 7168 for i in range(n)]
    sps = [splicer.splice(a1, b0) for (a0, a1), (b0, b1) in pairs]
    assert all(sp.active for sp in sps)
    assert sum(1 for r in splicer.stats() if _is_live(r)) == n

    for i, ((a0, a1), _) in enumerate(pairs):
        a0.sendall(stream.read(i * 8192, sizes[i]))

    got = [bytearray() for _ in range(n)]
    poller = select.poll()
    by_fd = {}
    for i, (_, (b0, b1)) in enumerate(pairs):
        poller.register(b1, select.POLLIN)
        by_fd[b1.fileno()] = i
    remaining = n
    deadline = time.monotonic() + 30
    while remaining:
        assert time.monotonic() < deadline, f"{remaining} splices still incomplete"
        for fd, _ev in poller.poll(200):
            i = by_fd[fd]
            data = os.read(fd, 65536)
            assert data, f"EOF on splice {i}"
            got[i] += data
            if len(got[i]) >= sizes[i]:
                poller.unregister(fd)
                remaining -= 1
    for i in range(n):
        assert sha(bytes(got[i])) == stream.sha256(i * 8192, sizes[i]), f"splice {i} corrupted"
        assert sps[i].bytes == sizes[i]

    # Even splices end at EOF; odd ones by the app closing both spliced
    # sockets while they are still active.
    for i, ((a0, a1), (b0, b1)) in enumerate(pairs):
        if i % 2 == 0:
            a0.shutdown(socket.SHUT_WR)
        else:
            a1.close()
            b0.close()
    deadline = time.monotonic() + 30
    for i, sp in enumerate(sps):
        err = sp.wait(timeout=max(0.1, deadline - time.monotonic()))
        if i % 2 == 0:
            assert err == 0, f"splice {i} ended with {err}"
        assert sp.bytes == sizes[i]
    for i, (_, (b0, b1)) in enumerate(pairs):
        if i % 2 == 0:
            assert fionread(b1) == 0, f"extra bytes on splice {i}"
    assert not [r for r in splicer.stats() if _is_live(r)]

    for (a0, a1), (b0, b1) in pairs:
        for s in (a0, a1, b0, b1):
            s.close()
    wait_until(lambda: _fd_count() <= fds_before, 5,
               f"fd count back to {fds_before} (now {_fd_count()})")
    stats = splicer.stats()
    assert not [r for r in stats if _is_live(r)]
    assert len(stats) <= n
    assert all(r.bytes in set(sizes) for r in stats)


def test_answer_and_fin_before_the_splice(env):
    """A proxy's upstream answers and closes before the answer's splice
    starts, while the upstream socket is already the drain of the request's
    splice. Every byte of the answer must reach the client.

    On bpf, being a drain gives the upstream socket a psock: FIONREAD then
    reads 0 whatever its TCP queue holds, and a read can see EOF once before
    the data (measured on 6.18; both lost the whole answer).
    """
    client, front = env.pair()
    up, server = env.pair()
    req = sosplice.splice(front, up)
    answer = os.urandom(50_000)   # fits the receive window: all of it is queued
    server.sendall(answer)
    server.shutdown(socket.SHUT_WR)
    wait_until(lambda: fionread_tcp(up) == len(answer), STEP, "answer queued on the upstream socket")
    client.shutdown(socket.SHUT_WR)
    resp = sosplice.splice(up, front)
    assert resp.wait(STEP) == 0 and resp.bytes == len(answer)
    front.shutdown(socket.SHUT_WR)
    assert recv_until_eof(client) == answer
    assert req.wait(STEP) == 0 and req.bytes == 0


def fionread_tcp(s: socket.socket) -> int:
    """Bytes in the TCP receive queue, read without FIONREAD (which a psock
    answers for its own queue): MSG_PEEK of everything."""
    try:
        return len(s.recv(1 << 22, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return 0


def test_answers_and_fins_racing_the_splice(env):
    """The same race as a proxy meets it, many times: the upstream sends
    its answer and FIN the moment it accepts, the client half-closes at
    once, and the proxy splices both ways meanwhile."""
    import concurrent.futures as cf
    import random
    import threading

    lsock = env.track(socket.create_server(("127.0.0.1", 0), backlog=512))
    answers: dict[int, bytes] = {}

    def serve() -> None:
        while True:
            try:
                s, _ = lsock.accept()
            except OSError:
                return
            with s:
                n = s.recv(4)
                if len(n) < 4:
                    return
                i = int.from_bytes(n, "big")
                s.settimeout(STEP)
                try:
                    s.sendall(answers[i])
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(1 << 16):
                        pass
                except OSError:
                    # Reset by a client that gave up on a lost answer
                    # (reported by one() below): serve the others. A dead
                    # server thread left its share of the connections
                    # unserved, and a few losses turned into timeouts.
                    pass

    def one(i: int) -> str | None:
        answers[i] = random.Random(i).randbytes(random.Random(-i).randrange(1, 200_000))
        client, front = tcp_pair()
        up = socket.create_connection(lsock.getsockname(), timeout=STEP)
        with client, front, up:
            up.sendall(i.to_bytes(4, "big"))
            client.shutdown(socket.SHUT_WR)
            req = sosplice.splice(front, up)
            resp = sosplice.splice(up, front)
            if resp.wait(STEP) != 0:
                return f"{i}: answer splice ended with {resp.error}"
            front.shutdown(socket.SHUT_WR)
            req.wait(STEP)
            got = recv_until_eof(client)
        return None if got == answers[i] else f"{i}: got {len(got)} of {len(answers[i])} bytes"

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        with cf.ThreadPoolExecutor(16) as ex:
            bad = [r for r in ex.map(one, range(400)) if r]
    finally:
        lsock.shutdown(socket.SHUT_RDWR)
        lsock.close()
        for t in threads:
            t.join(STEP)
    assert not bad, bad[:5]


def test_data_and_fin_in_one_segment(env, splicer):
    """The last bytes and the FIN in one segment, many times: the splice
    ends with 0 only after moving them. TCP wakes the socket's waiters for
    the FIN (EPOLLRDHUP) before it runs the verdict on the segment's data,
    so a controller on the other CPU could see EOF with nothing counted
    yet, end the splice, and leave the bytes behind (the drain's peer would
    take a cut stream for a whole one)."""
    for i in range(200):
        L0, L1 = env.pair()
        R0, R1 = env.pair()
        sp = splicer.splice(L1, R0)
        data = bytes([i % 256]) * (100 + i)
        L0.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        L0.send(data)
        L0.shutdown(socket.SHUT_WR)  # with the cork on: data and FIN leave together
        L0.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        assert sp.wait(timeout=10) == 0
        assert sp.bytes == len(data), f"run {i}: ended after {sp.bytes} of {len(data)} bytes"
        R0.shutdown(socket.SHUT_WR)
        assert recv_until_eof(R1, 10) == data
        for s in (L0, L1, R0, R1):
            s.close()


FLOOD = r"""
import os, sys
fd, path = int(sys.argv[1]), sys.argv[2]
os.set_blocking(fd, True)   # one sendfile() call streams the whole file
f = os.open(path, os.O_RDONLY)
size = os.fstat(f).st_size
try:
    while True:
        off = 0
        while off < size:
            off += os.sendfile(fd, f, off, size - off)
except OSError:
    pass
"""


@pytest.mark.parametrize("run", range(3))
def test_source_flooded_before_and_during_the_splice(env, tmp_path, run):
    """A peer that sends faster than anyone can read, from before the
    splice starts until after it: splice() returns at once, and every byte
    arrives once, in order.

    On bpf, splice() read the bytes already queued on the source until the
    queue was empty; against such a peer it never was, and a process read
    24 GB into memory before the OOM killer ended it (seen in CI). The peer
    is a separate process sending with sendfile(2), and the application
    reads at full speed for a while first, as a proxy that splices after
    a header would, so that the window is wide open. The peer is stopped
    after a while in any case, so a regression fails here instead of
    exhausting the machine.
    """
    import threading
    size = 32 * MiB
    data = Stream(31 + run).read(0, size)
    path = tmp_path / "flood"
    path.write_bytes(data)
    peer, src = env.pair()
    dst, out = env.pair()
    rd = env.start(Receiver(out))
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(peer.fileno()), str(path)],
                             pass_fds=[peer.fileno()])
    stop = threading.Timer(4.0, flood.kill)
    stop.start()
    try:
        before = hashlib.sha256()
        pre = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.2:
            got = src.recv(256 << 10)
            before.update(got)
            pre += len(got)
        t0 = time.monotonic()
        sp = sosplice.splice(src, dst)
        took = time.monotonic() - t0
        wait_until(lambda: sp.bytes >= 48 * MiB, 3 * STEP, "48 MiB through the splice")
    finally:
        stop.cancel()
        flood.kill()
        flood.wait()
    assert took < 0.5, f"splice() took {took:.1f} s against a flooding peer"
    # The connecting side's tcpi_bytes_acked counts its SYN; read it
    # before the FIN, which would count too.
    sent = tcp_written(peer) - 1
    peer.shutdown(socket.SHUT_WR)
    assert sp.wait(3 * STEP) == 0
    dst.shutdown(socket.SHUT_WR)
    rd.check(3 * STEP)
    assert rd.eof
    assert pre + rd.count == pre + sp.bytes == sent, (pre, rd.count, sp.bytes, sent)
    assert before.hexdigest() == _looped_sha(data, 0, pre)
    assert rd.hash.hexdigest() == _looped_sha(data, pre, sent), "the stream arrived corrupted"


def _looped_sha(data: bytes, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of `data` repeated without end."""
    h = hashlib.sha256()
    view = memoryview(data)
    while start < end:
        i = start % len(data)
        n = min(len(data) - i, end - start)
        h.update(view[i:i + n])
        start += n
    return h.hexdigest()
