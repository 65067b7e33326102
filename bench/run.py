"""sosplice benchmarks: throughput, latency and CPU against other TCP relays.

    .venv/bin/python bench/run.py            # quick mode (a few minutes)
    .venv/bin/python bench/run.py --full     # also -P 64, -R, more round trips

Everything runs on loopback, in one run, so the ratios compare peers
measured on the same machine in the same conditions. The peers, each on its
own port in front of the same upstream:

    direct            no proxy (the baseline)
    sosplice          splicectl proxy --backend bpf (eBPF sockmap) --workers W
    sosplice-worker   splicectl proxy --backend worker (splice(2) threads) --workers W
    sosplice-1        splicectl proxy --backend bpf, one process (not run by default)
    haproxy-splice    HAProxy, mode tcp, option splice-auto
    haproxy           HAProxy, mode tcp, no splicing
    socat             socat TCP-LISTEN:p,fork,reuseaddr TCP:127.0.0.1:up
    asyncio           bench/asyncio_relay.py (plain asyncio streams)

Throughput: iperf3 -c ... -t 5 -J, -P 1 and -P 8 (full: also -P 64, and
-R for each of -P 1, 8 and 64),
bits_per_second of end.sum_received. CPU: for each throughput run, CPU
seconds of the peer process tree (utime+stime of the process and its live
descendants, plus cutime+cstime of reaped children) and system-wide
system+softirq (and all non-idle) time (psutil.cpu_times()), per GB moved.
Latency: a ping-pong client (64 B and 16 KiB) through each peer to a local
echo server process; p50/p99/p99.9 of the round trip.
Setup rate: short connections (connect, 100 B, read the echo, close) from
2 client processes x 4 threads for 3 s (full: 10 s) through each peer to an
epoll echo server (bench/conn_echo.py): connections per second, their
p50/p99, proxy CPU per connection. Splice rate: bench/splice_rate.py,
splice()/unsplice() calls per second on each backend, no proxy involved.
Memory: 2,000 (full: 10,000) idle connections held open through each peer,
one 100 B echo each; proxy tree RSS/PSS and /proc/meminfo deltas, and the
proxy's CPU while they sit idle. socat forks a process per connection, so it
is capped (500; full: 1,000) and compared per connection.

W (--workers) is the number of CPUs this process may run on: HAProxy 2.6
starts that many threads by default, so the sosplice proxy runs that many
processes, and sosplice-1 shows what one of them does alone.

Writes bench/results/latest.json and prints ratio tables. Must run as root
(the sosplice proxy loads a BPF program). Every process started is killed
at the end, also on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable

PEERS = ["direct", "sosplice", "sosplice-worker", "haproxy-splice", "haproxy", "socat", "asyncio"]
OPTIONAL_PEERS = ["sosplice-1"]
# --workers of the sosplice peers: HAProxy's default thread count.
WORKERS = len(os.sched_getaffinity(0))
BASE, REF = "direct", "haproxy-splice"
SECTIONS = ["throughput", "latency", "setup", "splicerate", "memory"]

# ---------------------------------------------------------------------------
# process management

PROCS: list[subprocess.Popen] = []
TMP = tempfile.mkdtemp(prefix="sosplice-bench-")


def spawn(argv: list[str], **kw: Any) -> subprocess.Popen:
    p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kw)
    PROCS.append(p)
    return p


def stop(p: subprocess.Popen, timeout: float = 12.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # socat's forked children, anything left in the group
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(2)
    except subprocess.TimeoutExpired:
        pass
    if p in PROCS:
        PROCS.remove(p)


def stop_all() -> None:
    for p in list(PROCS):
        stop(p)
    shutil.rmtree(TMP, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> int:
    """How many sockets listen on the port (SO_REUSEPORT: one per worker)."""
    hexport = f":{port:04X}"
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[1].endswith(hexport) and parts[3] == "0A":
                    n += 1
    return n


def wait_listening(port: int, p: subprocess.Popen | None, what: str, timeout: float = 15.0,
                   count: int = 1) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if listening(port) >= count:
            return
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{what} exited with {p.returncode} before listening on {port}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


# ---------------------------------------------------------------------------
# peers

def start_peer(kind: str, upstream: int) -> tuple[int, subprocess.Popen | None]:
    """Start one peer in front of 127.0.0.1:upstream; return (port, process)."""
    if kind == "direct":
        return upstream, None
    port = free_port()
    log = open(os.path.join(TMP, f"{kind}-{port}.log"), "w")
    env = None
    listeners = 1
    if kind in ("sosplice", "sosplice-worker", "sosplice-1"):
        # The product, as an operator runs it, less the per-connection log
        # line (HAProxy's configuration here logs nothing either).
        listeners = 1 if kind == "sosplice-1" else WORKERS
        argv = [PY, "-m", "splicectl", "proxy", f"127.0.0.1:{port}", f"127.0.0.1:{upstream}",
                "--backend", "worker" if kind == "sosplice-worker" else "bpf",
                "--workers", str(listeners), "--log-level", "warning"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "loader")]))
    elif kind == "asyncio":
        argv = [PY, os.path.join(HERE, "asyncio_relay.py"), str(port), str(upstream)]
    elif kind == "socat":
        # nodelay on both legs, as the other relays do; without it Nagle and
        # delayed ACKs add ~40 ms steps to the 16 KiB ping-pong.
        argv = ["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,nodelay",
                f"TCP:127.0.0.1:{upstream},nodelay"]
    elif kind in ("haproxy", "haproxy-splice"):
        cfg = os.path.join(TMP, f"{kind}-{port}.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_cfg(port, upstream, splice=kind == "haproxy-splice"))
        argv = ["haproxy", "-f", cfg, "-db"]
    else:
        raise ValueError(kind)
    p = spawn(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    # Every worker compiles its BPF programs at start (seconds each).
    wait_listening(port, p, kind, timeout=15.0 + 10 * listeners, count=listeners)
    return port, p


def fd_hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


HAPROXY_MAXPIPES = 256


def haproxy_maxconn() -> int:
    """As many connections as the hard RLIMIT_NOFILE allows (2 fds each, plus
    2 per pipe): HAProxy refuses to start if it cannot raise its limit to
    what maxconn needs, and in a container root may not raise the hard one."""
    return min(30000, (fd_hard_limit() - 2 * HAPROXY_MAXPIPES - 200) // 2)


def haproxy_cfg(port: int, upstream: int, *, splice: bool) -> str:
    return f"""global
    maxconn {haproxy_maxconn()}
    maxpipes {HAPROXY_MAXPIPES}
    log stdout format raw local0 err

