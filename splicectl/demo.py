"""`splicectl demo`: the spliced proxy against a plain userspace relay.

Everything runs on loopback in this process: an upstream server (threads),
the proxy (`splicectl.proxy.Proxy` in a thread, with its own Splicer),
and N client connections pushing random data both ways at once. Every
byte is hashed at both ends. Then the same traffic goes through a plain
Python relay (two threads per connection, recv/sendall) for comparison.

What each side costs is the process's CPU time during its run minus what
the endpoint threads used (each adds its own RUSAGE_THREAD when it ends),
per GB moved: the proxy, its engine and the view, or the relay's threads.
Work the kernel does in softirq and in its psock backlog workers is not
charged to any process, on either side.
"""
from __future__ import annotations

import hashlib
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.text import Text
from sosplice import snapshot as published

from . import view
from .proxy import Options, Proxy

BUF = os.urandom(8 << 20)
CHUNK = 256 << 10
HDR = 8

_endpoint_cpu = [0.0]
_endpoint_lock = threading.Lock()


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _endpoint_done() -> None:
    """An endpoint thread ends: its CPU time is not the relay's."""
    with _endpoint_lock:
        _endpoint_cpu[0] += _cpu(resource.RUSAGE_THREAD)


@dataclass
class Side:
    sent: int = 0
    recv: int = 0
    sent_hash: str = ""
    recv_hash: str = ""
    done: threading.Event = field(default_factory=threading.Event)


def _pump_send(s: socket.socket, until: float, side: Side, rng: int) -> None:
    h = hashlib.sha256()
    mv = memoryview(BUF)
    off = rng % (len(BUF) - CHUNK)
    try:
        while time.monotonic() < until:
            chunk = mv[off:off + CHUNK]
            s.sendall(chunk)
            h.update(chunk)
            side.sent += len(chunk)
            off = (off * 7919 + 104729) % (len(BUF) - CHUNK)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    side.sent_hash = h.hexdigest()
    _endpoint_done()


def _pump_recv(s: socket.socket, side: Side) -> None:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    try:
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            h.update(memoryview(buf)[:n])
            side.recv += n
    except OSError:
        pass
    side.recv_hash = h.hexdigest()
    _endpoint_done()


class Upstream:
    """Accepts; per connection reads an 8-byte id, then sends and receives
    random data until the connection's deadline, hashing both ways."""

    def __init__(self, results: dict) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.addr = self.ls.getsockname()
        self.results = results
        self.threads: list[threading.Thread] = []
        self.deadline = 0.0
        self.t = threading.Thread(target=self._run, name="demo-upstream", daemon=True)
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
            hdr = b""
            while len(hdr) < HDR:
                d = s.recv(HDR - len(hdr))
                if not d:
                    return  # a probe
                hdr += d
            cid = int(hdr)
            side = Side()
            self.results[cid] = side
            tx = threading.Thread(target=_pump_send, args=(s, self.deadline, side, cid * 31337))
            tx.start()
            _pump_recv(s, side)
            tx.join()
            side.done.set()

    def close(self) -> None:
        self.ls.shutdown(socket.SHUT_RDWR)
        self.ls.close()
        self.t.join()
        for t in self.threads:
            t.join()


class Relay:
    """The comparison: a plain userspace relay, two threads per connection."""

    def __init__(self, upstream: tuple) -> None:
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.addr = self.ls.getsockname()
        self.up = upstream
        self.threads: list[threading.Thread] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    @staticmethod
    def _copy(a: socket.socket, b: socket.socket) -> None:
        buf = bytearray(256 << 10)
        mv = memoryview(buf)
        try:
            while True:
                n = a.recv_into(buf)
                if not n:
                    break
                b.sendall(mv[:n])
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            u = socket.create_connection(self.up)
            for a, b in ((c, u), (u, c)):
                t = threading.Thread(target=self._copy, args=(a, b), daemon=True)
                self.threads.append(t)
                t.start()
            self.threads.append(threading.Thread(target=self._closer, args=(c, u, self.threads[-2:])))
            self.threads[-1].start()

    @staticmethod
    def _closer(c, u, ts) -> None:
        for t in ts:
            t.join()
        c.close()
        u.close()

    def close(self) -> None:
        self.ls.shutdown(socket.SHUT_RDWR)
        self.ls.close()
        self.t.join()
        for t in list(self.threads):
            t.join()


