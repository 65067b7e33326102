"""splicectl proxy --config (issue 15): the file, several listeners, SIGHUP
reload, the PROXY protocol header, the first line.

The proxy runs as a subprocess on loopback, once per backend (the
`backend` fixture), with its own SOSPLICE_RUN_DIR so that `ls` sees only
it. Every byte through it is checked by sha256; the PROXY header is parsed
on the upstream side by the parser below, written from HAProxy's spec,
not from splicectl's code.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from test_splicectl import ROOT, Upstream, _free_port, _metrics, recv_all, upstream  # noqa: F401

PY = sys.executable


# -- the file: every mistake is one line that says file, line and key --------

GOOD = """\
backend = "worker"
grace = 2

[[listen]]
bind = "127.0.0.1:0"
upstreams = ["127.0.0.1:9"]

[[listen]]
bind = "[::1]:0"
upstreams = ["127.0.0.1:9", "[::1]:9"]
idle = 30
max_conns = 10
send_proxy = "v2"
"""


def test_good_file_loads_every_key():
    from splicectl import config

    cfg = config.from_dict(tomllib.loads(GOOD), config._Lines(GOOD), "x")
    assert cfg.backend == "worker" and cfg.grace == 2 and cfg.connect_timeout == 3.0
    assert cfg.workers == 1 and cfg.splice_after == 0.5
    two = GOOD.replace("grace = 2", "grace = 2\nworkers = 2\nsplice_after = 0")
    cfg2 = config.from_dict(tomllib.loads(two), config._Lines(two), "x")
    assert (cfg2.workers, cfg2.splice_after) == (2, 0.0)
    a, b = cfg.listeners
    assert (a.bind, a.upstreams, a.idle, a.max_conns, a.send_proxy) == \
        (("127.0.0.1", 0), (("127.0.0.1", 9),), None, 0, None)
    assert (b.bind, b.upstreams, b.idle, b.max_conns, b.send_proxy) == \
        (("::1", 0), (("127.0.0.1", 9), ("::1", 9)), 30.0, 10, "v2")


@pytest.mark.parametrize("change, line, key", [
    # (replace this with that in GOOD), the line and key the error must name
    (('grace = 2', 'grace = 2\nbakend = "bpf"'), 3, "bakend"),
    (('grace = 2', 'grace = -1'), 2, "grace"),
    (('grace = 2', 'grace = "2"'), 2, "grace"),
    (('backend = "worker"', 'backend = "ebpf"'), 1, "backend"),
    (('grace = 2', 'grace = 2\nbacklog_cap = "1K"'), 3, "backlog_cap"),
    (('grace = 2', 'grace = 2\nmetrics = "nonsense"'), 3, "metrics"),
    (('grace = 2', 'grace = 2\nworkers = 0'), 3, "workers"),
    (('grace = 2', 'grace = 2\nworkers = 1.5'), 3, "workers"),
    (('grace = 2', 'grace = 2\nsplice_after = -1'), 3, "splice_after"),
    (('grace = 2', 'grace = 2\nsplice_after = 0.0001'), 3, "splice_after"),
    (('grace = 2', 'grace = 2\nsplice_after = "1"'), 3, "splice_after"),
    (('upstreams = ["127.0.0.1:9"]', 'upstreams = ["127.0.0.1:x"]'), 6, "listen[0].upstreams"),
    (('upstreams = ["127.0.0.1:9"]', 'upstreams = []'), 6, "listen[0].upstreams"),
    (('upstreams = ["127.0.0.1:9"]', 'upstreams = "127.0.0.1:9"'), 6, "listen[0].upstreams"),
    (('upstreams = ["127.0.0.1:9"]\n', ''), 4, "listen[0].upstreams"),      # missing
    (('bind = "[::1]:0"', 'bind = "127.0.0.1:0"'), 9, "listen[1].bind"),    # twice
    (('bind = "[::1]:0"', 'bind = "no-such-host.invalid:80"'), 9, "listen[1].bind"),
    (('idle = 30', 'idle = 0'), 11, "listen[1].idle"),
    (('max_conns = 10', 'max_conns = -1'), 12, "listen[1].max_conns"),
    (('max_conns = 10', 'max_conns = true'), 12, "listen[1].max_conns"),
    (('send_proxy = "v2"', 'send_proxy = "v3"'), 13, "listen[1].send_proxy"),
    (('send_proxy = "v2"', 'send_prxy = "v2"'), 13, "listen[1].send_prxy"),
    (('idle = 30', 'idle = 30 30'), 11, "not TOML"),                        # syntax
    (('[[listen]]\nbind = "[::1]:0"', '[[listn]]\nbind = "[::1]:0"'), 8, "listn"),
])
def test_bad_file_is_one_line_naming_file_line_and_key(tmp_path, change, line, key):
    from splicectl import config

    path = tmp_path / "proxy.toml"
    old, new = change
    assert old in GOOD
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.match(rf"{re.escape(str(path))}:{line}(:\d+)?: ", msg), msg
    assert key in msg, msg


def test_sample_config_unit_and_readme_agree():
    """contrib/proxy.toml loads, README shows it verbatim, the error README
    quotes is the one it gets, and the unit reloads with SIGHUP under
    capabilities rather than root."""
    from splicectl import config

    sample = (ROOT / "contrib/proxy.toml").read_text()
    cfg = config.from_dict(tomllib.loads(sample), config._Lines(sample), "proxy.toml")
    assert [lc.send_proxy for lc in cfg.listeners] == [None, "v2"]
    readme = (ROOT / "README.md").read_text()
    assert f"```toml\n{sample}```" in readme
    bad = sample.replace("idle = 300 ", "idle = -1 ")
    with pytest.raises(config.ConfigError) as e:
        config.from_dict(tomllib.loads(bad), config._Lines(bad), "proxy.toml")
    assert f"`{e.value}`" in readme.replace("\n", " "), str(e.value)
    unit = (ROOT / "contrib/splicectl.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN" in unit
    assert "User=root" not in unit and "DynamicUser=yes" in unit


def test_no_listen_table_is_refused(tmp_path):
    from splicectl import config

    path = tmp_path / "empty.toml"
    path.write_text('backend = "worker"\n')
    with pytest.raises(config.ConfigError, match=r"empty.toml:1: listen: .*\[\[listen\]\]"):
        config.load(path)


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "splicectl", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, **kw)


def test_bad_file_is_refused_before_any_port_is_bound(tmp_path):
    """The first listener's port is taken: had the proxy bound anything
    before reading the whole file, the error would be about that port."""
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        path = tmp_path / "p.toml"
        path.write_text(GOOD.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"', 1)
                        .replace("idle = 30", "idle = 1e300"))
        r = _run("proxy", "--config", str(path), "--no-check")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr.strip() == (f"splicectl proxy: {path}:11: listen[1].idle: must be from "
                                    "0.001 to 2000000 seconds, not 1e+300"), r.stderr
        assert r.stdout == ""
    finally:
        taken.close()


def test_check_validates_and_exits(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    r = _run("proxy", "--config", str(path), "--check")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.startswith(f"{path}: ok, 2 listener(s): 127.0.0.1:0 -> 127.0.0.1:9; "), r.stdout
    path.write_text(GOOD.replace('send_proxy = "v2"', 'send_proxy = 2'))
    r = _run("proxy", "--config", str(path), "--check")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and f"{path}:13: listen[1].send_proxy" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [
    ["--config", "F", "127.0.0.1:0", "127.0.0.1:9"],
    ["--config", "F", "--idle", "5"],
    ["--config", "F", "--backend", "worker"],
    ["--config", "F", "--splice-after", "0"],
    ["--check", "127.0.0.1:0", "127.0.0.1:9"],
    ["--config", "/nonexistent/proxy.toml"],
    [],
])
def test_config_and_command_line_do_not_mix(tmp_path, args):
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    r = _run("proxy", *[str(path) if a == "F" else a for a in args], "--no-check")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


# -- a proxy from a file ------------------------------------------------------

class FileProxy:
    """`splicectl proxy --config PATH` with stderr in a file and its own run
    dir; `addrs` are the listeners' addresses from the first line."""

    def __init__(self, path: Path, tmp: Path, *extra: str) -> None:
        self.path = path
        self.err = tmp / "stderr.log"
        self.run_dir = tmp / "run"
        self.env = dict(os.environ, SOSPLICE_RUN_DIR=str(self.run_dir))
        with open(self.err, "w") as err:
            self.p = subprocess.Popen([PY, "-m", "splicectl", "proxy", "--config", str(path),
                                       *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                      text=True, env=self.env)
        self.banner = self.p.stdout.readline().strip()
        if not self.banner.startswith("listening on "):
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"proxy did not start: {self.banner!r} {self.stderr()}")
        self.addrs = [_addr(a) for a in re.findall(r"(\S+) -> ", self.banner)]

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in (got := self.stderr()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert text in got, got
        return got

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


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.fixture
def file_proxies():
    started: list[FileProxy] = []
    yield lambda *a: started.append(FileProxy(*a)) or started[-1]
    for p in started:
        p.stop(signal.SIGKILL)


def listen_table(bind: str, upstream: str, **more: object) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in more.items())
    return f'\n[[listen]]\nbind = "{bind}"\nupstreams = ["{upstream}"]\n{extra}'


