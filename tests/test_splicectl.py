"""splicectl: the proxy as a subprocess on loopback, ls --json, bad args."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def splicectl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "splicectl", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, **kw)


class Upstream:
    """First byte picks the mode: b'E' echoes, b'H' replies with the sha256
    of everything after it once the client half-closes."""

    def __init__(self) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.addr = "%s:%d" % self.ls.getsockname()
        self.threads: list[threading.Thread] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            try:
                s, _ = self.ls.accept()
            except OSError:
                return
            t = threading.Thread(target=self._conn, args=(s,), daemon=True)
            self.threads.append(t)
            t.start()

    def _conn(self, s: socket.socket) -> None:
        with s:
            try:
                mode = s.recv(1)
                if mode == b"E":
                    while d := s.recv(1 << 16):
                        s.sendall(d)
                elif mode == b"H":
                    h = hashlib.sha256()
                    while d := s.recv(1 << 16):
                        h.update(d)
                    s.sendall(h.hexdigest().encode())
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ls.close()
        self.t.join(5)


class Proxy:
    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([PY, "-m", "splicectl", "proxy", "127.0.0.1:0", *args], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("listening on "):
            self.p.kill()
            raise AssertionError(f"proxy did not start: {line!r} {self.p.stderr.read()}")
        self.banner = line.strip()
        host_port = line.split()[2].rstrip(",")
        host, _, port = host_port.rpartition(":")
        self.addr = (host, int(port))

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            self.p.stdout.close()
            self.p.stderr.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


@pytest.fixture
def proxies():
    started: list[Proxy] = []
    yield lambda *a: started.append(Proxy(*a)) or started[-1]
    for p in started:
        p.stop(signal.SIGKILL)


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while d := s.recv(1 << 16):
        out += d
    return bytes(out)


def one_client(addr, rng: random.Random) -> str | None:
    size = rng.choice([0, 1, rng.randrange(1, 4096), rng.randrange(1, 1 << 20)])
    data = rng.randbytes(size)
    mode = rng.choice([b"E", b"H"])
    with socket.create_connection(addr, timeout=30) as s:
        def send():
            s.sendall(mode + data)
            s.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
        t = threading.Thread(target=send)
        t.start()
        got = recv_all(s)
        t.join()
    want = data if mode == b"E" else hashlib.sha256(data).hexdigest().encode()
    if got != want:
        return f"mode {mode} size {size}: got {len(got)} bytes, wanted {len(want)}"
    return None


@pytest.mark.parametrize("engine", ["bpf", "worker"])
def test_many_clients_half_close_hash_checked(upstream, proxies, engine):
    px = proxies(upstream.addr, "--backend", engine)
    assert px.banner.endswith(f", backend {engine}")
    errors: list = []
    def worker(seed):
        try:
            r = one_client(px.addr, random.Random(seed))
        except Exception as e:  # noqa: BLE001
            r = repr(e)
        if r:
            errors.append(r)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert px.stop() == 0


def test_upstream_down_closes_client(upstream, proxies):
    px = proxies(upstream.addr, "--connect-timeout", "1")
    upstream.close()
    with socket.create_connection(px.addr, timeout=10) as s:
        s.sendall(b"E hello")
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
    assert px.stop() == 0


def test_second_upstream_used_when_first_refuses(upstream, proxies):
    dead = socket.create_server(("127.0.0.1", 0))
    dead_addr = "%s:%d" % dead.getsockname()
    dead.close()
    px = proxies(dead_addr, upstream.addr, "--no-check")
    for i in range(4):
        assert one_client(px.addr, random.Random(i)) is None


def test_sigterm_with_live_connections_exits_within_grace(upstream, proxies):
    px = proxies(upstream.addr, "--grace", "1")
    conns = [socket.create_connection(px.addr) for _ in range(5)]
    for s in conns:
        s.sendall(b"Eping")
        assert s.recv(4) == b"ping"
    t0 = time.monotonic()
    assert px.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5
    for s in conns:
        s.settimeout(5)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()


def test_ls_json_lists_live_splices(upstream, proxies):
    px = proxies(upstream.addr)
    conns = [socket.create_connection(px.addr) for _ in range(3)]
    for s in conns:
        s.sendall(b"Eping")
        assert s.recv(4) == b"ping"
    time.sleep(0.6)  # engines publish every 0.2 s
    r = splicectl("ls", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mine = [x for x in rows if x["pid"] == px.p.pid and x["state"] == "active"]
    assert len(mine) == 6, rows  # two splices per connection
    # (A first message that arrived before the splice is copied: 0 is fine.)
    assert all(0 <= x["kernel_bytes"] <= x["bytes"] for x in mine), mine
    ports = {s.getsockname()[1] for s in conns}
    assert {int(x["source_peer"].rsplit(":", 1)[1]) for x in mine} & ports == ports
    r = splicectl("ls")
    assert r.returncode == 0 and "active" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    for s in conns:
        s.close()


@pytest.mark.parametrize("args", [
    ["proxy", "nonsense", "127.0.0.1:1"],
    ["proxy", "127.0.0.1:0", "127.0.0.1:99999"],
    ["proxy", "127.0.0.1:0"],
    ["proxy", "127.0.0.1:0", "127.0.0.1:1", "--idle", "x"],
    ["proxy", "127.0.0.1:0", "127.0.0.1:1"],      # nothing listens there
    ["nosuchcommand"],
])
def test_bad_arguments_exit_2_with_one_line(args):
    r = splicectl(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("option,value", [
    ("--idle", "inf"), ("--idle", "nan"), ("--idle", "-1"), ("--idle", "0"),
    ("--idle", "0.0001"), ("--idle", "1e300"), ("--idle", "x"),
    ("--grace", "inf"), ("--grace", "nan"), ("--grace", "-1"), ("--grace", "0.0001"),
    ("--grace", "-inf"), ("--grace", "1e300"),
    ("--connect-timeout", "inf"), ("--connect-timeout", "nan"), ("--connect-timeout", "-1"),
    ("--connect-timeout", "0"), ("--connect-timeout", "0.0001"), ("--connect-timeout", "1e300"),
    ("--max-conns", "-1"), ("--max-conns", "1.5"), ("--max-conns", "inf"),
    ("--max-conns", "100000000"),
    ("--backlog-cap", "inf"), ("--backlog-cap", "nan"), ("--backlog-cap", "-1"),
    ("--backlog-cap", "1K"), ("--backlog-cap", "1G"), ("--backlog-cap", "1e400"),
    ("--metrics", "127.0.0.1:70000"), ("--metrics", "127.0.0.1:-1"),
    ("--metrics", "nonsense"), ("--metrics", "127.0.0.1:0x50"),
    ("LISTEN", "127.0.0.1:65536"), ("LISTEN", "127.0.0.1:-5"), ("LISTEN", "127.0.0.1:1e3"),
    ("UPSTREAM", "127.0.0.1:0"), ("UPSTREAM", "127.0.0.1:65536"),
])
def test_bad_values_are_refused_at_start(option, value):
    """Each bad value: exit 2 and one stderr line that names the option,
    before any connection could be broken by it."""
    listen, upstream, extra = "127.0.0.1:0", "127.0.0.1:9", []
    if option == "LISTEN":
        listen = value
    elif option == "UPSTREAM":
        upstream = value
    else:
        extra = [option, value]
    try:
        r = subprocess.run([PY, "-m", "splicectl", "proxy", listen, upstream, *extra,
                            "--no-check", "--backend", "worker"],
                           cwd=ROOT, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{option} {value} was accepted: the proxy started")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    name = value if option in ("LISTEN", "UPSTREAM") else option
    assert name in lines[0], lines[0]


def test_upstream_that_is_the_listener_is_refused():
    """An upstream that is the proxy's own LISTEN address would loop every
    connection back into the proxy until it runs out of fds."""
    with socket.socket() as probe:              # a free port, then let it go
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        r = subprocess.run([PY, "-m", "splicectl", "proxy", f"127.0.0.1:{port}",
                            f"127.0.0.1:{port}", "--no-check", "--backend", "worker"],
                           cwd=ROOT, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the proxy started with itself as its upstream")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], r.stderr


@pytest.fixture
def http_server(tmp_path):
    """Python's http.server on loopback, serving a few files of random bytes."""
    files = {}
    for name, size in (("small", 100), ("mid", 300_000), ("big", 24 << 20)):
        data = random.Random(name).randbytes(size)
        (tmp_path / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    p = subprocess.Popen([PY, "-m", "http.server", "0", "--bind", "127.0.0.1",
                          "--directory", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
        port = int(line.split(" port ")[1].split()[0])
        yield f"127.0.0.1:{port}", files
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


@pytest.mark.parametrize("engine", ["bpf", "worker"])
def test_http_server_and_curl_through_the_proxy(http_server, proxies, tmp_path, engine):
    """curl fetches files from http.server through the proxy (keep-alive
    off and on, several at once), every body hash-checked."""
    addr, files = http_server
    px = proxies(addr, "--backend", engine)
    base = f"http://{px.addr[0]}:{px.addr[1]}"
    out = tmp_path / "out"
    out.mkdir()
    # One curl, three URLs on one keep-alive connection; and 8 curls at once.
    args = []
    for name in files:
        args += [f"{base}/{name}", "-o", str(out / f"ka-{name}")]
    runs = [subprocess.Popen(["curl", "-sSf", "--max-time", "60", *args])]
    for i in range(8):
        name = list(files)[i % 3]
        runs.append(subprocess.Popen(["curl", "-sSf", "--max-time", "60", f"{base}/{name}",
                                      "-o", str(out / f"{i}-{name}")]))
    assert [r.wait(90) for r in runs] == [0] * len(runs)
    got = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir()}
    assert len(got) == 3 + 8
    for fname, digest in got.items():
        assert digest == files[fname.split("-", 1)[1]], fname
    assert px.stop() == 0


def test_top_in_tmux_shows_rows_and_quits_on_q(upstream, proxies):
    """`splicectl top` in a real terminal (tmux): the live rows appear,
    refresh, and `q` ends it with status 0."""
    px = proxies(upstream.addr)
    conns = [socket.create_connection(px.addr) for _ in range(2)]
    for s in conns:
        s.sendall(b"Eping")
        assert s.recv(4) == b"ping"
    session = f"sosplice-top-{os.getpid()}"
    status = Path(f"/tmp/{session}.status")
    cmd = f"cd {ROOT} && {PY} -m splicectl top 0.3 --pid {px.p.pid}; echo $? > {status}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd],
                   check=True, timeout=10)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, timeout=10).stdout
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and screen().count("active") < 4:
            time.sleep(0.2)
        text = screen()
        assert text.count("active") >= 4, text  # two splices per connection
        ports = [str(s.getsockname()[1]) for s in conns]
        assert all(p in text for p in ports), text
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not status.exists():
            time.sleep(0.1)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
        status.unlink(missing_ok=True)
        for s in conns:
            s.close()


