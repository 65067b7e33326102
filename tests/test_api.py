"""The Python API around a splice: waiting, asyncio, the engine's fd,
geterror/getsplice, bytes queued before the splice, sockets after a
dissolve, closing a spliced socket, the Splicer as a context manager.
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import threading
import time

import pytest

import sosplice
from conftest import (Receiver, Sender, Stream, assert_nothing_arrives, assert_plain_path,
                      fionread, readable, recv_exactly, recv_until_eof, unsplice, wait_until)

MiB = 1 << 20


def test_wait_times_out_while_active(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1, R0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sp.wait(timeout=0.3)
    assert time.monotonic() - t0 >= 0.25
    assert sp.active and sp.error is None
    # Still working after the timeout.
    L0.sendall(b"after timeout")
    assert recv_exactly(R1, 13) == b"after timeout"
    L0.shutdown(socket.SHUT_WR)
    assert sp.wait(timeout=5) == 0
    assert sp.bytes == 13 and not sp.active and sp.error == 0


def test_await_in_asyncio(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(3)
    data = stream.read(0, 200_000)

    async def main() -> tuple[int, int]:
        sp = sosplice.splice(L1, R0)
        task = asyncio.ensure_future(sp)
        done, _ = await asyncio.wait([task], timeout=0.3)
        assert not done, "await returned while the splice was active"
        loop = asyncio.get_running_loop()
        # Blocking socket work off the loop thread, through the default executor.
        await loop.run_in_executor(None, L0.sendall, data)
        got = await loop.run_in_executor(None, recv_exactly, R1, len(data))
        assert got == data
        L0.shutdown(socket.SHUT_WR)
        err = await asyncio.wait_for(task, timeout=10)
        # Awaiting a splice that has already dissolved returns at once.
        again = await asyncio.wait_for(sp, timeout=1)
        return err, again, sp.bytes

    err, again, moved = asyncio.run(main())
    assert err == 0 and again == 0
    assert moved == len(data)
    assert_nothing_arrives(R1, 0.05)


def test_splicer_fileno_readable_on_dissolve(env, splicer):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    fd = splicer.fileno()
    assert isinstance(fd, int) and fd >= 0
    assert not readable(fd, 0.05), "fresh engine signals a dissolved splice"
    sp = splicer.splice(L1, R0)
    L0.sendall(b"hello world")
    assert recv_exactly(R1, 11) == b"hello world"
    assert not readable(fd, 0.1), "engine fd readable while the splice is active"
    L0.shutdown(socket.SHUT_WR)
    assert readable(fd, 5), "engine fd did not become readable when the splice dissolved"
    r, _, _ = select.select([fd], [], [], 0)
    assert r == [fd]
    assert sp.wait(timeout=1) == 0
    assert sp.bytes == 11


def test_geterror_once_then_zero(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    assert sosplice.geterror(L1) == 0  # never spliced
    data = os.urandom(20)
    sp = sosplice.splice(L1, R0, max=10)
    L0.sendall(data)
    assert recv_exactly(R1, 10) == data[:10]
    assert sp.wait(timeout=5) == errno.EFBIG
    assert sosplice.geterror(L1) == errno.EFBIG
    assert sosplice.geterror(L1) == 0
    assert sosplice.geterror(L1) == 0
    # The handle keeps its reason; the rest is on the source.
    assert sp.error == errno.EFBIG
    assert recv_exactly(L1, 10) == data[10:]


def test_getsplice_never_spliced_is_zero(env):
    L0, L1 = env.pair()
    assert sosplice.getsplice(L1) == 0
    assert sosplice.getsplice(L1.fileno()) == 0
    assert sosplice.getsplice(L0) == 0
    assert_plain_path(L0, L1)


def test_int_fds_accepted(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1.fileno(), R0.fileno())
    L0.sendall(b"by fd")
    assert recv_exactly(R1, 5) == b"by fd"
    assert sosplice.getsplice(L1) == 5 == sosplice.getsplice(L1.fileno())
    assert unsplice(L1.fileno()) == 5
    assert not sp.active


def test_bytes_waiting_before_splice_are_moved(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(2)
    early, late = 100_000, 300_000
    L0.sendall(stream.read(0, early))
    wait_until(lambda: fionread(L1) == early, 5, "early bytes queued on the source")
    sp = sosplice.splice(L1, R0)
    assert recv_exactly(R1, early) == stream.read(0, early)
    assert sp.bytes == early
    L0.sendall(stream.read(early, late))
    assert recv_exactly(R1, late) == stream.read(early, late)
    assert sp.bytes == early + late
    assert fionread(L1) == 0
    assert unsplice(sp) == early + late
    assert_nothing_arrives(R1, 0.05)


def test_bytes_and_eof_waiting_before_splice(env):
    """The source's peer already sent everything and FIN: all of it moves,
    then the splice ends at EOF with 0."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(4)
    n = 50_000
    L0.sendall(stream.read(0, n))
    L0.shutdown(socket.SHUT_WR)
    wait_until(lambda: fionread(L1) == n and readable(L1), 5, "bytes and FIN queued")
    time.sleep(0.05)
    sp = sosplice.splice(L1, R0)
    assert sp.wait(timeout=10) == 0
    assert sp.bytes == n
    assert recv_exactly(R1, n) == stream.read(0, n)
    assert recv_until_eof(L1, 5) == b""
    assert_nothing_arrives(R1, 0.05)


