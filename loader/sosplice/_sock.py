"""Small socket facts the engine needs, each one syscall."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

SO_COOKIE = 57
TCP_INFO = 11
# The head of struct tcp_info (include/uapi/linux/tcp.h), which only ever
# grows at its end: eight u8 fields (tcpi_state first), 24 u32 fields from
# tcpi_rto to tcpi_total_retrans, then u64 tcpi_pacing_rate,
# tcpi_max_pacing_rate, tcpi_bytes_acked and tcpi_bytes_received.
_TCPI_HEAD = struct.Struct("=8B24I4Q")
_TCPI_BYTES_ACKED = struct.calcsize("=8B24I2Q")
_TCPI_LEN = _TCPI_BYTES_ACKED + 8

SIOCATMARK = 0x8905

TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
# States in which a socket can still send.
CAN_SEND = (TCP_ESTABLISHED, TCP_CLOSE_WAIT)


def dup(fd: int) -> socket.socket:
    """A socket object for a dup of `fd` that never waits in Python and
    never touches the flags of the open file, which the application (and
    a worker thread in splice(2)) shares.

    Made the plain way under socket.setdefaulttimeout(t), the object polls
    for up to t before a recv(MSG_DONTWAIT), and its constructor turns
    O_NONBLOCK on in the file; settimeout() afterwards turns it on or off
    there too. A type with SOCK_NONBLOCK is the one way in which CPython
    makes the object non-waiting (timeout 0) without a flag call, so the
    real family, type and protocol are read first through a probe object
    made the same way.
    """
    new = os.dup(fd)
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, new)
        family, type_, proto = (probe.getsockopt(socket.SOL_SOCKET, opt)
                                for opt in (socket.SO_DOMAIN, socket.SO_TYPE, socket.SO_PROTOCOL))
        probe.detach()
        return socket.socket(family, type_ | socket.SOCK_NONBLOCK, proto, new)
    except BaseException:
        os.close(new)
        raise


def cookie(s: socket.socket) -> int:
    return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def tcp_state(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0]


def progress(s: socket.socket) -> tuple[int, int, int]:
    """(TCP state, bytes acknowledged by the peer, bytes in the send queue).

    acked + queued = bytes ever written into the socket: redirected bytes
    show up here once the drain's backlog worker has handed them to TCP
    (docs/kernel-notes.md K4), which is how we know the backlog is empty.
    """
    info = s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI_LEN)
    acked = struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]
    return info[0], acked, _int_ioctl(s, termios.TIOCOUTQ)


def _int_ioctl(s: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), request, b"\0" * 4))[0]


def bytes_acked(s: socket.socket) -> int:
    """tcpi_bytes_acked: bytes of this socket its peer has acknowledged
    (on the connecting side, its SYN counts too)."""
    info = s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI_LEN)
    return struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]


def inq(s: socket.socket) -> int:
    return _int_ioctl(s, termios.FIONREAD)


def at_mark(s: socket.socket) -> bool:
    """Whether the next byte to read is the urgent mark (sockatmark(3))."""
    return bool(_int_ioctl(s, SIOCATMARK))
