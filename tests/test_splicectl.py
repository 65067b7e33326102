"""splicectl: the proxy as a subprocess on loopback, ls --json, bad args."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
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
    of everything after it once the client half-closes, b'R' resets the
    connection once the client has half-closed."""

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
                elif mode == b"R":
                    while s.recv(1 << 16):
                        pass
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
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
    """`splicectl proxy LISTEN *args`; its stderr (a line per connection at
    the default level) goes to a file, never a pipe that could fill."""

    def __init__(self, *args: str, listen: str = "127.0.0.1:0", env: dict | None = None) -> None:
        # O_APPEND: the child shares this file's offset, which stderr()
        # moves to 0 to read; without it the proxy's next line would
        # overwrite the file's start (seen: a log line lost that way).
        # mode "a+" alone does not set it: TemporaryFile opens the fd
        # itself (O_TMPFILE) and io.open(fd, "a+") only seeks to the end.
        self.err = tempfile.TemporaryFile(mode="a+")
        fd = self.err.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self.p = subprocess.Popen([PY, "-m", "splicectl", "proxy", listen, *args], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        line = self.p.stdout.readline()
        if not line.startswith("listening on "):
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"proxy did not start: {line!r} {self.stderr()}")
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
            if not self.err.closed:
                self.err_text = self.stderr()
                self.err.close()

    def stderr(self) -> str:
        """What the proxy wrote to stderr so far (all of it once stopped)."""
        if self.err.closed:
            return self.err_text
        self.err.seek(0)
        return self.err.read()


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
    errors = many_clients(px.addr, 50, 60)
    assert not errors, errors
    assert px.stop() == 0


def many_clients(addr, n: int, timeout: float) -> list[str]:
    """`n` one_client()s at once, seeds 0..n-1; what went wrong in them."""
    errors: list[str] = []

    def client(seed: int) -> None:
        try:
            r = one_client(addr, random.Random(seed))
        except Exception as e:  # noqa: BLE001
            r = repr(e)
        if r:
            errors.append(r)
    ts = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    return errors


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
    px = proxies(upstream.addr, "--splice-after", "0")   # spliced at once: ls shows splices
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



def test_ls_json_and_the_engine_agree_on_none(env, splicer):
    """`ls --json` shows a splice as the engine's stats() and its snapshot
    file do: error and idle null (None) while it is active and has no
    limits, reason "-" (sosplice.reason_name); EOF and its limits once
    ended."""
    import sosplice
    from sosplice import snapshot
    L0, L1 = env.pair()
    R0, R1 = env.pair()
    X0, X1 = env.pair()
    Y0, Y1 = env.pair()
    live = splicer.splice(L1, R0)
    ended = splicer.splice(X1, Y0, max=1000, idle=30.5)
    X0.shutdown(socket.SHUT_WR)
    assert ended.wait(timeout=5) == 0 and live.active
    r = splicectl("ls", "--json", "--pid", str(os.getpid()))
    assert r.returncode == 0, r.stderr
    rows = {x["source_cookie"]: x for x in json.loads(r.stdout)}
    infos = {i.source_cookie: i for i in splicer.stats()}
    with open(snapshot.path_for(splicer)) as f:
        raw = {s["source_cookie"]: s for s in json.load(f)["splices"]}
    files = {i.source_cookie: i for s in snapshot.read([os.getpid()]) for i in s.splices}
    assert len(infos) == 2 and set(infos) <= set(rows) & set(raw) & set(files), (rows, infos)
    for c, i in infos.items():
        row, fi = rows[c], files[c]
        assert (row["error"], row["idle"], row["max"], row["state"]) == \
            (raw[c]["error"], raw[c]["idle"], raw[c]["max"], raw[c]["state"]) == \
            (i.error, i.idle, i.max, i.state) == (fi.error, fi.idle, fi.max, fi.state), (row, i)
        assert row["reason"] == sosplice.reason_name(i.error)
    assert sorted((rows[c]["reason"], rows[c]["error"], rows[c]["idle"]) for c in infos) == \
        [("-", None, None), ("EOF", 0, 30.5)]

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
    ("--splice-after", "-1"), ("--splice-after", "0.0001"), ("--splice-after", "nan"),
    ("--splice-after", "inf"), ("--splice-after", "1e300"), ("--splice-after", "x"),
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
        while time.monotonic() < deadline and screen().count("active") < 2:
            time.sleep(0.2)
        text = screen()
        assert text.count("active") == 2, text  # one row per connection
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
    proxy: at most that, and all of it on the worker backend (spliced at
    once: relayed bytes are copies; test_proxy_relay counts those)."""
    port = _free_port()
    px = proxies(upstream.addr, "--backend", engine, "--metrics", f"127.0.0.1:{port}",
                 "--splice-after", "0")
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


# -- what operators see: the log line, the metrics, ls and top (issue 16) -------

def _log_lines(px: Proxy, n: int, timeout: float = 15) -> list[dict[str, str]]:
    """The proxy's first `n` per-connection lines, as dicts (logfmt)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in px.stderr().splitlines() if " conn=" in line]
        if len(lines) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == n, px.stderr()
    out = []
    for line in lines:
        assert " INFO " in line, line
        fields = line.split(" INFO ", 1)[1].split()
        assert all("=" in f for f in fields), line
        out.append(dict(f.split("=", 1) for f in fields))
    return out