def echo_through(addr: tuple[str, int], data: bytes) -> bytes:
    """E + data through the echo upstream, half-closed; what came back."""
    with socket.create_connection(addr, timeout=30) as s:
        t = threading.Thread(target=lambda: (s.sendall(b"E" + data), s.shutdown(socket.SHUT_WR)))
        t.start()
        got = recv_all(s)
        t.join()
    return got


def test_several_listeners_one_engine_counted_per_listener(upstream, file_proxies, tmp_path,
                                                           backend):
    """Two listeners (IPv4, IPv6) in one process: each carries its own
    hash-checked traffic; the metrics count connections per listener, and
    `ls --json` labels each splice with its listener."""
    mport = _free_port()
    path = tmp_path / "p.toml"
    path.write_text(f'backend = "{backend}"\nmetrics = "127.0.0.1:{mport}"\n'
                    + listen_table("127.0.0.1:0", upstream.addr)
                    + listen_table("[::1]:0", upstream.addr))
    px = file_proxies(path, tmp_path)
    assert px.banner.endswith(f", backend {backend}"), px.banner
    a, b = px.addrs
    assert a[0] == "127.0.0.1" and b[0] == "::1", px.banner
    name_a, name_b = f"127.0.0.1:{a[1]}", f"[::1]:{b[1]}"
    rng = random.Random(15)
    for addr, n in ((a, 2), (b, 3)):
        for _ in range(n):
            data = rng.randbytes(rng.randrange(1, 1 << 20))
            assert hashlib.sha256(echo_through(addr, data)).hexdigest() == \
                hashlib.sha256(data).hexdigest()
    m = _metrics(mport)
    assert m[f'sosplice_connections_total{{listener="{name_a}"}}'] == 2, m
    assert m[f'sosplice_connections_total{{listener="{name_b}"}}'] == 3, m
    # Live connections, one per listener, seen by ls with their listener.
    held = [socket.create_connection(addr, timeout=10) for addr in (a, b)]
    try:
        for s in held:
            s.sendall(b"Eping")
            assert s.recv(4) == b"ping"
        time.sleep(0.8)     # relayed until splice_after (0.5 s) has passed: then spliced
        r = subprocess.run([PY, "-m", "splicectl", "ls", "--json"], cwd=ROOT, env=px.env,
                           capture_output=True, text=True, timeout=30)
        rows = [x for x in json.loads(r.stdout) if x["pid"] == px.p.pid and x["state"] == "active"]
        ports = {s.getsockname()[1]: name for s, name in zip(held, (name_a, name_b))}
        got = {(int(x["source_peer"].rsplit(":", 1)[1]), x["listener"]) for x in rows}
        assert set(ports.items()) <= got, rows
        r = subprocess.run([PY, "-m", "splicectl", "ls"], cwd=ROOT, env=px.env,
                           capture_output=True, text=True, timeout=30)
        assert f"listeners: {name_a} 1 live" in r.stdout and f"{name_b} 1 live" in r.stdout, r.stdout
    finally:
        for s in held:
            s.close()
    assert px.stop() == 0