defaults
    mode tcp
    maxconn {haproxy_maxconn()}
    timeout connect 5s
    timeout client 120s
    timeout server 120s
{"    option splice-auto" if splice else ""}

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server up 127.0.0.1:{upstream}
"""


# ---------------------------------------------------------------------------
# CPU accounting

def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user+system) of pid and its live descendants, plus its
    reaped children's."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        procs = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for q in procs:
        try:
            t = q.cpu_times()
        except psutil.NoSuchProcess:   # exited since children() listed it
            continue
        total += t.user + t.system
    return total


def sys_cpu_s() -> dict[str, float]:
    """System-wide CPU seconds since boot, all CPUs: system, softirq, irq,
    and busy (everything but idle and iowait)."""
    t = psutil.cpu_times()
    return {"system": t.system, "softirq": t.softirq, "irq": t.irq,
            "busy": t.user + t.nice + t.system + t.irq + t.softirq + t.steal}


# ---------------------------------------------------------------------------
# throughput

def iperf(port: int, parallel: int, reverse: bool, seconds: int, server: dict) -> dict:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(parallel), "-J"]
    if reverse:
        argv.append("-R")
    last = None
    for attempt in range(3):
        ensure_iperf_server(server)
        p = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=seconds + 60)
        finally:
            stop(p)
        try:
            j = json.loads(out)
        except json.JSONDecodeError:
            last = f"no JSON: {err.strip()[:200]}"
            time.sleep(1)
            continue
        if "error" in j:
            last = j["error"]
            time.sleep(1)   # typically "the server is busy": let it reset
            continue
        s = j["end"]["sum_received"]
        return {"bits_per_second": s["bits_per_second"], "bytes": s["bytes"],
                "seconds": s["seconds"]}
    raise RuntimeError(f"iperf3 {' '.join(argv)} failed: {last}")


def ensure_iperf_server(server: dict) -> None:
    p = server.get("proc")
    if p is None or p.poll() is not None:
        if p is not None:
            stop(p)
        server["proc"] = spawn(["iperf3", "-s", "-p", str(server["port"])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(server["port"], server["proc"], "iperf3 -s")


def throughput_run(kind: str, port: int, proc: subprocess.Popen | None, parallel: int,
                   reverse: bool, seconds: int, server: dict) -> dict:
    t0, s0 = (proc_cpu_s(proc.pid) if proc else 0.0), sys_cpu_s()
    w0 = time.monotonic()
    r = iperf(port, parallel, reverse, seconds, server)
    time.sleep(0.3)          # let socat reap its per-connection children
    wall = time.monotonic() - w0
    t1, s1 = (proc_cpu_s(proc.pid) if proc else 0.0), sys_cpu_s()
    gb = r["bytes"] / 1e9
    d = {k: s1[k] - s0[k] for k in s0}
    proxy_cpu = t1 - t0
    r.update({
        "wall_s": wall,
        "proxy_cpu_s": proxy_cpu,
        "sys_system_s": d["system"], "sys_softirq_s": d["softirq"], "sys_busy_s": d["busy"],
        "proxy_cpu_s_per_gb": proxy_cpu / gb if gb else None,
        "sys_kernel_s_per_gb": (d["system"] + d["softirq"]) / gb if gb else None,
        "sys_busy_s_per_gb": d["busy"] / gb if gb else None,
    })
    return r


# ---------------------------------------------------------------------------
# latency

def pingpong(port: int, size: int, n: int, warmup: int) -> dict:
    msg = os.urandom(size)
    buf = bytearray(size)
    view = memoryview(buf)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    clock = time.perf_counter_ns
    try:
        for i in range(warmup + n):
            t = clock()
            s.sendall(msg)
            got = 0
            while got < size:
                k = s.recv_into(view[got:], size - got)
                if k == 0:
                    raise RuntimeError("echo connection closed")
                got += k
            dt = clock() - t
            if i >= warmup:
                samples.append(dt)
        if bytes(buf) != msg:
            raise RuntimeError("echo returned different bytes")
    finally:
        s.close()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1000.0

    return {"n": n, "p50_us": pct(50), "p99_us": pct(99), "p99.9_us": pct(99.9),
            "mean_us": sum(samples) / len(samples) / 1000.0}


# ---------------------------------------------------------------------------
# setup rate

def raise_nofile(want: int = 200_000) -> None:
    """Children inherit it: the relays that do not raise their own need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def setup_rate(port: int, proc: subprocess.Popen | None, seconds: float, procs: int,
               threads: int) -> dict:
    t0 = proc_cpu_s(proc.pid) if proc else 0.0
    ps = [spawn([PY, os.path.join(HERE, "conn_client.py"), str(port), str(seconds), str(threads)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = []
    for p in ps:
        try:
            out, err = p.communicate(timeout=seconds + 60)
        finally:
            stop(p)
        try:
            outs.append(json.loads(out.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            raise RuntimeError(f"conn_client gave no result: {err.strip()[-300:]}") from None
    time.sleep(0.3)
    t1 = proc_cpu_s(proc.pid) if proc else 0.0
    samples = sorted(x for o in outs for x in o["samples_us"])
    n = sum(o["n"] for o in outs)
    kinds: dict[str, int] = {}
    for o in outs:
        for k, v in o["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v

    def pct(q: float) -> float | None:
        return float(samples[min(len(samples) - 1, int(q / 100 * len(samples)))]) if samples else None

    cpu = t1 - t0
    return {"conn_per_s": sum(o["n"] / o["elapsed"] for o in outs), "n": n,
            "errors": sum(o["errors"] for o in outs), "error_kinds": kinds,
            "p50_us": pct(50), "p99_us": pct(99), "seconds": seconds, "procs": procs,
            "threads": threads, "proxy_cpu_s": cpu,
            "proxy_cpu_us_per_conn": cpu / n * 1e6 if n else None}


def splice_rate(backend: str, n: int, cap: float) -> dict:
    p = spawn([PY, os.path.join(HERE, "splice_rate.py"), backend, str(n), str(cap)],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=6 * cap + 300)
    finally:
        stop(p)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise RuntimeError(f"splice_rate.py {backend} failed: {err.strip()[-300:]}") from None


# ---------------------------------------------------------------------------
# memory with many idle connections

MEMINFO_KEYS = ("MemAvailable", "Slab", "SUnreclaim", "SReclaimable", "KernelStack", "PageTables",
                "Percpu")


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in MEMINFO_KEYS:
                out[k] = int(v.split()[0])   # kB
    return out


def slab_objects() -> dict[str, int]:
    """Bytes in use per slab cache (active_objs x objsize, /proc/slabinfo).

    Counts objects, not pages: Slab in /proc/meminfo does not grow when new
    objects land in slab pages that the previous peer's connections freed.
    """
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f.readlines()[2:]:
                p = line.split()
                out[p[0]] = out.get(p[0], 0) + int(p[1]) * int(p[3])
    except OSError:
        pass
    return out


def tree_mem(pid: int) -> dict[str, int]:
    """RSS and PSS (kB) summed over pid and its descendants."""
    rss = pss = n = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for q in procs:
        try:
            m = q.memory_full_info()   # pss: /proc/PID/smaps_rollup
        except psutil.NoSuchProcess:
            continue
        rss += m.rss // 1024
        pss += m.pss // 1024
        n += 1
    return {"rss_kib": rss, "pss_kib": pss, "procs": n}


def memory_run(port: int, proc: subprocess.Popen | None, n: int, idle_s: float,
               open_cap_s: float) -> dict:
    msg = os.urandom(100)
    time.sleep(0.5)
    m0, r0, sl0 = meminfo(), (tree_mem(proc.pid) if proc else None), slab_objects()
    socks: list[socket.socket] = []
    error = None
    t = time.monotonic()
    try:
        for _ in range(n):
            if time.monotonic() - t > open_cap_s:
                error = f"gave up opening after {open_cap_s:.0f} s, at {len(socks)} connections"
                break
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                d = s.recv(len(msg) - len(got))
                if not d:
                    raise ConnectionError("closed before the echo")
                got += d
            if got != msg:
                raise RuntimeError("echo returned different bytes")
    except (OSError, RuntimeError) as e:
        error = f"after {len(socks)} connections: {e!r}"
    open_s = time.monotonic() - t
    time.sleep(1.0)          # let the relays settle (sweeps, lazy allocations)
    c0 = proc_cpu_s(proc.pid) if proc else 0.0
    time.sleep(idle_s)       # the relay's CPU while the connections sit idle
    c1 = proc_cpu_s(proc.pid) if proc else 0.0
    m1, r1, sl1 = meminfo(), (tree_mem(proc.pid) if proc else None), slab_objects()
    # Every one still alive and still relaying after the idle time?
    alive = 0
    for s in socks:
        try:
            s.settimeout(5)
            s.sendall(b"x")
            alive += s.recv(1) == b"x"
        except OSError:
            pass
    checked = len(socks)
    held = len(socks)
    for s in socks:          # reset, not FIN: no TIME_WAIT left for the next peer
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        s.close()
    socks.clear()
    time.sleep(1.0)
    d = {k: m1[k] - m0[k] for k in m0}
    per = (lambda v: v / held if held else None)
    sd = {k: sl1.get(k, 0) - sl0.get(k, 0) for k in set(sl0) | set(sl1)}
    slab_obj_kib = sum(sd.values()) / 1024
    top = sorted(sd.items(), key=lambda kv: -kv[1])[:10]
    out = {"requested": n, "held": held, "error": error, "open_s": open_s,
           "open_per_s": held / open_s if open_s else None,
           "alive_checked": checked, "alive_ok": alive,
           "meminfo_before_kib": m0, "meminfo_after_kib": m1,
           "slab_delta_kib": d["Slab"], "sunreclaim_delta_kib": d["SUnreclaim"],
           "memavail_drop_kib": -d["MemAvailable"],
           "slab_kib_per_conn": per(d["Slab"]), "sunreclaim_kib_per_conn": per(d["SUnreclaim"]),
           "memavail_drop_kib_per_conn": per(-d["MemAvailable"]),
           "slab_obj_delta_kib": slab_obj_kib, "slab_obj_kib_per_conn": per(slab_obj_kib) if sl0 else None,
           "slab_obj_top_caches_kib": {k: v / 1024 for k, v in top},
           "idle_s": idle_s, "proxy_idle_cpu_pct": (c1 - c0) / idle_s * 100 if proc else 0.0}
    if r0 is not None and r1 is not None:
        out.update({"proxy_before": r0, "proxy_after": r1,
                    "proxy_rss_kib": r1["rss_kib"], "proxy_pss_kib": r1["pss_kib"],
                    "proxy_rss_delta_kib": r1["rss_kib"] - r0["rss_kib"],
                    "proxy_pss_delta_kib": r1["pss_kib"] - r0["pss_kib"],
                    "proxy_rss_kib_per_conn": per(r1["rss_kib"] - r0["rss_kib"]),
                    "proxy_pss_kib_per_conn": per(r1["pss_kib"] - r0["pss_kib"])})
    else:
        out.update({"proxy_rss_kib": 0, "proxy_pss_kib": 0, "proxy_rss_delta_kib": 0,
                    "proxy_pss_delta_kib": 0, "proxy_rss_kib_per_conn": 0.0,
                    "proxy_pss_kib_per_conn": 0.0})
    return out


# ---------------------------------------------------------------------------
# report

def fmt_ratio(v: float | None, ref: float | None) -> str:
    if v is None or not ref:
        return "-"
    return f"{v / ref:.2f}"


def tables(res: dict) -> str:
    out = []
    tp = res["throughput"]
    lat = res["latency"]
    st = res.get("setup", {})
    mem = res.get("memory", {})
    peers = res["peers"]

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def table(title: str, rows: list[tuple[str, dict[str, float | None], str]]) -> None:
        out.append(f"\n{title}")
        hdr = f"{'test':<22}" + "".join(f"{p:>15}" for p in peers)
        out.append(hdr)
        for name, vals, _fmt in rows:
            out.append(f"{name:<22}" + "".join(f"{vals.get(p, '-'):>15}" for p in peers))

    # absolute
    rows = []
    for test in tp:
        rows.append((f"{test} Gbit/s", {p: f"{tp[test][p]['bits_per_second'] / 1e9:.2f}"
                                        for p in peers if p in tp[test]}, ""))
    for test in tp:
        rows.append((f"{test} proxyCPU s/GB", {p: f"{tp[test][p]['proxy_cpu_s_per_gb']:.3f}"
                                               for p in peers if p in tp[test]}, ""))
    for test in tp:
        rows.append((f"{test} kern s/GB", {p: f"{tp[test][p]['sys_kernel_s_per_gb']:.3f}"
                                           for p in peers if p in tp[test]}, ""))
    for test in lat:
        for q in ("p50_us", "p99_us", "p99.9_us"):
            rows.append((f"{test} {q}", {p: f"{lat[test][p][q]:.1f}"
                                         for p in peers if p in lat[test]}, ""))
    if st:
        rows.append(("setup conn/s", {p: f(st[p]["conn_per_s"], ".0f") for p in st}, ""))
        rows.append(("setup p50 us", {p: f(st[p]["p50_us"], ".0f") for p in st}, ""))
        rows.append(("setup p99 us", {p: f(st[p]["p99_us"], ".0f") for p in st}, ""))
        rows.append(("setup proxyCPU us/conn", {p: f(st[p]["proxy_cpu_us_per_conn"], ".0f")
                                                for p in st}, ""))
        rows.append(("setup errors", {p: str(st[p]["errors"]) for p in st}, ""))
    if mem:
        rows.append(("mem conns held", {p: str(mem[p]["held"]) for p in mem}, ""))
        rows.append(("mem opened conn/s", {p: f(mem[p].get("open_per_s"), ".0f") for p in mem}, ""))
        rows.append(("mem proxy RSS MiB", {p: f(mem[p]["proxy_rss_kib"] / 1024, ".1f") for p in mem}, ""))
        rows.append(("mem RSS KiB/conn", {p: f(mem[p]["proxy_rss_kib_per_conn"], ".1f") for p in mem}, ""))
        rows.append(("mem PSS KiB/conn", {p: f(mem[p]["proxy_pss_kib_per_conn"], ".1f") for p in mem}, ""))
        rows.append(("mem slab objs KiB/conn", {p: f(mem[p].get("slab_obj_kib_per_conn"), ".1f")
                                                for p in mem}, ""))
        rows.append(("mem Slab KiB/conn", {p: f(mem[p]["slab_kib_per_conn"], ".1f") for p in mem}, ""))
        rows.append(("mem SUnrecl KiB/conn", {p: f(mem[p]["sunreclaim_kib_per_conn"], ".1f")
                                              for p in mem}, ""))
        rows.append(("mem MemAvail KiB/conn", {p: f(mem[p]["memavail_drop_kib_per_conn"], ".1f")
                                               for p in mem}, ""))
        rows.append(("mem idle proxy CPU %", {p: f(mem[p]["proxy_idle_cpu_pct"], ".1f") for p in mem}, ""))
    table("Absolute (Gbit/s; CPU s per GB; round trip in us; setup; memory per idle connection)", rows)

    for ref in (BASE, REF):
        rows = []
        for test in tp:
            rows.append((f"{test} thrpt", {p: fmt_ratio(tp[test][p]["bits_per_second"],
                                                        tp[test].get(ref, {}).get("bits_per_second"))
                                           for p in peers if p in tp[test]}, ""))
        for test in tp:
            rows.append((f"{test} kern/GB", {p: fmt_ratio(tp[test][p]["sys_kernel_s_per_gb"],
                                                          tp[test].get(ref, {}).get("sys_kernel_s_per_gb"))
                                             for p in peers if p in tp[test]}, ""))
            rows.append((f"{test} busy/GB", {p: fmt_ratio(tp[test][p]["sys_busy_s_per_gb"],
                                                          tp[test].get(ref, {}).get("sys_busy_s_per_gb"))
                                             for p in peers if p in tp[test]}, ""))
        for test in lat:
            for q in ("p50_us", "p99_us", "p99.9_us"):
                rows.append((f"{test} {q}", {p: fmt_ratio(lat[test][p][q], lat[test].get(ref, {}).get(q))
                                             for p in peers if p in lat[test]}, ""))
        if st:
            for key, name in (("conn_per_s", "setup conn/s"), ("p50_us", "setup p50")):
                rows.append((name, {p: fmt_ratio(st[p][key], st.get(ref, {}).get(key)) for p in st}, ""))
        if mem:
            # MemAvailable per connection is left out of the ratios: on a shared
            # machine other processes move it more than the connections do
            keys = [("slab_obj_kib_per_conn", "mem slab objs/conn"), ("slab_kib_per_conn", "mem Slab/conn")]
            if ref != BASE:
                keys = [("proxy_rss_kib_per_conn", "mem RSS/conn"), ("proxy_pss_kib_per_conn", "mem PSS/conn")] + keys
            for key, name in keys:
                rows.append((name, {p: fmt_ratio(mem[p][key], mem.get(ref, {}).get(key)) for p in mem}, ""))
        table(f"Ratios vs {ref} (throughput: higher is better; CPU/GB and latency: lower is better)",
              rows)
    sr = res.get("splice_rate", {})
    if sr:
        out.append("\nSplice rate through the Python API (calls/s; no proxy; per backend)")
        out.append(f"{'backend':<10}{'n':>7}{'start s':>9}{'splice/s':>10}{'p50 us':>8}{'p99 us':>9}"
                   f"{'unspl/s':>9}{'cycle/s':>9}{'2-way/s':>9}{'close s':>9}")
        for b, r in sr.items():
            out.append(f"{b:<10}{r['n']:>7}{r['engine_start_s']:>9.2f}{r['splice']['per_s']:>10.0f}"
                       f"{r['splice']['p50_us']:>8.0f}{r['splice']['p99_us']:>9.0f}"
                       f"{r['unsplice']['per_s']:>9.0f}{r['cycle']['per_s']:>9.0f}"
                       f"{r['both_ways']['per_s']:>9.0f}{r['engine_close_s']:>9.2f}")
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    """Bar charts of throughput and p50/p99 latency, if matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    peers = res["peers"]
    tp, lat = res["throughput"], res["latency"]
    st, mem = res.get("setup", {}), res.get("memory", {})
    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    axes = [grid[0][0], grid[0][1], grid[1][0], grid[1][1]]
    w = 0.8 / max(1, len(tp))
    for i, test in enumerate(tp):
        axes[0].bar([j + i * w for j in range(len(peers))],
                    [tp[test].get(p, {}).get("bits_per_second", 0) / 1e9 for p in peers], w, label=test)
    axes[0].set_title("iperf3 throughput (Gbit/s, higher is better)")
    series = [(t, q) for t in lat for q in ("p50_us", "p99_us")]
    w2 = 0.8 / max(1, len(series))
    for i, (test, q) in enumerate(series):
        axes[1].bar([j + i * w2 for j in range(len(peers))],
                    [lat[test].get(p, {}).get(q, 0) for p in peers], w2, label=f"{test} {q}")
    axes[1].set_yscale("log")
    axes[1].set_title("ping-pong round trip (us, log, lower is better)")
    axes[2].bar(range(len(peers)), [st.get(p, {}).get("conn_per_s", 0) for p in peers], 0.6,
                label="conn/s")
    axes[2].set_title("setup rate: short connections per second (higher is better)")
    # MemAvailable is left out of the plot: other processes move it by more
    # than the connections do on a shared machine (it is in the JSON)
    mseries = [("proxy_rss_kib_per_conn", "proxy RSS"), ("proxy_pss_kib_per_conn", "proxy PSS"),
               ("slab_obj_kib_per_conn", "kernel slab objects")]
    w3 = 0.8 / len(mseries)
    for i, (key, name) in enumerate(mseries):
        axes[3].bar([j + i * w3 for j in range(len(peers))],
                    [mem.get(p, {}).get(key) or 0 for p in peers], w3, label=name)
    axes[3].set_title("memory per idle connection (KiB, lower is better)")
    for ax in axes:
        ax.set_xticks([j + 0.3 for j in range(len(peers))])
        ax.set_xticklabels(peers, rotation=20)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"sosplice bench ({res['mode']}), {res['machine']['nproc']} CPUs, "
                 f"Linux {res['machine']['kernel']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")


# ---------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also -P 64, -R, 10x more round trips, longer setup test, 10,000 idle connections")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma-separated subset of " + ",".join(PEERS + OPTIONAL_PEERS))
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py must run as root (the sosplice proxy loads a BPF program)", file=sys.stderr)
        return 2
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS + OPTIONAL_PEERS:
            ap.error(f"unknown peer {p!r}")
    for tool in ("iperf3", "haproxy", "socat"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    only = [x for x in args.only.split(",") if x]
    for x in only:
        if x not in SECTIONS:
            ap.error(f"unknown section {x!r}")
    tp_tests = [(1, False), (8, False)]
    if args.full:
        tp_tests += [(64, False), (1, True), (8, True), (64, True)]
    setup_s = 10.0 if args.full else 3.0
    setup_procs, setup_threads = 2, 4
    n_splice, splice_cap = (10000, 60.0) if args.full else (1000, 10.0)   # lowered to the fd limit
    n_mem = 10000 if args.full else 2000
    socat_cap = 1000 if args.full else 500
    mem_idle_s = 5.0 if args.full else 3.0
    mem_open_cap = 180.0 if args.full else 60.0
    n_rt = 50000 if args.full else 5000
    lat_tests = [(64, n_rt), (16384, n_rt)]

    def term(*_: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if started with SIGINT ignored

    uname = os.uname()
    res: dict[str, Any] = {
        "mode": "full" if args.full else "quick",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "kernel": uname.release, "machine": uname.machine,
                    "python": platform.python_version(),
                    "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
                    .stdout.splitlines()[0],
                    "iperf3": subprocess.run(["iperf3", "--version"], capture_output=True, text=True)
                    .stdout.splitlines()[0]},
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "command": " ".join([os.path.relpath(PY, ROOT) if PY.startswith(ROOT) else PY,
                             "bench/run.py"] + sys.argv[1:]),
        "iperf_seconds": args.seconds,
        "peers": peers,
        "sections": only,
        "throughput": {},
        "latency": {},
        "setup": {},
        "splice_rate": {},
        "memory": {},
        "params": {"setup_seconds": setup_s, "setup_procs": setup_procs,
                   "setup_threads": setup_threads, "setup_msg_bytes": 100,
                   "splice_rate_n": n_splice, "splice_rate_cap_s": splice_cap,
                   "memory_conns": n_mem, "memory_socat_cap": socat_cap,
                   "memory_idle_s": mem_idle_s, "memory_msg_bytes": 100,
                   "memory_open_cap_s": mem_open_cap, "fd_hard_limit": fd_hard_limit(),
                   "haproxy_maxconn": haproxy_maxconn(), "haproxy_maxpipes": HAPROXY_MAXPIPES,
                   "sosplice_workers": WORKERS},
        "errors": [],
    }
    t_start = time.monotonic()
    raise_nofile()
    try:
        server = {"port": free_port()}
        if "throughput" in only:
            ensure_iperf_server(server)
        echo_port = free_port()
        echo = spawn([PY, os.path.join(HERE, "echo_server.py"), str(echo_port)],
                     stdout=subprocess.DEVNULL)
        wait_listening(echo_port, echo, "echo server")

        for kind in peers if ("throughput" in only or "latency" in only) else []:
            # throughput, peer in front of iperf3
            try:
                port, proc = start_peer(kind, server["port"])
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{kind}: start failed: {e}")
                print(f"!! {kind}: {e}", flush=True)
                continue
            try:
                for par, rev in tp_tests if "throughput" in only else []:
                    test = f"P{par}{'-R' if rev else ''}"
                    try:
                        r = throughput_run(kind, port, proc, par, rev, args.seconds, server)
                    except Exception as e:  # noqa: BLE001
                        res["errors"].append(f"{kind} {test}: {e}")
                        print(f"!! {kind} {test}: {e}", flush=True)
                        continue
                    res["throughput"].setdefault(test, {})[kind] = r
                    print(f"{kind:>15} {test:<6} {r['bits_per_second'] / 1e9:7.2f} Gbit/s  "
                          f"proxy {r['proxy_cpu_s_per_gb']:.3f} s/GB  "
                          f"kernel {r['sys_kernel_s_per_gb']:.3f} s/GB", flush=True)
            finally:
                if proc is not None:
                    stop(proc)

            # latency, peer in front of the echo server
            try:
                port, proc = start_peer(kind, echo_port)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{kind}: start failed: {e}")
                continue
            try:
                for size, n in lat_tests if "latency" in only else []:
                    test = f"rr{size}"
                    try:
                        r = pingpong(port, size, n, warmup=max(200, n // 20))
                    except Exception as e:  # noqa: BLE001
                        res["errors"].append(f"{kind} {test}: {e}")
                        print(f"!! {kind} {test}: {e}", flush=True)
                        continue
                    res["latency"].setdefault(test, {})[kind] = r
                    print(f"{kind:>15} {test:<6} p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us  "
                          f"p99.9 {r['p99.9_us']:7.1f} us", flush=True)
            finally:
                if proc is not None:
                    stop(proc)

        if "setup" in only or "memory" in only:
            up_port = free_port()
            up = spawn([PY, os.path.join(HERE, "conn_echo.py"), str(up_port)], stdout=subprocess.DEVNULL)
            wait_listening(up_port, up, "conn_echo")

        for kind in peers if "setup" in only else []:
            try:
                port, proc = start_peer(kind, up_port)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{kind}: start failed: {e}")
                continue
            try:
                r = setup_rate(port, proc, setup_s, setup_procs, setup_threads)
                res["setup"][kind] = r
                print(f"{kind:>15} setup  {r['conn_per_s']:7.0f} conn/s  p50 {r['p50_us']} us  "
                      f"p99 {r['p99_us']} us  proxy {r['proxy_cpu_us_per_conn']} us/conn  "
                      f"errors {r['errors']} {r['error_kinds'] or ''}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{kind} setup: {e}")
                print(f"!! {kind} setup: {e}", flush=True)
            finally:
                if proc is not None:
                    stop(proc)

        for backend in ("bpf", "worker") if "splicerate" in only else ():
            try:
                r = splice_rate(backend, n_splice, splice_cap)
                res["splice_rate"][backend] = r
                print(f"{backend:>15} splice {r['splice']['per_s']:7.0f}/s  unsplice "
                      f"{r['unsplice']['per_s']:7.0f}/s  cycle {r['cycle']['per_s']:7.0f}/s  "
                      f"both ways {r['both_ways']['per_s']:7.0f} pairs/s", flush=True)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"splice rate {backend}: {e}")
                print(f"!! splice rate {backend}: {e}", flush=True)

        # One count for every peer, as far as the fd limit lets the proxy hold
        # it: 2 sockets per connection (sosplice shares them with its engine),
        # and the worker backend a pipe per direction too (6). socat is
        # capped (it forks a process per connection).
        hard = fd_hard_limit()
        n_common = min(n_mem, (hard - 300) // 2, haproxy_maxconn() - 50)
        for kind in peers if "memory" in only else []:
            n = n_common
            if kind == "socat":
                n = min(n, socat_cap)
            elif kind == "sosplice-worker":
                n = min(n, (hard - 300) // 6)
            try:
                port, proc = start_peer(kind, up_port)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{kind}: start failed: {e}")
                continue
            try:
                r = memory_run(port, proc, n, mem_idle_s, mem_open_cap)
                res["memory"][kind] = r
                print(f"{kind:>15} memory {r['held']:6d} conns  proxy RSS {r['proxy_rss_kib'] / 1024:7.1f} MiB "
                      f"({r['proxy_rss_kib_per_conn']:.1f} KiB/conn)  slab "
                      f"{r['slab_kib_per_conn']:.1f} KiB/conn  slab objs "
                      f"{r['slab_obj_kib_per_conn'] or 0:.1f} KiB/conn  MemAvail "
                      f"{r['memavail_drop_kib_per_conn']:.1f} KiB/conn  idle CPU "
                      f"{r['proxy_idle_cpu_pct']:.1f}%  alive {r['alive_ok']}/{r['alive_checked']}"
                      f"{'  ' + r['error'] if r['error'] else ''}", flush=True)
                if r["error"]:
                    res["errors"].append(f"{kind} memory: {r['error']}")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{kind} memory: {e}")
                print(f"!! {kind} memory: {e}", flush=True)
            finally:
                if proc is not None:
                    stop(proc)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        res["errors"].append("interrupted")
        return_code = 130
    except Exception as e:  # noqa: BLE001
        print(f"\nfailed: {e!r}: stopping everything", file=sys.stderr)
        res["errors"].append(f"failed: {e!r}")
        return_code = 1
    else:
        return_code = 0
    finally:
        stop_all()

    res["duration_s"] = round(time.monotonic() - t_start, 1)
    res["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(tables(res))
    plot(res, os.path.splitext(args.out)[0] + ".png")
    if res["errors"]:
        print("\nerrors:\n  " + "\n  ".join(res["errors"]))
    print(f"\nloadavg start {' '.join(res['loadavg_start'])}, end {' '.join(res['loadavg_end'])} "
          f"on {res['machine']['nproc']} CPUs (other load skews every number)")
    print(f"\nwrote {os.path.relpath(args.out)} ({res['duration_s']} s)")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
