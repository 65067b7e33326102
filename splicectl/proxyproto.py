"""The PROXY protocol header that `send_proxy` writes to an upstream.

HAProxy's PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt),
as its `send-proxy` (version 1, text) and `send-proxy-v2` (version 2,
binary) write it: one header, before the first byte of the client's
stream, that tells the upstream who the client is (source) and which
address it connected to (destination).

    v1: b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\\r\\n"
    v2: 12-byte signature, 0x21 (version 2, PROXY), 0x11 (TCP over IPv4)
        or 0x21 (TCP over IPv6), the address block's length (big endian),
        then source address, destination address, source port,
        destination port.

A client that reached a dual-stack listener over IPv4 has IPv4-mapped
addresses (::ffff:192.0.2.1); both versions send them as TCP4, as HAProxy
does, so the upstream sees the address the client really has.
"""
from __future__ import annotations

import ipaddress
import struct

VERSIONS = ("v1", "v2")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21                    # version 2 (high nibble), command PROXY
_V2_TCP4, _V2_TCP6 = 0x11, 0x21     # address family << 4 | SOCK_STREAM


def _ip(sa: tuple) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(sa[0].split("%", 1)[0])   # no scope id on the wire
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def header(version: str, source: tuple, destination: tuple) -> bytes:
    """The header for a connection from `source` to `destination`.

    Args:
        version: "v1" or "v2".
        source, destination: socket addresses as `getpeername()` and
            `getsockname()` give them, IPv4 or IPv6 (4-tuples), the
            same family on both sides.

    Raises:
        ValueError: an unknown version, or a source and a destination of
            different families (one socket never has those).
    """
    if version not in VERSIONS:
        raise ValueError(f"PROXY protocol version must be one of {VERSIONS}, not {version!r}")
    src, dst = _ip(source), _ip(destination)
    if src.version != dst.version:
        raise ValueError(f"PROXY protocol: source {src} and destination {dst} differ in family")
    sport, dport = int(source[1]), int(destination[1])
    if version == "v1":
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src.compressed} {dst.compressed} {sport} {dport}\r\n".encode()
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(block)) + block