def _scrape(port: int) -> dict[str, list]:
    """The metrics, parsed by prometheus_client's own parser: family name
    (as the parser names it) -> samples."""
    from prometheus_client.parser import text_string_to_metric_families
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        head, body = recv_all(s).decode().split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.0 200") and "text/plain; version=0.0.4" in head, head
    return {f.name: f.samples for f in text_string_to_metric_families(body)}


def _sample(fams: dict[str, list], name: str, **labels: str) -> float | None:
    for samples in fams.values():
        for smp in samples:
            if smp.name == name and smp.labels == labels:
                return smp.value
    return None


@pytest.mark.parametrize("engine", ["bpf", "worker"])
def test_log_line_and_metrics_of_each_end(upstream, proxies, engine):
    """One connection through a failed upstream then a clean one, one the
    client resets, one the upstream resets: one log line each, whose fields
    are the truth (addresses, exact bytes, why each direction ended), and
    metrics that keep the failed connect, the client's abort and the
    upstream's apart. Spliced at once, so that the worker backend's
    kernel share is 100% (test_proxy_relay has the relayed lines)."""
    dead = socket.create_server(("127.0.0.1", 0))
    dead_addr = "%s:%d" % dead.getsockname()
    dead.close()
    port = _free_port()
    px = proxies(dead_addr, upstream.addr, "--no-check", "--backend", engine,
                 "--metrics", f"127.0.0.1:{port}", "--splice-after", "0")
    data = random.Random(16).randbytes(300_000)
    clients = []

    # 1 (and 3): round robin starts at the dead upstream: refused, then
    # the next one.
    with socket.create_connection(px.addr, timeout=30) as s:
        clients.append("%s:%d" % s.getsockname())
        time.sleep(0.2)                     # a duration the line must show
        s.sendall(b"E" + data)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == data
    # 2: the client resets once it has its echo.
    s = socket.create_connection(px.addr, timeout=30)
    clients.append("%s:%d" % s.getsockname())
    s.sendall(b"E" + data)
    got = b""
    while len(got) < len(data):
        got += s.recv(1 << 16)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    # 3: the upstream resets once the client has half-closed.
    with socket.create_connection(px.addr, timeout=30) as s:
        clients.append("%s:%d" % s.getsockname())
        s.sendall(b"R" + data)
        s.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionResetError):
            recv_all(s)

    lines = sorted(_log_lines(px, 3), key=lambda f: int(f["conn"]))
    listener = "%s:%d" % px.addr
    for f, client in zip(lines, clients):
        assert (f["client"], f["listener"], f["upstream"]) == (client, listener, upstream.addr), f
        assert re.fullmatch(r"\d+\.\d{6}s", f["connect"]) and re.fullmatch(r"\d+\.\d{3}s", f["duration"]), f
        assert re.fullmatch(r"\d{1,3}%", f["kernel"]) and int(f["kernel"][:-1]) <= 100, f
    one, two, three = lines
    assert (one["up_bytes"], one["down_bytes"]) == (str(len(data) + 1), str(len(data))), one
    assert float(one["duration"][:-1]) >= 0.2, one
    assert (one["up_end"], one["down_end"], one["end"]) == ("EOF", "EOF", "closed"), one
    assert (two["up_bytes"], two["down_bytes"]) == (str(len(data) + 1), str(len(data))), two
    assert two["end"] == "client_abort" and "EOF" not in (two["up_end"], two["down_end"]), two
    assert three["up_bytes"] == str(len(data) + 1) and three["down_bytes"] == "0", three
    assert three["end"] == "upstream_abort" and three["up_end"] == "EOF", three
    if engine == "worker":
        assert {f["kernel"] for f in lines} == {"100%"}, lines

    fams = _scrape(port)
    want = {"sosplice_info", "sosplice_connections", "sosplice_connections_active",
            "sosplice_bytes", "sosplice_kernel_bytes", "sosplice_splice_ends",
            "sosplice_upstream_connect_failures", "sosplice_client_aborts",
            "sosplice_upstream_aborts", "sosplice_resets",
            "sosplice_connection_duration_seconds", "sosplice_upstream_connect_seconds"}
    assert set(want) <= set(fams), sorted(fams)
    info = [smp for smp in fams["sosplice_info"] if smp.name == "sosplice_info"]
    assert len(info) == 1 and info[0].value == 1 and info[0].labels["backend"] == engine, info
    assert info[0].labels["version"], info
    m = lambda name, **labels: _sample(fams, name, **labels)  # noqa: E731
    assert m("sosplice_connections_total", listener=listener) == 3
    assert m("sosplice_connections_active") == 0
    # Round robin: connections 1 and 3 tried the dead upstream first.
    assert m("sosplice_upstream_connect_failures_total", upstream=dead_addr) == 2
    assert m("sosplice_upstream_connect_failures_total", upstream=upstream.addr) is None
    assert m("sosplice_client_aborts_total") == 1
    assert m("sosplice_upstream_aborts_total") == 1
    assert fams["sosplice_resets"] == []             # the proxy cut nothing itself
    assert m("sosplice_bytes_total", direction="up") == 3 * (len(data) + 1)
    assert m("sosplice_bytes_total", direction="down") == 2 * len(data)
    ends = {smp.labels["reason"]: smp.value for smp in fams["sosplice_splice_ends"]
            if smp.name == "sosplice_splice_ends_total"}
    assert sum(ends.values()) == 6 and ends["EOF"] >= 3, ends
    assert m("sosplice_connection_duration_seconds_count") == 3
    assert m("sosplice_connection_duration_seconds_bucket", le="0.1") <= 2   # one took 0.2 s
    assert m("sosplice_upstream_connect_seconds_count") == 3
    assert px.stop() == 0