# -- reload -------------------------------------------------------------------

class Stream:
    """A client that echoes `total` bytes through the proxy in two halves:
    the second is sent only once `go` is set. Both directions hashed."""

    def __init__(self, addr: tuple[str, int], seed: int, total: int, go: threading.Event) -> None:
        self.s = socket.create_connection(addr, timeout=30)
        self.data = random.Random(seed).randbytes(total)
        self.go = go
        self.echoed = 0
        self.got = hashlib.sha256()
        self.error: BaseException | None = None
        self.s.sendall(b"E")
        self.reader = threading.Thread(target=self._read)
        self.writer = threading.Thread(target=self._write)
        self.reader.start()
        self.writer.start()

    def _write(self) -> None:
        try:
            half = len(self.data) // 2
            mv = memoryview(self.data)
            for i in range(0, half, 1 << 16):
                self.s.sendall(mv[i:min(i + (1 << 16), half)])
            if not self.go.wait(30):
                raise TimeoutError("never told to go on")
            for i in range(half, len(self.data), 1 << 16):
                self.s.sendall(mv[i:i + (1 << 16)])
            self.s.shutdown(socket.SHUT_WR)
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def _read(self) -> None:
        try:
            while d := self.s.recv(1 << 16):
                self.got.update(d)
                self.echoed += len(d)
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def finish(self) -> None:
        self.writer.join(60)
        self.reader.join(60)
        self.s.close()
        assert self.error is None, repr(self.error)
        assert self.echoed == len(self.data)
        assert self.got.hexdigest() == hashlib.sha256(self.data).hexdigest()