def test_sockets_normal_after_dissolve(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp_l = sosplice.splice(L1, R0)
    sp_r = sosplice.splice(R0, L1)
    L0.sendall(b"x" * 1000)
    R1.sendall(b"y" * 2000)
    assert recv_exactly(R1, 1000) == b"x" * 1000
    assert recv_exactly(L0, 2000) == b"y" * 2000
    assert unsplice(sp_l) == 1000
    assert unsplice(sp_r) == 2000

    for peer, s, tag in ((L0, L1, b"L"), (R1, R0, b"R")):
        payload = tag * 777
        assert not readable(s, 0.0)
        peer.sendall(payload)
        wait_until(lambda: fionread(s) == 777, 5, "FIONREAD on the former source")
        assert readable(s, 0.0)
        assert s.recv(10, socket.MSG_PEEK) == tag * 10
        assert fionread(s) == 777
        assert recv_exactly(s, 777) == payload
        assert fionread(s) == 0
        # Sending works in both directions too.
        s.sendall(payload[::-1].lower())
        assert recv_exactly(peer, 777) == payload.lower()
    # And they can be closed normally: the peers see EOF.
    L1.close()
    R0.close()
    assert recv_until_eof(L0, 5) == b""
    assert recv_until_eof(R1, 5) == b""


def test_sockets_normal_after_efbig(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1, R0, max=5)
    L0.sendall(b"12345678")
    assert recv_exactly(R1, 5) == b"12345"
    assert sp.wait(timeout=5) == errno.EFBIG
    assert L1.recv(3, socket.MSG_PEEK) == b"678"
    assert fionread(L1) == 3
    assert recv_exactly(L1, 3) == b"678"
    assert_plain_path(L0, L1)
    assert_plain_path(R0, R1)


def test_close_source_while_spliced(env):
    """Closing the source from the app ends the splice; every byte counted
    in `bytes` still reaches the drain's peer, and the source's peer sees
    the close."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(9)
    sp = sosplice.splice(L1, R0)
    sender = env.start(Sender(L0, stream, 1 << 34, shutdown=False, deadline=60, reset_ok=True))
    reader = env.start(Receiver(R1, deadline=60))
    wait_until(lambda: reader.count >= 2 * MiB, 20, "2 MiB through the splice")

    L1.close()
    err = sp.wait(timeout=10)
    assert isinstance(err, int)
    moved = sp.bytes
    assert moved >= 2 * MiB

    sender.stop()
    sender.check(10)
    # The app ends the drain; its peer must have every moved byte, in order.
    R0.shutdown(socket.SHUT_WR)
    reader.check(20)
    assert reader.eof
    assert reader.count == moved, f"drain's peer got {reader.count}, bytes says {moved}"
    assert reader.hash.hexdigest() == stream.sha256(0, moved)

    # The source's peer sees the close: its sends failed, or EOF or a reset
    # when it reads.
    L0.settimeout(5)
    deadline = time.monotonic() + 5
    seen = "send failed" if sender.reset is not None else None
    while seen is None and time.monotonic() < deadline:
        try:
            data = L0.recv(65536)
        except ConnectionResetError:
            seen = "reset"
            break
        except TimeoutError:
            continue
        assert data == b"", "L1 never sent anything, yet L0 received data"
        seen = "eof"
    assert seen, "the source's peer never saw the close"


def test_close_drain_while_spliced(env):
    """Closing the drain from the app ends the splice; bytes not moved stay
    readable on the source."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    stream = Stream(10)
    sp = sosplice.splice(L1, R0)
    L0.sendall(stream.read(0, 100_000))
    assert recv_exactly(R1, 100_000) == stream.read(0, 100_000)
    R0.close()
    err = sp.wait(timeout=10)
    assert isinstance(err, int)
    assert sp.bytes == 100_000
    assert recv_until_eof(R1, 5) == b""  # the drain's peer sees the close
    L0.sendall(stream.read(100_000, 5000))
    assert recv_exactly(L1, 5000) == stream.read(100_000, 5000)


def test_splicer_context_manager_and_stats(env):
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    Y0, Y1 = env.pair()
    with sosplice.Splicer() as eng:
        assert eng.stats() == [] or all(r.bytes == 0 for r in eng.stats())
        sp1 = eng.splice(L1, R0)
        sp2 = eng.splice(X1, Y0)
        d1, d2 = os.urandom(1000), os.urandom(2345)
        L0.sendall(d1)
        X0.sendall(d2)
        assert recv_exactly(R1, 1000) == d1
        assert recv_exactly(Y1, 2345) == d2
        stats = eng.stats()
        assert isinstance(stats, list) and len(stats) == 2
        assert sorted(r.bytes for r in stats) == [1000, 2345]
        # Small writes to a drain that keeps up: all of it moved in the
        # kernel on either backend.
        assert [r.kernel_bytes for r in stats] == [r.bytes for r in stats]
        # A dissolved splice stays in stats with its final count.
        X0.shutdown(socket.SHUT_WR)
        assert sp2.wait(timeout=5) == 0
        assert sorted(r.bytes for r in eng.stats()) == [1000, 2345]
        assert sp1.active
        t0 = time.monotonic()
    # Leaving the block ends the engine and with it its splices, losslessly.
    closing = time.monotonic() - t0
    assert closing < 3, f"closing the engine with one idle splice took {closing:.1f} s"
    assert not sp1.active
    assert sp1.wait(timeout=1) == 0
    assert sp1.bytes == 1000
    L0.sendall(b"now plain")
    assert recv_exactly(L1, 9) == b"now plain"
    assert_nothing_arrives(R1, 0.05)


def test_concurrent_api_use(env):
    """Several threads splice, move bytes and unsplice at once."""
    errors: list[BaseException] = []
    rounds, nthreads = 10, 4
    socks = [[(env.pair(), env.pair()) for _ in range(rounds)] for _ in range(nthreads)]

    def worker(k: int) -> None:
        try:
            for r, ((a0, a1), (b0, b1)) in enumerate(socks[k]):
                payload = bytes([k, r]) * (1000 + 100 * r)
                sp = sosplice.splice(a1, b0)
                a0.sendall(payload)
                assert recv_exactly(b1, len(payload)) == payload
                if r % 2:
                    assert unsplice(a1) == len(payload)
                else:
                    a0.shutdown(socket.SHUT_WR)
                    assert sp.wait(timeout=10) == 0
                assert sp.bytes == len(payload)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), name=f"test-api-{k}")
               for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "worker threads hung"
    assert not errors, errors