def test_completed_connects_survive_a_busy_loop(proxies):
    """A connect that completed while the proxy's loop was busy with
    hundreds of others is spliced, not timed out (--connect-timeout far
    shorter than one busy round)."""
    N = 500
    up = socket.create_server(("127.0.0.1", 0), backlog=1024)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        up.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(up.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept)
    t.start()
    clients: list[socket.socket] = []
    try:
        px = proxies("%s:%d" % up.getsockname(), "--connect-timeout", "0.05")
        for _ in range(N):  # all at once: non-blocking connects
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(px.addr)
            clients.append(c)
        deadline = time.monotonic() + 20
        while len(held) < N + 1 and time.monotonic() < deadline:  # +1: the start-up check
            time.sleep(0.05)
        time.sleep(0.5)
        closed = 0
        for c in clients:
            c.setblocking(False)
            try:
                closed += c.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert (len(held), closed) == (N + 1, 0)
    finally:
        stop.set()
        t.join()
        up.close()
        for s in clients + held:
            s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = recv_all(s).decode().split("\r\n\r\n", 1)[1]
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in body.splitlines()
                                      if line and not line.startswith("#"))}


@pytest.mark.parametrize("engine", ["bpf", "worker"])
def test_metrics_count_bytes_and_kernel_bytes(upstream, proxies, engine):
    """sosplice_bytes_total counts every byte each way, exactly, and
    sosplice_kernel_bytes_total the part moved without a copy through the
    proxy: at most that, and all of it on the worker backend."""
    port = _free_port()
    px = proxies(upstream.addr, "--backend", engine, "--metrics", f"127.0.0.1:{port}")
    data = random.Random(5).randbytes(4 << 20)
    with socket.create_connection(px.addr, timeout=30) as s:
        s.sendall(b"E" + data)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == data
    deadline = time.monotonic() + 10
    while (m := _metrics(port)).get('sosplice_bytes_total{direction="down"}') != len(data) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    up, down = 'direction="up"', 'direction="down"'
    assert m[f"sosplice_bytes_total{{{up}}}"] == len(data) + 1, m
    assert m[f"sosplice_bytes_total{{{down}}}"] == len(data), m
    for d in (up, down):
        kernel, total = m[f"sosplice_kernel_bytes_total{{{d}}}"], m[f"sosplice_bytes_total{{{d}}}"]
        assert 0 <= kernel <= total, m
        if engine == "worker":
            assert kernel == total, m