def traffic(addr: tuple, upstream: Upstream, conns: int, seconds: float, first_id: int,
            tick=None) -> tuple[int, float, int, float]:
    """Run `conns` connections through `addr` for `seconds`.

    Returns (bytes moved both ways, elapsed seconds, hash mismatches, CPU
    seconds used by everything but the endpoints)."""
    cpu0 = _cpu(resource.RUSAGE_SELF)
    with _endpoint_lock:
        _endpoint_cpu[0] = 0.0
    results: dict[int, Side] = {}
    threads = []
    start = time.monotonic()
    until = start + seconds
    upstream.deadline = until
    socks = []
    for i in range(conns):
        cid = first_id + i
        s = socket.create_connection(addr)
        socks.append(s)
        s.sendall(b"%08d" % cid)
        side = Side()
        results[cid] = side
        threads.append(threading.Thread(target=_pump_send, args=(s, until, side, cid * 7)))
        threads.append(threading.Thread(target=_pump_recv, args=(s, side)))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if tick:
            tick(sum(r.sent + r.recv for r in results.values()), time.monotonic() - start)
        threads[-1].join(0.25)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    bad = 0
    total = 0
    for cid, cli in results.items():
        srv = upstream.results.get(cid)
        if srv is not None:
            srv.done.wait(10)
        ok = (srv is not None and cli.sent == srv.recv and cli.sent_hash == srv.recv_hash
              and srv.sent == cli.recv and srv.sent_hash == cli.recv_hash)
        bad += not ok
        if not ok:
            print(f"conn {cid}: up sent {cli.sent} received {srv and srv.recv} "
                  f"{'ok' if srv and cli.sent_hash == srv.recv_hash else 'BAD'}; down sent "
                  f"{srv and srv.sent} received {cli.recv} "
                  f"{'ok' if srv and srv.sent_hash == cli.recv_hash else 'BAD'}", file=sys.stderr)
        total += cli.sent + cli.recv
    with _endpoint_lock:
        middle = _cpu(resource.RUSAGE_SELF) - cpu0 - _endpoint_cpu[0]
    return total, elapsed, bad, middle


def run(args) -> int:
    console = Console(highlight=False)
    live_ok = console.is_terminal and not args.no_live
    up_results: dict[int, Side] = {}
    upstream = Upstream(up_results)
    px = Proxy(Options(listen=("127.0.0.1", 0), upstreams=[upstream.addr], check_upstreams=False,
                       grace=2.0))
    addr = px.start()
    pt = threading.Thread(target=px.run, name="demo-proxy")
    pt.start()
    relay = None
    try:
        console.print(f"[bold]sosplice demo[/]: {args.conns} connections, both ways, "
                      f"{args.seconds:g} s through a spliced proxy {view.fmt_addr(addr)} "
                      f"-> upstream {view.fmt_addr(upstream.addr)} (backend {px.engine.backend})")
        engine = px.engine
        prev: list = [None]

        def snapshot() -> view.Snapshot:
            doc = published.EngineSnapshot.of(engine.backend, engine.stats(), "splicectl demo")
            prev[0] = view.snapshot_from_docs([doc], prev[0])
            return prev[0]

        if live_ok:
            from rich.live import Live
            with Live(console=console, auto_refresh=False, transient=True) as live:
                def tick(moved: int, t: float) -> None:
                    head = Text(f"spliced: {view.human_bytes(moved)}B in {t:.1f}s", style="bold")
                    live.update(Group(head, view.render(snapshot(), "bytes")), refresh=True)
                total, el, bad, cpu = traffic(addr, upstream, args.conns, args.seconds, 0, tick)
        else:
            total, el, bad, cpu = traffic(addr, upstream, args.conns, args.seconds, 0)
        rows = engine.stats()
        moved = sum(r.bytes for r in rows)
        share = view.kernel_share(sum(r.kernel_bytes for r in rows), moved) or "-"
        sp_rate, sp_cpu = total / el, cpu / max(total / 1e9, 1e-9)
        console.print(f"spliced:   {view.human_bytes(total)}B in {el:.1f} s = "
                      f"[bold]{view.human_bytes(sp_rate)}B/s[/], proxy CPU {sp_cpu:.2f} s/GB, "
                      f"[bold]{share}[/] moved in the kernel")
        relay = Relay(upstream.addr)
        rsec = max(1.0, min(args.seconds, 3.0))
        rtotal, rel, rbad, rcpu = traffic(relay.addr, upstream, args.conns, rsec, 10000)
        r_rate, r_cpu = rtotal / rel, rcpu / max(rtotal / 1e9, 1e-9)
        console.print(f"userspace: {view.human_bytes(rtotal)}B in {rel:.1f} s = "
                      f"{view.human_bytes(r_rate)}B/s, relay CPU {r_cpu:.2f} s/GB "
                      "(plain Python relay, 2 threads/connection)")
        console.print(f"ratio:     spliced is [bold]{sp_rate / r_rate:.1f}x[/] the relay's speed at "
                      f"[bold]{sp_cpu / r_cpu if r_cpu else 0:.2f}x[/] its CPU per GB "
                      "(client and upstream are Python threads in this process)")
        if sp_rate < r_rate:
            console.print("[bold yellow]note[/]: the spliced run was slower. The endpoints, Python "
                          "threads in this process, share 2 CPUs with the proxy; splicing frees "
                          "CPU per byte, and that shows in the CPU column first.")
        n = 2 * args.conns
        if bad or rbad:
            console.print(f"[bold red]HASH MISMATCH[/]: {bad} spliced and {rbad} relayed "
                          f"connection(s) of {args.conns} each lost or changed bytes")
            return 1
        console.print(f"hash-check: every byte of {n} connections (sha256 both ways at both ends) "
                      "[bold green]matched[/]")
        return 0
    finally:
        px.stop()
        pt.join()
        if relay is not None:
            relay.close()
        upstream.close()
