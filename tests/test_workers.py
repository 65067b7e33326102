"""`splicectl proxy --workers N`: processes sharing the listeners, one master."""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from test_config import FileProxy, _refused, echo_through, listen_table
from test_splicectl import (ROOT, PY, Proxy, Upstream, _free_port, _metrics,  # noqa: F401
                            many_clients, splicectl, upstream)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent's wait()."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids: set[int], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def started():
    """Proxies started here; at the end, none of them or their workers
    may be left (a worker left behind is a failure, then killed)."""
    procs: list[tuple[Proxy | FileProxy, set[int]]] = []

    def start(px):
        procs.append((px, _children(px.p.pid)))
        return px
    yield start
    left = set()
    for px, workers in procs:
        px.stop(signal.SIGKILL)
        if not _gone(workers):
            left |= workers
            for w in workers:
                try:
                    os.kill(w, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert not left, f"workers outlived their master: {left}"



@pytest.mark.skipif(os.geteuid() != 0, reason="the bpf backend needs root (CAP_BPF)")
def test_workers_share_the_load_every_byte_checked(upstream, started):
    """Two bpf workers: 80 clients, mixed sizes, half-closed, sha256 or
    echo checked; both workers serve some; the master's metrics add up
    theirs (connections, bytes, histogram counts)."""
    mport = _free_port()
    px = started(Proxy(upstream.addr, "--workers", "2", "--backend", "bpf",
                       "--metrics", f"127.0.0.1:{mport}"))
    assert px.banner.endswith(", backend bpf, 2 workers"), px.banner
    workers = _children(px.p.pid)
    assert len(workers) == 2
    errors = many_clients(px.addr, 80, 120)
    assert not errors, errors
    listener = "%s:%d" % px.addr
    deadline = time.monotonic() + 10
    while (m := _metrics(mport)).get("sosplice_connection_duration_seconds_count", 0) < 80 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m[f'sosplice_connections_total{{listener="{listener}"}}'] == 80
    assert m["sosplice_connection_duration_seconds_count"] == 80
    assert m['sosplice_info{backend="bpf",version="%s"}' % _version()] == 1
    assert m["sosplice_connections_active"] == 0
    # Each log line names its connection; ids are unique across workers,
    # and both workers (odd ids: the first, even: the second) took some.
    ids = [int(x) for x in re.findall(r"conn=(\d+) ", px.stderr())]
    assert len(ids) == 80 and len(set(ids)) == 80, ids
    assert any(i % 2 for i in ids) and any(i % 2 == 0 for i in ids), sorted(ids)
    assert px.stop() == 0
    assert _gone(workers)


def _version() -> str:
    return splicectl("--version").stdout.split()[-1]


def test_sigterm_lets_a_live_connection_finish(upstream, started):
    """SIGTERM to the master: every worker stops accepting and lets its
    connections finish within --grace; the one in flight ends whole."""
    px = started(Proxy(upstream.addr, "--workers", "2", "--backend", "worker", "--grace", "20"))
    workers = _children(px.p.pid)
    data = random.Random(3).randbytes(8 << 20)
    s = socket.create_connection(px.addr, timeout=30)
    s.sendall(b"E" + data[:1 << 20])
    got = bytearray()
    while len(got) < 1 << 20:
        got += s.recv(1 << 16)
    px.p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert px.p.poll() is None, "stopped before its connection ended"
    with pytest.raises(OSError):
        socket.create_connection(px.addr, timeout=5).close()
    t = threading.Thread(target=lambda: (s.sendall(data[1 << 20:]), s.shutdown(socket.SHUT_WR)))
    t.start()
    while d := s.recv(1 << 16):
        got += d
    t.join()
    s.close()
    assert bytes(got) == data
    assert px.p.wait(20) == 0
    assert _gone(workers)


def test_a_worker_that_dies_stops_the_proxy(upstream, started):
    """A worker killed: the master says so, stops the other and exits 1."""
    px = started(Proxy(upstream.addr, "--workers", "2", "--backend", "worker"))
    workers = _children(px.p.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    assert px.p.wait(20) == 1
    assert re.search(rf"worker {victim} was killed by signal 9; stopping the others", px.stderr())
    assert _gone(workers)


def test_a_master_that_dies_ends_its_workers(upstream, started):
    """The master killed: its workers see their channel close and stop."""
    px = started(Proxy(upstream.addr, "--workers", "3", "--backend", "worker"))
    workers = _children(px.p.pid)
    assert len(workers) == 3
    data = random.Random(4).randbytes(100_000)
    assert echo_through(px.addr, data) == data   # they serve until then
    px.p.kill()
    px.p.wait()
    assert _gone(workers, timeout=10), "workers outlived their master"


def test_reload_reaches_every_worker(upstream, started, tmp_path):
    """SIGHUP to the master: each worker reads the file again; the
    removed listener stops accepting in all of them, the added one
    accepts in all of them (many connections land on each)."""
    pa, pb = _free_port(), _free_port()
    a, b = ("127.0.0.1", pa), ("127.0.0.1", pb)
    path = tmp_path / "p.toml"
    head = 'backend = "worker"\nworkers = 2\n'
    path.write_text(head + listen_table(f"127.0.0.1:{pa}", upstream.addr))
    px = started(FileProxy(path, tmp_path))
    assert px.banner.endswith(", 2 workers"), px.banner
    path.write_text(head + listen_table(f"127.0.0.1:{pb}", upstream.addr))
    px.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while px.stderr().count("reloaded: ") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert px.stderr().count("reloaded: ") == 2, px.stderr()
    assert _refused(a), "the removed listener still accepts in a worker"
    for i in range(40):   # SO_REUSEPORT spreads these over both workers
        data = random.Random(i).randbytes(1000)
        assert echo_through(b, data) == data
    ids = [int(x) for x in re.findall(r"conn=(\d+) ", px.stderr())]
    assert any(i % 2 for i in ids) and any(i % 2 == 0 for i in ids), sorted(ids)
    assert px.stop() == 0


@pytest.mark.parametrize("args, says", [
    (["--workers", "0"], "splicectl proxy: error: argument --workers: must be from 1 to 256, "
                         "not 0 (try --help)"),
    (["--workers", "2", "--max-conns", "1"],
     "splicectl proxy: --max-conns 1 is shared by 2 workers: give at least 2 (or 0: no limit)"),
])
def test_bad_workers_values_are_refused(upstream, args, says):
    r = splicectl("proxy", "127.0.0.1:0", upstream.addr, *args)
    assert r.returncode == 2
    assert r.stderr.strip() == says, r.stderr


def test_max_conns_is_shared_out():
    from splicectl.proxy import Config, ListenConfig
    from splicectl.workers import for_worker
    cfg = Config(listeners=(ListenConfig(("127.0.0.1", 1), (("127.0.0.1", 2),), max_conns=7),
                            ListenConfig(("127.0.0.1", 3), (("127.0.0.1", 2),))), workers=3)
    shares = [[lc.max_conns for lc in for_worker(cfg, i, 3).listeners] for i in range(3)]
    assert shares == [[3, 0], [2, 0], [2, 0]]


def test_metrics_merge_adds_up_but_info_and_created():
    from splicectl.metrics import Metrics
    from splicectl.workers import merge
    ms = []
    for n in (1, 2):
        m = Metrics(lambda n=n: (n, {"up": 10 * n, "down": 0}, {"up": n, "down": 0}))
        m.set_backend("bpf")
        for _ in range(n):
            m.connections.labels("a:1").inc()
            m.duration.observe(0.2)
        ms.append(m.render())
    text = merge(ms).decode()
    got = {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines()
                                     if ln and not ln.startswith("#"))}
    assert got['sosplice_connections_total{listener="a:1"}'] == 3
    assert got["sosplice_connections_active"] == 3
    assert got['sosplice_bytes_total{direction="up"}'] == 30
    assert got['sosplice_kernel_bytes_total{direction="up"}'] == 3
    assert got['sosplice_connection_duration_seconds_bucket{le="0.5"}'] == 3
    assert got["sosplice_connection_duration_seconds_count"] == 3
    assert [v for k, v in got.items() if k.startswith("sosplice_info")] == [1]
    assert "# TYPE sosplice_splice_ends_total counter" in text   # empty families stay