def _refused(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sighup_reload_keeps_live_connections_whole(upstream, file_proxies, tmp_path, backend):
    """SIGHUP with connections spliced and mid-transfer: they go on to the
    last byte (sha256 both ways), the listener taken out of the file stops
    accepting, the one added starts; a broken file then changes nothing."""
    pa, pb = _free_port(), _free_port()
    a, b = ("127.0.0.1", pa), ("127.0.0.1", pb)
    path = tmp_path / "p.toml"
    head = f'backend = "{backend}"\ngrace = 10\n'
    path.write_text(head + listen_table(f"127.0.0.1:{pa}", upstream.addr))
    px = file_proxies(path, tmp_path)
    assert px.addrs == [a]
    go = threading.Event()
    streams = [Stream(a, seed, 24 << 20, go) for seed in range(3)]
    try:
        deadline = time.monotonic() + 20
        while any(st.echoed < 1 << 20 for st in streams) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(st.echoed >= 1 << 20 for st in streams), [st.echoed for st in streams]
        # In flight: the first half is still coming back, the second unsent.
        path.write_text(head + listen_table(f"127.0.0.1:{pb}", upstream.addr))
        px.p.send_signal(signal.SIGHUP)
        px.wait_log("reloaded: ")
        assert all(st.echoed < len(st.data) for st in streams)
        assert _refused(a), "the removed listener still accepts"
        data = random.Random(7).randbytes(3 << 20)
        assert echo_through(b, data) == data
        # A broken file: logged, the running configuration stays.
        path.write_text(head + listen_table(f"127.0.0.1:{pa}", upstream.addr).replace("]", ""))
        px.p.send_signal(signal.SIGHUP)
        log = px.wait_log("reload failed")
        assert f"keeping the running configuration: {path}:" in log, log
        assert _refused(a)
        assert echo_through(b, data[:1000]) == data[:1000]
        go.set()
        for st in streams:
            st.finish()
    finally:
        go.set()
        for st in streams:
            st.s.close()
    assert px.p.poll() is None
    assert px.stop() == 0


def test_reload_that_cannot_bind_changes_nothing(upstream, file_proxies, tmp_path):
    """A new listener whose port is taken fails the whole reload: the old
    listener is not stopped for it."""
    pa = _free_port()
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        path = tmp_path / "p.toml"
        path.write_text(listen_table(f"127.0.0.1:{pa}", upstream.addr))
        px = file_proxies(path, tmp_path)
        path.write_text(listen_table(f"127.0.0.1:{taken.getsockname()[1]}", upstream.addr))
        px.p.send_signal(signal.SIGHUP)
        log = px.wait_log("reload failed")
        assert "Address already in use" in log, log
        assert echo_through(("127.0.0.1", pa), b"still here") == b"still here"
        assert px.stop() == 0
    finally:
        taken.close()


# -- send_proxy: the PROXY protocol header, parsed as HAProxy's spec says -----

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def read_proxy_header(s: socket.socket) -> dict:
    """Read and parse one PROXY protocol header (v1 or v2) from `s`."""
    first = s.recv(16, socket.MSG_PEEK | socket.MSG_WAITALL)
    if first.startswith(b"PROXY "):
        line = b""
        while not line.endswith(b"\r\n"):
            line += s.recv(1)
            assert len(line) <= 107, line        # the spec's longest v1 line
        parts = line[:-2].decode("ascii").split(" ")
        assert parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6") and len(parts) == 6, line
        fam = parts[1]
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        assert (src.version, dst.version) == ((4, 4) if fam == "TCP4" else (6, 6)), line
        assert str(src) == parts[2] and str(dst) == parts[3], "v1 addresses are canonical text"
        return {"version": 1, "family": fam, "src": (str(src), int(parts[4])),
                "dst": (str(dst), int(parts[5]))}
    assert first[:12] == V2_SIG, first
    ver_cmd, fam, length = struct.unpack("!BBH", first[12:16])
    s.recv(16, socket.MSG_WAITALL)
    body = s.recv(length, socket.MSG_WAITALL)
    assert ver_cmd == 0x21, hex(ver_cmd)        # version 2, command PROXY
    if fam == 0x11:                              # TCP over IPv4
        assert length == 12
        sa, da, sp, dp = struct.unpack("!4s4sHH", body)
        family = "TCP4"
    else:
        assert fam == 0x21 and length == 36, (hex(fam), length)   # TCP over IPv6
        sa, da, sp, dp = struct.unpack("!16s16sHH", body)
        family = "TCP6"
    return {"version": 2, "family": family, "src": (str(ipaddress.ip_address(sa)), sp),
            "dst": (str(ipaddress.ip_address(da)), dp)}


class ProxyProtocolUpstream:
    """Parses each connection's header, then answers with it as JSON and
    the sha256 of the rest of the stream (after the client's FIN)."""

    def __init__(self) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.ls.settimeout(0.1)
        self.addr = "%s:%d" % self.ls.getsockname()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                s, _ = self.ls.accept()
            except TimeoutError:
                continue
            with s:
                s.settimeout(10)
                try:
                    if not s.recv(1, socket.MSG_PEEK):
                        continue        # the proxy's start-up check of the upstream
                    hdr = read_proxy_header(s)
                    h = hashlib.sha256()
                    while d := s.recv(1 << 16):
                        h.update(d)
                    s.sendall(json.dumps({**hdr, "sha256": h.hexdigest()}).encode())
                except Exception as e:  # noqa: BLE001
                    self.errors.append(repr(e))

    def close(self) -> None:
        self.stop.set()
        self.t.join(10)
        self.ls.close()


def test_send_proxy_v1_v2_ipv4_ipv6(file_proxies, tmp_path, backend):
    """Each listener's upstream receives the header first, with the client's
    address as source and the address it connected to as destination,
    then exactly the client's bytes. A client that came over IPv4 to a
    dual-stack [::] listener is TCP4, as with HAProxy."""
    up = ProxyProtocolUpstream()
    try:
        path = tmp_path / "p.toml"
        # Port 0 twice would be one bind twice: the v2 listeners get ports.
        binds = [("127.0.0.1:{}", "127.0.0.1"), ("[::1]:{}", "::1"), ("[::]:{}", "127.0.0.1")]
        tables = [(bind.format(0 if v == "v1" else _free_port()), client_ip, v)
                  for v in ("v1", "v2") for bind, client_ip in binds]
        path.write_text(f'backend = "{backend}"\n' + "".join(
            listen_table(bind, up.addr, send_proxy=v) for bind, _, v in tables))
        px = file_proxies(path, tmp_path)
        assert len(px.addrs) == len(tables), px.banner
        for (bind, client_ip, v), (_, port) in zip(tables, px.addrs):
            data = random.Random(port).randbytes(200_000)
            with socket.create_connection((client_ip, port), timeout=10) as c:
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
                got = json.loads(recv_all(c))
                me = c.getsockname()[:2]
            want_family = "TCP4" if client_ip == "127.0.0.1" else "TCP6"
            assert got == {"version": int(v[1]), "family": want_family, "src": list(me),
                           "dst": [client_ip, port],
                           "sha256": hashlib.sha256(data).hexdigest()}, (bind, v, got)
        assert up.errors == []
        assert px.stop() == 0
    finally:
        up.close()


def test_proxyproto_header_bytes():
    """The exact bytes, as the spec's examples lay them out."""
    from splicectl.proxyproto import header

    assert header("v1", ("192.0.2.1", 56324), ("198.51.100.2", 443)) == \
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    assert header("v1", ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0)) == \
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
    assert header("v1", ("::ffff:10.0.0.1", 5, 0, 0), ("::ffff:10.0.0.2", 6, 0, 0)) == \
        b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"
    assert header("v2", ("10.0.0.1", 0x1234), ("10.0.0.2", 0x50)) == \
        V2_SIG + b"\x21\x11\x00\x0c" + bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x12, 0x34, 0, 0x50])
    v6 = header("v2", ("2001:db8::1", 1, 0, 0), ("::1", 2, 0, 0))
    assert v6[12:16] == b"\x21\x21\x00\x24" and len(v6) == 16 + 36
    with pytest.raises(ValueError):
        header("v3", ("10.0.0.1", 1), ("10.0.0.2", 2))


# -- the first line says the backend, and why auto fell back ------------------

def test_first_line_says_why_auto_fell_back(upstream, tmp_path):
    """No CAP_BPF (capabilities dropped with setpriv): auto runs on worker
    and the first line says why, and the proxy still carries bytes."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop capabilities with setpriv")
    path = tmp_path / "p.toml"
    path.write_text('backend = "auto"\n' + listen_table("127.0.0.1:0", upstream.addr))
    p = subprocess.Popen(["setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-perfmon,-sys_admin",
                          PY, "-m", "splicectl", "proxy", "--config", str(path)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, SOSPLICE_RUN_DIR=str(tmp_path / "run")))
    try:
        line = p.stdout.readline().strip()
        assert line.endswith(", backend worker (bpf: EPERM, needs CAP_BPF, CAP_PERFMON)"), \
            (line, p.stderr.read() if p.poll() is not None else "")
        port = int(re.search(r":(\d+) -> ", line).group(1))
        data = random.Random(3).randbytes(100_000)
        assert echo_through(("127.0.0.1", port), data) == data
    finally:
        p.terminate()
        assert p.wait(15) == 0
        p.stdout.close()
        p.stderr.close()
