"""Small socket facts the engine needs, each one syscall."""
from __future__ import annotations

import ctypes as ct
import fcntl
import os
import socket
import struct
import termios

SO_COOKIE = 57
TCP_INFO = 11


class TcpInfo(ct.Structure):
    """The head of struct tcp_info (include/uapi/linux/tcp.h), through
    tcpi_bytes_received: the struct only ever grows at its end, so every
    kernel we run on (and every one since 4.1) fills this prefix whole.
    Field names are the header's; tests/test_internals.py compiles the
    header and checks each field's offset, size and bits against these."""
    _fields_ = [
        ("tcpi_state", ct.c_uint8),
        ("tcpi_ca_state", ct.c_uint8),
        ("tcpi_retransmits", ct.c_uint8),
        ("tcpi_probes", ct.c_uint8),
        ("tcpi_backoff", ct.c_uint8),
        ("tcpi_options", ct.c_uint8),
        ("tcpi_snd_wscale", ct.c_uint8, 4),
        ("tcpi_rcv_wscale", ct.c_uint8, 4),
        ("tcpi_delivery_rate_app_limited", ct.c_uint8, 1),
        ("tcpi_fastopen_client_fail", ct.c_uint8, 2),
        ("tcpi_rto", ct.c_uint32),
        ("tcpi_ato", ct.c_uint32),
        ("tcpi_snd_mss", ct.c_uint32),
        ("tcpi_rcv_mss", ct.c_uint32),
        ("tcpi_unacked", ct.c_uint32),
        ("tcpi_sacked", ct.c_uint32),
        ("tcpi_lost", ct.c_uint32),
        ("tcpi_retrans", ct.c_uint32),
        ("tcpi_fackets", ct.c_uint32),
        ("tcpi_last_data_sent", ct.c_uint32),
        ("tcpi_last_ack_sent", ct.c_uint32),
        ("tcpi_last_data_recv", ct.c_uint32),
        ("tcpi_last_ack_recv", ct.c_uint32),
        ("tcpi_pmtu", ct.c_uint32),
        ("tcpi_rcv_ssthresh", ct.c_uint32),
        ("tcpi_rtt", ct.c_uint32),
        ("tcpi_rttvar", ct.c_uint32),
        ("tcpi_snd_ssthresh", ct.c_uint32),
        ("tcpi_snd_cwnd", ct.c_uint32),
        ("tcpi_advmss", ct.c_uint32),
        ("tcpi_reordering", ct.c_uint32),
        ("tcpi_rcv_rtt", ct.c_uint32),
        ("tcpi_rcv_space", ct.c_uint32),
        ("tcpi_total_retrans", ct.c_uint32),
        ("tcpi_pacing_rate", ct.c_uint64),
        ("tcpi_max_pacing_rate", ct.c_uint64),
        ("tcpi_bytes_acked", ct.c_uint64),
        ("tcpi_bytes_received", ct.c_uint64),
    ]


# tcp_state() reads only as far as the state; the others read the prefix.
_TCPI_STATE = TcpInfo.tcpi_state
_TCPI_STATE_END = _TCPI_STATE.offset + _TCPI_STATE.size
_TCPI_LEN = ct.sizeof(TcpInfo)

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


def tcp_info(s: socket.socket) -> TcpInfo:
    """The head of the socket's struct tcp_info (TcpInfo), one getsockopt."""
    return TcpInfo.from_buffer_copy(s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI_LEN))


def tcp_state(s: socket.socket) -> int:
    """tcpi_state: TCP_ESTABLISHED, TCP_CLOSE_WAIT, ... (include/net/tcp_states.h)."""
    return s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI_STATE_END)[_TCPI_STATE.offset]


def progress(s: socket.socket) -> tuple[int, int, int]:
    """(TCP state, bytes acknowledged by the peer, bytes in the send queue).

    acked + queued = bytes ever written into the socket: redirected bytes
    show up here once the drain's backlog worker has handed them to TCP
    (docs/kernel-notes.md K4), which is how we know the backlog is empty.
    """
    info = tcp_info(s)
    return info.tcpi_state, info.tcpi_bytes_acked, _int_ioctl(s, termios.TIOCOUTQ)


def _int_ioctl(s: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), request, b"\0" * 4))[0]


def bytes_acked(s: socket.socket) -> int:
    """tcpi_bytes_acked: bytes of this socket its peer has acknowledged
    (on the connecting side, its SYN counts too)."""
    return tcp_info(s).tcpi_bytes_acked


def inq(s: socket.socket) -> int:
    return _int_ioctl(s, termios.FIONREAD)


def at_mark(s: socket.socket) -> bool:
    """Whether the next byte to read is the urgent mark (sockatmark(3))."""
    return bool(_int_ioctl(s, SIOCATMARK))
