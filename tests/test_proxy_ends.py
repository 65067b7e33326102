"""How `splicectl proxy` ends a connection (issue 11).

The proxy passes a FIN on as a FIN, and nothing else: a reset on either
side, a drain that fails, and every connection the proxy cuts itself (idle
timeout, grace expiry) reach both peers as a reset, so that neither can
take a cut stream for a finished one. `--idle` is a connection timeout: it
fires only when neither direction has moved a byte for that long. Every
option is checked at start-up, with one line and exit 2.

Each test runs the proxy on loopback, as a subprocess (one in-process, to
count its work), once per backend (the `backend` fixture; `--backend` in
the pytest command picks one). The checks of bad option values are in
test_splicectl.py.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from typing import Callable

import pytest

from conftest import outq
from test_splicectl import proxies  # noqa: F401  (a fixture)

LINGER_RESET = struct.pack("ii", 1, 0)


class Server:
    """An upstream on loopback that runs `handler(sock)` for each connection,
    one at a time, in one thread that the test joins. What the handler
    returns is appended to `results`; an exception is appended too."""

    def __init__(self, handler: Callable[[socket.socket], object]) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.ls.settimeout(0.1)
        self.addr = "%s:%d" % self.ls.getsockname()
        self.handler = handler
        self.results: list = []
        self.stopping = threading.Event()
        self.t = threading.Thread(target=self._run, name="test-upstream")
        self.t.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                s, _ = self.ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with s:
                s.settimeout(10)
                try:
                    self.results.append(self.handler(s))
                except Exception as e:  # noqa: BLE001 - the test looks at it
                    self.results.append(e)

    def result(self, n: int, timeout: float = 15) -> object:
        """The n-th connection's result (1-based), waiting for it."""
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.results) >= n, f"upstream handled {len(self.results)} of {n} connections"
        return self.results[n - 1]

    def close(self) -> None:
        self.stopping.set()
        self.t.join(15)
        self.ls.close()
        assert not self.t.is_alive(), "upstream handler still running"


@pytest.fixture
def servers():
    started: list[Server] = []
    yield lambda handler: started.append(Server(handler)) or started[-1]
    for s in started:
        s.close()


def read_to_end(s: socket.socket, timeout: float = 15) -> tuple[bytes, str]:
    """Everything `s` receives, and how its stream ended: "EOF" or "reset"
    (or "timeout" if it did not end within `timeout`)."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            d = s.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(got), "reset"
        if not d:
            return bytes(got), "EOF"
        got += d
    return bytes(got), "timeout"


def end_of(s: socket.socket) -> str:
    """How an upstream handler's socket ended, read until it did."""
    return read_to_end(s)[1]


def echo_then_end(s: socket.socket) -> str:
    """Echo until the stream ends; return how it ended."""
    s.settimeout(15)
    try:
        while d := s.recv(1 << 16):
            s.sendall(d)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return "EOF"


def wait_acked(s: socket.socket, timeout: float = 10) -> None:
    """Until the peer has acknowledged every byte sent on `s`."""
    deadline = time.monotonic() + timeout
    while outq(s) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert outq(s) == 0, f"{outq(s)} bytes still unacknowledged"


PAYLOAD = os.urandom(300_000)


@pytest.fixture(params=["relay", "splice"])
def phase(request) -> tuple[str, ...]:
    """The proxy's options for how a connection starts: relayed by the
    proxy until it shows bulk (the default --splice-after), or spliced at
    once (--splice-after 0). Every end must be the same either way."""
    return () if request.param == "relay" else ("--splice-after", "0")


# -- A: a reset is passed on as a reset ---------------------------------------