@pytest.mark.parametrize("engine", ["bpf", "worker"])
def test_at_the_fd_limit_connections_wait_and_are_served(upstream, engine, tmp_path):
    """Under `ulimit -n 64`, 40 clients at once: the proxy serves what
    its fds allow and leaves the rest in the listen backlog, as HAProxy
    does at maxconn, instead of accepting them and cutting them for want
    of an upstream socket (they used to get EOF right after connecting,
    33 of 40, with an ERROR line each). As served clients close, the
    waiting ones are served, every one with its own bytes."""
    err = tmp_path / "stderr"
    with open(err, "w") as ef:
        p = subprocess.Popen(["prlimit", "--nofile=64:64", PY, "-m", "splicectl", "proxy",
                              "--backend", engine, "127.0.0.1:0", upstream.addr],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=ef, text=True)
    clients: list[socket.socket] = []
    try:
        line = p.stdout.readline()
        assert line.startswith("listening on "), (line, err.read_text())
        host, _, port = line.split()[2].rstrip(",").rpartition(":")
        addr = (host, int(port))
        msgs = [f"client {i} ".encode() * 50 for i in range(40)]
        for m in msgs:
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"E" + m)
            clients.append(s)
        served: set[int] = set()

        def serve_ready(wait: float) -> None:
            """Read the echo of every client that has one within `wait`."""
            deadline = time.monotonic() + wait
            for i, s in enumerate(clients):
                if i in served:
                    continue
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    first = s.recv(1 << 16, socket.MSG_PEEK)
                except (TimeoutError, BlockingIOError):
                    continue
                assert first, f"client {i} got EOF instead of its echo"
                s.settimeout(10)
                got = b""
                while len(got) < len(msgs[i]):
                    d = s.recv(1 << 16)
                    assert d, f"client {i} got EOF after {len(got)} bytes"
                    got += d
                assert got == msgs[i], f"client {i} got another client's bytes or a cut echo"
                served.add(i)

        serve_ready(3.0)
        first_round = len(served)
        assert 0 < first_round < len(clients), \
            f"{first_round} of {len(clients)} served at once under 64 fds"
        deadline = time.monotonic() + 60
        while len(served) < len(clients) and time.monotonic() < deadline:
            for i in sorted(served):
                if clients[i].fileno() >= 0:
                    clients[i].close()   # frees its connection's fds in the proxy
            serve_ready(1.0)
        assert len(served) == len(clients), f"{len(served)} of {len(clients)} ever served"
    finally:
        for s in clients:
            s.close()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
    log = err.read_text()
    assert "ERROR" not in log, log
    assert log.count("fill the limit") >= 1, log