def test_blocking_mode_is_the_applications_after_the_splice(env):
    """Sockets come back from a splice in the blocking mode they had.

    (The worker backend makes them non-blocking while spliced.)
    """
    a, b = env.pair(timeout=None)
    c, d = env.pair(timeout=None)
    b.setblocking(True)
    c.setblocking(False)
    sp = sosplice.splice(b, c)
    a.sendall(b"x" * 1000)
    d.settimeout(10)
    assert recv_exactly(d, 1000) == b"x" * 1000
    assert unsplice(sp) == 1000
    assert b.getblocking() is True and (os.get_blocking(b.fileno()) is True)
    assert os.get_blocking(c.fileno()) is False


def test_app_making_a_spliced_socket_blocking_stalls_nothing(env):
    """A spliced socket switched to blocking mode by the application (a
    contract breach) must not stall its own splice or any other one."""
    a, b = env.pair()
    c, d = env.pair()
    sp = sosplice.splice(b, c)
    others = [env.pair() + env.pair() for _ in range(4)]
    sps = [sosplice.splice(o[1], o[2]) for o in others]
    b.setblocking(True)
    c.setblocking(True)
    for _ in range(3):
        a.sendall(b"y" * 5000)
        assert recv_exactly(d, 5000) == b"y" * 5000
        for o in others:
            o[0].sendall(b"z" * 3000)
        for o in others:
            assert recv_exactly(o[3], 3000) == b"z" * 3000
    assert unsplice(sp) == 15000
    assert [unsplice(s) for s in sps] == [9000] * 4