def test_upstream_reset_reaches_client_as_reset(servers, proxies, backend, phase):
    """The upstream sends 300 KB of a longer answer, then resets. The
    client gets at most those bytes, in order, then ECONNRESET: never a
    clean EOF, which would make the truncated answer look complete."""
    def send_then_reset(s: socket.socket) -> str:
        s.sendall(PAYLOAD)
        wait_acked(s)                   # the proxy has all of it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        return "sent"                   # leaving `with s` closes: a reset

    up = servers(send_then_reset)
    px = proxies(up.addr, "--backend", backend, "--no-check", *phase)
    with socket.create_connection(px.addr, timeout=10) as c:
        got, how = read_to_end(c)
    assert up.result(1) == "sent"
    assert PAYLOAD.startswith(got), "bytes were changed or reordered"
    assert how == "reset", f"client saw {how} after {len(got)} of {len(PAYLOAD)} bytes"
    assert px.stop() == 0


def test_client_reset_reaches_upstream_as_reset(servers, proxies, backend, phase):
    """The client resets while the answer is still coming: the drain of
    the download fails (EPIPE) and the upload's source is reset
    (ECONNRESET). The upstream must see a reset, not a FIN that says
    "the client sent everything it had"."""
    def send_then_listen(s: socket.socket) -> str:
        s.sendall(PAYLOAD)
        return end_of(s)

    up = servers(send_then_listen)
    px = proxies(up.addr, "--backend", backend, "--no-check", *phase)
    with socket.create_connection(px.addr, timeout=10) as c:
        assert c.recv(1000)             # the answer flows
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    assert up.result(1) == "reset"
    assert px.stop() == 0


def test_clean_ends_stay_clean(servers, proxies, backend, phase):
    """The other side of the rule: FINs both ways (the upstream's first)
    end the connection with FINs, every byte delivered."""
    def answer_then_wait(s: socket.socket) -> str:
        s.sendall(PAYLOAD)
        s.shutdown(socket.SHUT_WR)
        return end_of(s)

    up = servers(answer_then_wait)
    px = proxies(up.addr, "--backend", backend, "--no-check", *phase)
    with socket.create_connection(px.addr, timeout=10) as c:
        got, how = read_to_end(c)
        assert (len(got), how) == (len(PAYLOAD), "EOF") and got == PAYLOAD
        c.shutdown(socket.SHUT_WR)
        assert up.result(1) == "EOF"
    assert px.stop() == 0


# -- B: --idle is a connection timeout; a cut is a reset ----------------------

def test_idle_spares_a_download_whose_upload_is_silent(servers, proxies, backend, phase):
    """A 200 KB/s download that lasts 2.5 s through `--idle 1`, while the
    client sends nothing: the upload direction is quiet for longer than
    the timeout, but the connection is not, so nothing is cut."""
    chunk, n = 20_000, 25
    data = os.urandom(chunk * n)

    def trickle(s: socket.socket) -> str:
        for i in range(n):
            s.sendall(data[i * chunk:(i + 1) * chunk])
            time.sleep(0.1)
        s.shutdown(socket.SHUT_WR)
        return end_of(s)

    up = servers(trickle)
    px = proxies(up.addr, "--backend", backend, "--no-check", *phase, "--idle", "1")
    with socket.create_connection(px.addr, timeout=10) as c:
        got, how = read_to_end(c)
        assert (len(got), how) == (len(data), "EOF"), f"cut after {len(got)} bytes ({how})"
        assert got == data
        c.shutdown(socket.SHUT_WR)
        assert up.result(1) == "EOF"
    assert px.stop() == 0


def test_idle_cut_is_a_reset_on_both_sides(servers, proxies, backend, phase):
    """A connection idle in both directions for `--idle` is cut: the
    client and the upstream both see a reset, after the timeout and not
    long after it."""
    idle = 0.6
    up = servers(echo_then_end)
    px = proxies(up.addr, "--backend", backend, "--no-check", *phase, "--idle", str(idle))
    with socket.create_connection(px.addr, timeout=10) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        t0 = time.monotonic()
        got, how = read_to_end(c)
        waited = time.monotonic() - t0
    assert (got, how) == (b"", "reset")
    assert idle - 0.05 <= waited <= idle * 1.25 + 1.0, waited
    assert up.result(1) == "reset"
    assert px.stop() == 0


