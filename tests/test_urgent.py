"""Urgent (TCP out-of-band) data in a spliced stream.

The contract: urgent data never ends a splice early. Both backends carry
the urgent byte in band, as an ordinary byte of the stream at its place:
the drain's peer reads it with a plain recv(), it is counted in `bytes`,
and no urgent mark is sent on the drain.

The worker backend needs care here: splice(2) on a TCP socket stops at
the urgent mark whatever SO_OOBINLINE says (tcp_read_sock() never reads
past it), returning 0 once the peer's FIN has come and EAGAIN before.
Taken for EOF, the 0 ended the splice after the bytes before the mark
(OpenBSD's regress args-oob* and args-oobinline* cover the same ground).
"""
from __future__ import annotations

import errno
import socket
import time

import pytest

import sosplice
from conftest import Receiver, Stream, fionread, recv_exactly, recv_until_eof, sha

MiB = 1 << 20


def send_urgent(sock: socket.socket, byte: bytes) -> None:
    assert sock.send(byte, socket.MSG_OOB) == 1


def assert_no_urgent_mark(sock: socket.socket) -> None:
    """`sock` (read to EOF) has no urgent byte waiting: recv(MSG_OOB) says EINVAL.

    So the bytes came in band only, and nothing was also sent out of band.
    """
    with pytest.raises(OSError) as info:
        sock.recv(1, socket.MSG_OOB | socket.MSG_DONTWAIT)
    assert info.value.errno == errno.EINVAL, info.value


def assert_source_clean(src: socket.socket) -> None:
    """The source is at EOF with nothing left on it, and SO_OOBINLINE is the
    application's again (the worker backend sets it while spliced)."""
    assert fionread(src) == 0
    assert recv_until_eof(src, 5) == b""
    assert src.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 0


def test_urgent_byte_mid_stream(env):
    """The issue's case: 100 bytes, 1 byte with MSG_OOB, 100 bytes, FIN.

    All 201 bytes reach the drain's peer in order, the urgent byte in band;
    the splice ends with 0 only after all of them, and counts 201.
    """
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1, R0)
    head, tail = b"a" * 100, b"b" * 100
    L0.sendall(head)
    send_urgent(L0, b"U")
    L0.sendall(tail)
    # The FIN is already queued behind the urgent byte when the splice
    # reaches the mark: this is where splice(2) returns 0 at the mark.
    L0.shutdown(socket.SHUT_WR)

    assert sp.wait(timeout=10) == 0
    assert sp.bytes == 201, f"the splice ended after {sp.bytes} of 201 bytes"
    R0.shutdown(socket.SHUT_WR)
    got = recv_until_eof(R1, 10)
    assert got == head + b"U" + tail, f"{len(got)} bytes, urgent byte at {got.find(b'U')}"
    assert_no_urgent_mark(R1)
    assert_source_clean(L1)
    assert sosplice.getsplice(L1) == 201


def test_urgent_byte_before_the_peer_finishes(env):
    """An interactive peer: 100 bytes, 1 urgent byte, 100 bytes, then it
    waits for an answer. All 201 bytes must arrive while it waits.

    No FIN is behind the urgent mark here, so splice(2) stops there with
    EAGAIN rather than 0: a stall, not an early end, unless the mark is
    stepped over. A request stuck on the source would never be answered.
    """
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1, R0)
    L0.sendall(b"a" * 100)
    send_urgent(L0, b"U")
    L0.sendall(b"b" * 100)

    assert recv_exactly(R1, 201, timeout=10) == b"a" * 100 + b"U" + b"b" * 100
    assert sp.active, f"the splice ended ({sp.error}) with the peer still connected"
    # A second round after the mark was passed: the splice still moves bytes.
    send_urgent(L0, b"V")
    L0.sendall(b"c" * 10)
    assert recv_exactly(R1, 11, timeout=10) == b"V" + b"c" * 10
    L0.shutdown(socket.SHUT_WR)
    assert sp.wait(timeout=10) == 0
    assert sp.bytes == 212
    assert_source_clean(L1)


def test_urgent_bytes_in_a_large_stream(env):
    """1 MiB with urgent bytes spread through it (the first byte, two close
    together, the last byte): the drain's peer gets the exact stream.

    The receiving kernel keeps one urgent mark only, a newer urgent pointer
    replaces an older mark; and a sender's MSG_OOB send can reach the
    source in several segments, the first ones pointing to a byte not yet
    arrived. Whatever marks the source ends up with, none may cut or stall
    the splice, and every byte is counted once.
    """
    total = MiB
    urgent_at = sorted({0, 1, 4095, 65536, 65537, 65540, 300_000, 700_001, total - 1})
    stream = Stream(4242)
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1, R0)
    # A reader on the drain's peer, so 1 MiB never waits on full buffers.
    reader = env.start(Receiver(R1, keep=True, deadline=60))
    pos = 0
    for at in urgent_at:
        if at > pos:
            L0.sendall(stream.read(pos, at - pos))
        send_urgent(L0, stream.read(at, 1))
        pos = at + 1
    if pos < total:
        L0.sendall(stream.read(pos, total - pos))
    L0.shutdown(socket.SHUT_WR)

    assert sp.wait(timeout=30) == 0
    assert sp.bytes == total, f"the splice ended after {sp.bytes} of {total} bytes"
    R0.shutdown(socket.SHUT_WR)
    reader.check(30)
    assert reader.eof and reader.count == total, reader.count
    assert sha(bytes(reader.data)) == stream.sha256(0, total), "stream corrupted"
    assert_no_urgent_mark(R1)
    assert_source_clean(L1)


def test_urgent_mark_left_on_the_source(env):
    """Bytes a splice does not take keep their urgent mark: with `max` ending
    the splice before the urgent byte, the application reads it with
    recv(MSG_OOB) as on any socket, and the rest in order without it."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    sp = sosplice.splice(L1, R0, max=50)
    L0.sendall(b"a" * 100)
    send_urgent(L0, b"U")
    L0.sendall(b"b" * 100)
    L0.shutdown(socket.SHUT_WR)

    assert sp.wait(timeout=10) == errno.EFBIG
    assert sp.bytes == 50
    assert recv_exactly(R1, 50) == b"a" * 50
    assert L1.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 0
    rest = recv_exactly(L1, 50)
    assert rest == b"a" * 50
    assert L1.recv(1, socket.MSG_OOB) == b"U"
    assert recv_until_eof(L1, 5) == b"b" * 100


@pytest.mark.parametrize("fin", [False, True], ids=["open", "fin"])
def test_urgent_byte_queued_before_the_splice(env, fin):
    """The urgent byte arrived before the splice started: it is carried in
    band like one that arrives later. (bpf took bytes queued before the
    start with a plain recv(), which skips an urgent byte that is not
    inline: 200 of 201 arrived.) With `fin`, the peer's FIN is queued too,
    and the source cannot enter a sockmap (CLOSE_WAIT)."""
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    head, tail = b"a" * 100, b"b" * 100
    L0.sendall(head)
    send_urgent(L0, b"U")
    L0.sendall(tail)
    if fin:
        L0.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 10
    while fionread(L1) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    sp = sosplice.splice(L1, R0)
    got = recv_exactly(R1, 201)
    assert got == head + b"U" + tail, f"urgent byte at {got.find(b'U')}"
    if not fin:
        L0.shutdown(socket.SHUT_WR)
    assert sp.wait(timeout=10) == 0
    assert sp.bytes == 201
    R0.shutdown(socket.SHUT_WR)
    assert recv_until_eof(R1, 10) == b""
    assert_no_urgent_mark(R1)
    assert_source_clean(L1)
