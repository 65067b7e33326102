"""`splicectl proxy`'s relay phase (issue 13): as HAProxy's splice-auto,
the proxy copies a connection's bytes itself until it shows bulk (a full
64 KiB read, a drain that does not take a send whole, 256 KiB in all) or
has lived --splice-after seconds with both directions open, and only then
splices it. Short exchanges never pay for a splice; long ones still move
in the kernel; the ends are the same either way (test_proxy_ends runs
both phases).

Real sockets on loopback, the proxy as a subprocess, every byte checked
(sha256), and the log line read for what it says of each connection.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from test_proxy_ends import LINGER_RESET, read_to_end, servers  # noqa: F401  (a fixture)
from test_splicectl import _free_port, _log_lines, _metrics, proxies  # noqa: F401


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_short_exchange_is_relayed_whole(servers, proxies, backend):
    """Connect, 100 bytes each way, close: relayed to the end, never
    spliced: exact bytes, kernel share 0, end=closed, both ends EOF; the
    metrics count the relayed bytes (none of them in the kernel)."""
    req, answer = os.urandom(100), os.urandom(100)

    def serve(s: socket.socket) -> str:
        got = b""
        while len(got) < len(req):
            got += s.recv(4096)
        s.sendall(answer)
        s.shutdown(socket.SHUT_WR)
        rest, how = read_to_end(s)
        return "ok" if (got, rest, how) == (req, b"", "EOF") else f"{got!r} {rest!r} {how}"

    up = servers(serve)
    port = _free_port()
    px = proxies(up.addr, "--backend", backend, "--no-check", "--metrics", f"127.0.0.1:{port}")
    with socket.create_connection(px.addr, timeout=10) as c:
        c.sendall(req)
        got, how = read_to_end(c)
        assert (got, how) == (answer, "EOF")
        c.shutdown(socket.SHUT_WR)
        assert up.result(1) == "ok"
    (line,) = _log_lines(px, 1)
    assert (line["up_bytes"], line["down_bytes"], line["kernel"]) == ("100", "100", "0%"), line
    assert (line["up_end"], line["down_end"], line["end"]) == ("EOF", "EOF", "closed"), line
    m = _metrics(px_port := port)
    assert m['sosplice_bytes_total{direction="up"}'] == 100, (px_port, m)
    assert m['sosplice_bytes_total{direction="down"}'] == 100, m
    assert m['sosplice_kernel_bytes_total{direction="up"}'] == 0, m
    assert m['sosplice_splice_ends_total{reason="EOF"}'] == 2, m
    assert px.stop() == 0


def test_bulk_switches_to_splicing_mid_stream(servers, proxies, backend):
    """50 MiB each way at once: the first bytes are relayed, the rest is
    spliced, with no byte lost, doubled or reordered (sha256 each way);
    the log line has the exact counts and a kernel share above 0."""
    size = 50 << 20
    up_data, down_data = os.urandom(size), os.urandom(size)

    def serve(s: socket.socket) -> str:
        s.settimeout(60)
        t = threading.Thread(target=s.sendall, args=(down_data,))
        t.start()
        h, n = hashlib.sha256(), 0
        while d := s.recv(1 << 20):
            h.update(d)
            n += len(d)
        t.join(60)
        s.shutdown(socket.SHUT_WR)
        return n, h.hexdigest()

    up = servers(serve)
    px = proxies(up.addr, "--backend", backend, "--no-check")
    with socket.create_connection(px.addr, timeout=60) as c:
        def send():
            c.sendall(up_data)
            c.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        got, how = read_to_end(c, timeout=60)
        t.join(60)
    assert how == "EOF" and len(got) == size and _sha(got) == _sha(down_data)
    assert up.result(1, timeout=60) == (size, _sha(up_data))
    (line,) = _log_lines(px, 1)
    assert (line["up_bytes"], line["down_bytes"]) == (str(size), str(size)), line
    assert line["kernel"] != "0%" and int(line["kernel"].rstrip("%")) > 0, line
    assert line["end"] == "closed", line
    assert px.stop() == 0


@pytest.mark.parametrize("who", ["client", "upstream"])
def test_reset_during_relay_reaches_the_other_side_as_reset(servers, proxies, backend, who):
    """A peer that resets while the connection is still relayed (a long
    --splice-after): the other peer gets a reset, never a FIN; the log
    line says who aborted."""
    req = os.urandom(100)

    def serve(s: socket.socket) -> str:
        got = b""
        while len(got) < len(req):
            got += s.recv(4096)
        s.sendall(b"partial answer")
        if who == "upstream":
            time.sleep(0.2)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            return "reset sent"
        return read_to_end(s)[1]

    up = servers(serve)
    px = proxies(up.addr, "--backend", backend, "--no-check", "--splice-after", "30")
    with socket.create_connection(px.addr, timeout=10) as c:
        c.sendall(req)
        assert c.recv(100) == b"partial answer"
        if who == "client":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        else:
            got, how = read_to_end(c)
            assert (got, how) == (b"", "reset")
    if who == "client":
        assert up.result(1) == "reset"
    else:
        assert up.result(1) == "reset sent"
    (line,) = _log_lines(px, 1)
    assert line["end"] == f"{who}_abort", line
    assert line["kernel"] == "0%", line
    ended = line["up_end"] if who == "client" else line["down_end"]
    assert ended == "ECONNRESET", line
    assert px.stop() == 0


def test_half_close_during_relay_then_long_answer(servers, proxies, backend):
    """The client sends its request and half-closes at once; the upstream
    then answers with 20 MiB. With one direction ended before bulk, the
    connection is relayed to its end (a splice needs both directions):
    every byte arrives, in order, then EOF; kernel share 0."""
    req, size = os.urandom(1000), 20 << 20
    answer = os.urandom(size)

    def serve(s: socket.socket) -> str:
        got, how = read_to_end(s)
        if (got, how) != (req, "EOF"):
            return f"request: {len(got)} bytes, {how}"
        s.sendall(answer)
        s.shutdown(socket.SHUT_WR)
        return "ok"

    up = servers(serve)
    px = proxies(up.addr, "--backend", backend, "--no-check")
    with socket.create_connection(px.addr, timeout=30) as c:
        c.sendall(req)
        c.shutdown(socket.SHUT_WR)
        got, how = read_to_end(c, timeout=30)
    assert up.result(1) == "ok"
    assert how == "EOF" and len(got) == size and _sha(got) == _sha(answer)
    (line,) = _log_lines(px, 1)
    assert (line["up_bytes"], line["down_bytes"]) == ("1000", str(size)), line
    assert (line["kernel"], line["end"]) == ("0%", "closed"), line
    assert (line["up_end"], line["down_end"]) == ("EOF", "EOF"), line
    assert px.stop() == 0


def test_a_quiet_connection_is_spliced_after_splice_after(servers, proxies, backend):
    """Both directions open and quiet: spliced once --splice-after has
    passed; what comes after moves in the kernel (the worker backend
    moves every spliced byte there), the first exchange was relayed."""
    def echo(s: socket.socket) -> str:
        while d := s.recv(1 << 16):
            s.sendall(d)
        s.shutdown(socket.SHUT_WR)
        return "EOF"

    up = servers(echo)
    px = proxies(up.addr, "--backend", backend, "--no-check", "--splice-after", "0.2",
                 "--log-level", "debug")
    with socket.create_connection(px.addr, timeout=10) as c:
        c.sendall(b"a" * 50)
        assert c.recv(100) == b"a" * 50
        deadline = time.monotonic() + 10
        while " spliced to " not in px.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "(100 bytes relayed before)" in px.stderr(), px.stderr()
        data = os.urandom(50_000)
        c.sendall(data)
        got = b""
        while len(got) < len(data):
            got += c.recv(1 << 16)
        assert got == data
        c.shutdown(socket.SHUT_WR)
        assert read_to_end(c) == (b"", "EOF")
    (line,) = _log_lines(px, 1)
    assert (line["up_bytes"], line["down_bytes"], line["end"]) == ("50050", "50050", "closed")
    if backend == "worker":
        assert line["kernel"] == f"{100_000 * 100 // 100_100}%", line
    assert px.stop() == 0


def test_idle_cuts_a_relayed_connection(servers, proxies, backend):
    """--idle shorter than --splice-after: a quiet connection is cut while
    still relayed, with a reset both ways, at --idle after its last
    relayed byte; nothing was ever spliced."""
    def echo(s: socket.socket) -> str:
        try:
            while d := s.recv(1 << 16):
                s.sendall(d)
        except ConnectionResetError:
            return "reset"
        return "EOF"

    up = servers(echo)
    idle = 0.4
    px = proxies(up.addr, "--backend", backend, "--no-check", "--idle", str(idle),
                 "--splice-after", "30")
    with socket.create_connection(px.addr, timeout=10) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        t0 = time.monotonic()
        got, how = read_to_end(c)
        waited = time.monotonic() - t0
    assert (got, how) == (b"", "reset")
    assert idle - 0.05 <= waited <= idle * 1.25 + 1.0, waited
    assert up.result(1) == "reset"
    (line,) = _log_lines(px, 1)
    assert (line["up_bytes"], line["down_bytes"], line["kernel"]) == ("4", "4", "0%"), line
    assert (line["up_end"], line["down_end"], line["end"]) == ("cut", "cut", "idle"), line
    assert px.stop() == 0


def test_reload_changes_splice_after_for_new_connections(tmp_path):
    """splice_after in a config file, changed by a reload (SIGHUP): a
    connection relayed before it stays relayed, one accepted after it is
    spliced at once (worker backend: every spliced byte in the kernel)."""
    from test_config import FileProxy, listen_table
    from test_splicectl import Upstream

    up = Upstream()
    path = tmp_path / "p.toml"
    head = 'backend = "worker"\n'
    table = listen_table(f"127.0.0.1:{_free_port()}", up.addr)
    path.write_text(head + "splice_after = 30\n" + table)
    px = FileProxy(path, tmp_path)
    try:
        a = socket.create_connection(px.addrs[0], timeout=10)
        a.sendall(b"Eping")
        assert a.recv(4) == b"ping"
        path.write_text(head + "splice_after = 0\n" + table)
        px.p.send_signal(signal.SIGHUP)
        px.wait_log("reloaded: ")
        b = socket.create_connection(px.addrs[0], timeout=10)
        b.sendall(b"Eping")
        assert b.recv(4) == b"ping"
        for s in (a, b):
            s.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += s.recv(4096)
            s.shutdown(socket.SHUT_WR)
            assert read_to_end(s)[1] == "EOF"
            s.close()
        px.wait_log("conn=2 ")
        lines = {f["conn"]: f for f in (dict(x.split("=", 1) for x in line.split(" INFO ", 1)[1].split())
                                        for line in px.stderr().splitlines() if " conn=" in line)}
        assert (lines["1"]["kernel"], lines["1"]["end"]) == ("0%", "closed"), lines
        assert (lines["2"]["kernel"], lines["2"]["end"]) == ("100%", "closed"), lines
    finally:
        px.stop()
        up.close()