def test_grace_expiry_is_a_reset_on_both_sides(servers, proxies, backend, phase):
    """SIGTERM with a live connection that does not finish within
    `--grace`: the proxy cuts it with a reset both ways and exits 0."""
    up = servers(echo_then_end)
    px = proxies(up.addr, "--backend", backend, "--no-check", *phase, "--grace", "0.5")
    with socket.create_connection(px.addr, timeout=10) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        px.p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        got, how = read_to_end(c)
        waited = time.monotonic() - t0
    assert (got, how) == (b"", "reset")
    assert 0.4 <= waited <= 3, waited
    assert up.result(1) == "reset"
    assert px.p.wait(15) == 0       # not stop(): a second SIGTERM would race its exit


@pytest.mark.parametrize("splice_after", [0.5, 0])
def test_idle_costs_two_looks_per_quiet_connection(backend, splice_after):
    """--idle keeps a deadline per connection and looks only at those due:
    a connection that stays quiet is looked at twice once spliced (a
    slice of --idle after its splice, then at --idle), two byte counts per
    look, and is reset at --idle after its last byte, relayed or spliced;
    nothing scans the connections that are not due. In-process, to count
    the looks."""
    from splicectl.proxy import Options, Proxy as InProcess

    n, idle = 200, 1.0
    up = socket.create_server(("127.0.0.1", 0), backlog=n + 8)  # never accepts: holds them
    px = InProcess(Options(listen=("127.0.0.1", 0), upstreams=[up.getsockname()[:2]],
                           idle=idle, check_upstreams=False, backend=backend,
                           splice_after=splice_after))
    addr = px.start()
    looks = 0                   # byte counts read by the idle checks (not by _reap)
    checking = False
    count_bytes, idle_due = px.engine._bytes_of, px._idle_due

    def counting(handle, kernel=False):
        nonlocal looks
        looks += checking
        return count_bytes(handle, kernel)

    def check(c, now):
        nonlocal checking
        checking = True
        try:
            idle_due(c, now)
        finally:
            checking = False
    px.engine._bytes_of, px._idle_due = counting, check
    t = threading.Thread(target=px.run, name="test-proxy")
    t.start()
    conns = []
    try:
        for _ in range(n):
            conns.append(socket.create_connection(addr, timeout=10))
        ends = [read_to_end(c, timeout=10)[1] for c in conns]
        assert ends == ["reset"] * n
        assert looks <= 2 * 2 * n, f"{looks} byte counts read for {n} quiet connections"
        assert px.m.value("sosplice_resets_total", reason="idle") == n
    finally:
        px.stop()
        t.join(15)
        for c in conns:
            c.close()
        up.close()
    assert not t.is_alive()


# -- C: a refused splice is a warning ------------------------------------------

def test_refused_splice_is_a_warning(servers, proxies, backend):
    """A splice the engine refuses (here: the client reset while it
    waited in the accept queue) shows at the default log level. Spliced
    at once (--splice-after 0): a relayed one would read the reset."""
    up = servers(end_of)
    px = proxies(up.addr, "--backend", backend, "--no-check", "--splice-after", "0",
                 "--max-conns", "1")
    first = socket.create_connection(px.addr, timeout=10)
    try:
        first.sendall(b"x")
        time.sleep(0.3)                 # spliced: the listener is off now
        with socket.create_connection(px.addr, timeout=10) as second:
            second.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        time.sleep(0.2)                 # the reset reached its accept-queue entry
    finally:
        first.close()                   # room again: the proxy accepts the dead one
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "WARNING" not in (err := px.stderr()):
        time.sleep(0.1)
    assert "WARNING" in err and "refused to splice" in err, err
    assert px.stop() == 0