def test_splice_info_round_trips_through_json(env, splicer):
    """SpliceInfo.to_json() through JSON text and back (from_json) is the
    same SpliceInfo: a live splice without limits (None), an ended one
    with limits and a label, IPv4 and IPv6 (4-tuple) addresses; so is a
    whole EngineSnapshot. A row missing keys reads as their zeros."""
    import json

    from sosplice.snapshot import EngineSnapshot
    L0, L1 = env.pair()
    R0, R1 = env.pair(socket.AF_INET6)
    live = splicer.splice(L1, R0)
    X0, X1 = env.pair(socket.AF_INET6)
    Y0, Y1 = env.pair()
    ended = splicer.splice(X1, Y0, max=1000, idle=30.5, label="[::1]:8443")
    X0.sendall(b"x" * 10)
    X0.shutdown(socket.SHUT_WR)
    assert ended.wait(timeout=5) == 0 and live.active
    infos = splicer.stats()
    assert sorted((i.idle, i.error) for i in infos if i.state != "done") == [(None, None)]
    assert len(infos) == 2 and {len(i.source[1]) for i in infos} == {2, 4}
    for info in infos:
        text = json.dumps(info.to_json())
        assert sosplice.SpliceInfo.from_json(json.loads(text)) == info, text
    snap = EngineSnapshot.of(splicer.backend, infos)
    assert EngineSnapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap
    assert sosplice.SpliceInfo.from_json({}, pid=7, backend="worker") == sosplice.SpliceInfo(
        source=(None, None), drain=(None, None), source_cookie=0, drain_cookie=0, bytes=0,
        kernel_bytes=0, max=0, idle=None, state="?", error=None, throttled=False, age=0.0,
        idle_for=0.0, pid=7, backend="worker", label="")
    assert [sosplice.reason_name(e) for e in (None, 0, errno.ECONNRESET, 4095)] == \
        ["-", "EOF", "ECONNRESET", "4095"]