def test_log_level_warning_keeps_only_problems(upstream, proxies):
    """--log-level warning: no line per connection."""
    px = proxies(upstream.addr, "--log-level", "warning")
    assert one_client(px.addr, random.Random(1)) is None
    time.sleep(0.5)
    assert px.stop() == 0
    assert "conn=" not in px.stderr()


def _view(*args: str, env: dict) -> str:
    r = subprocess.run([PY, "-m", "splicectl", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def dual_stack(upstream, tmp_path):
    """Two proxies with a run dir of their own, one on a dual-stack [::]
    listener, each with two connections over IPv4 (::ffff:-mapped on the
    first) that have echoed 100,000 bytes each way. Yields (env for ls and
    top, client ports, listener ports, the proxies)."""
    env = dict(os.environ, SOSPLICE_RUN_DIR=str(tmp_path / "run"), COLUMNS="200")
    pxs, conns = [], []
    try:
        for listen in ("[::]:0", "127.0.0.1:0"):
            # Spliced at once: ls shows the splices' bytes, not relayed ones.
            pxs.append(Proxy(upstream.addr, "--backend", "worker", "--splice-after", "0",
                             listen=listen, env=env))
            for _ in range(2):
                s = socket.create_connection(("127.0.0.1", pxs[-1].addr[1]), timeout=10)
                conns.append(s)
                s.sendall(b"E" + b"x" * 99_999)
                got = 0
                while got < 99_999:
                    got += len(s.recv(1 << 16))
        yield env, [s.getsockname()[1] for s in conns], [p.addr[1] for p in pxs], pxs
    finally:
        for s in conns:
            s.close()
        for p in pxs:
            p.stop(signal.SIGKILL)


def test_ls_fits_80_columns_with_a_dual_stack_listener(dual_stack):
    """ls in a terminal 200 wide: at most 80 columns, IPv4-mapped peers as
    IPv4, one row per connection with both byte counts uncut, and every
    column explained in --help."""
    env, ports, _, pxs = dual_stack
    out = _view("ls", env=env)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert "::ffff:" not in out and "…" not in out, out
    head = next(line for line in lines if line.lstrip().startswith("PID"))
    assert head.split() == ["PID", "A", "B", "A→B", "A←B", "KERN", "RATE", "IDLE", "STATE"], head
    assert "2 processes" in out and "4 live, 0 ended connections" in out, out
    for port in ports:
        rows = [line for line in lines if f"127.0.0.1:{port} " in line]
        assert len(rows) == 1, (port, out)         # both directions on one row
        pid, a, b, up, down, kern, *_ = rows[0].split()
        assert int(pid) in {p.p.pid for p in pxs} and b.startswith("127.0.0.1:"), rows[0]
        assert (up, down, kern) == ("98K", "98K", "100%"), rows[0]   # 100,000 bytes, worker
    helptext = _view("ls", "--help", env=env)
    for word in head.split() + ["active*", "flush", "EOF", "/run/sosplice", "SOSPLICE_RUN_DIR"]:
        assert word in helptext, word
    assert "q  quit" in _view("top", "--help", env=env)


def test_render_cuts_long_addresses_before_numbers():
    """Addresses too long for 80 columns lose their left end, never their
    port, and no number is cut (a pure function: no kernel involved)."""
    from sosplice.snapshot import EngineSnapshot
    from splicectl import view
    a, b = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:1", "2001:db8:1111:2222:3333:4444:5555:2"
    doc = {"pid": 4194304, "time": time.time(), "splices": [
        {"source": [[b, 443], [a, 50001]], "drain": [[b, 40000], [b, 8443]],
         "source_cookie": 1, "drain_cookie": 2, "bytes": 123_456_789_012, "kernel_bytes": 0,
         "state": "active", "age": 3.0},
        {"source": [[b, 40000], [b, 8443]], "drain": [[b, 443], [a, 50001]],
         "source_cookie": 2, "drain_cookie": 1, "bytes": 5, "kernel_bytes": 5,
         "state": "done", "error": 104, "age": 3.0}]}
    console = view.Console(width=80, record=True, file=io.StringIO())
    console.print(view.render(view.snapshot_from_docs([EngineSnapshot.from_json(doc)]), width=80))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    assert "pid 4194304" in lines[0], lines
    row = next(line for line in lines if ":50001 " in line)
    assert ":50001 " in row and "…" in row and ":8443 " in row, row
    assert " 115G " in row and " 5 " in row and " 0% " in row and "active/ECONNRESET" in row, row


def test_top_batch_prints_whole_frames_to_a_pipe(dual_stack):
    """top | cat (and --batch): one frame per interval, each ending with a
    newline, no terminal escapes, and the rows in every frame."""
    env, ports, lports, pxs = dual_stack
    for extra in ([], ["--batch"]):
        r = subprocess.run(f"{PY} -m splicectl top 0.3 3 {' '.join(extra)} | cat", shell=True,
                           cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert out.endswith("\n") and "\x1b" not in out, repr(out[-200:])
        frames = out.split("splicectl top every 0.3 s by bytes")
        assert frames[0] == "" and len(frames) == 4, out
        for f in frames[1:]:
            assert f.endswith("\n"), repr(f)
            assert "last 60 s" in f and all(f"127.0.0.1:{p} " in f for p in ports), f
            assert max(len(line) for line in f.splitlines()) <= 80, f


def test_sparkline_scales_to_the_peak_and_forgets_the_old():
    """One character per 2 s of the last minute, the peak full height,
    blank before the first reading, readings older than a minute gone."""
    from splicectl import view
    now = 1000.0
    hist = [(now - 120, 1e12)] + [(now - 40 + i, float(i)) for i in range(41)]   # 0 .. 40 B/s
    line = view.sparkline(hist, now)
    assert len(line) == view.SPARK_WIDTH == 30
    assert line[:9] == " " * 9 and line[-1] == "█", repr(line)       # 1e12 forgotten
    assert list(line[10:]) == sorted(line[10:]) and line[10] == "▁", repr(line)
    assert view.sparkline([], now) == " " * 30
    assert view.sparkline([(now, 0.0)], now) == " " * 29 + "▁"


def test_log_lines_of_connections_cut_at_exit(upstream, proxies):
    """Connections still open when --grace runs out are reset at exit; each
    still gets its line, with its exact bytes, both directions `cut` and
    end=grace (written after the engine has closed)."""
    px = proxies(upstream.addr, "--grace", "0.3", "--backend", "worker")
    conns = [socket.create_connection(px.addr, timeout=10) for _ in range(2)]
    ports = sorted(s.getsockname()[1] for s in conns)
    for s in conns:
        s.sendall(b"Eping")
        assert s.recv(4) == b"ping"
    try:
        assert px.stop(signal.SIGTERM) == 0
        lines = _log_lines(px, 2, timeout=0)
    finally:
        for s in conns:
            s.close()
    assert sorted(int(f["client"].rsplit(":", 1)[1]) for f in lines) == ports, lines
    for f in lines:
        assert (f["up_bytes"], f["down_bytes"], f["up_end"], f["down_end"], f["end"]) == \
            ("5", "4", "cut", "cut", "grace"), f


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
