"""`splicectl proxy --workers N`: N worker processes under one master.

A proxy's single loop and engine keep one CPU busy at a few thousand
short connections per second (docs/benchmarks.md). As HAProxy runs one
thread per CPU, `--workers N` runs N processes, each a whole `Proxy`
with its own loop, its own `sosplice.Splicer` (BPF programs and maps:
a socket is spliced by the engine of the process that accepted it) and
its own listening sockets, bound with SO_REUSEPORT to the same
addresses: the kernel spreads the connections over them.

The master forks the workers and then only relays:

- SIGINT/SIGTERM to every worker as a stop (a second one: at once), and
  SIGHUP as a reload (each worker reads the config file again and
  applies it, as a single proxy does). Workers ignore those signals
  themselves: a terminal's Ctrl-C or systemd's stop reaches every process
  of the group, and only the master's order may count, once.
- Prometheus scrapes: it serves `--metrics` itself, asking each worker
  for its metrics and adding them up (`merge`).
- A worker that dies ends the proxy: the master stops the others and
  exits 1 (HAProxy's master does the same by default). A master that
  dies ends its workers: they see EOF on their channel and stop.

Each worker has a socketpair to the master: the master writes one byte
per order ("s" stop, "h" reload, "m" metrics); the worker writes
length-prefixed messages: once "R" + JSON [describe, backend] when it
listens (or "E" + why it could not start), then the metrics text for
each "m".

What a worker gets of the config: the same listeners, each `max_conns`
shared out (`for_worker`), no metrics socket. A port 0 is chosen once, by
the master, before the workers bind it.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
from dataclasses import replace
from typing import Callable

from .proxy import Config, Proxy, UsageError, _bound, check_config, check_reachable, fmt_addr

log = logging.getLogger("splicectl.proxy")

# How long the master waits for a worker's answer to a scrape.
SCRAPE_TIMEOUT = 5.0


def for_worker(cfg: Config, i: int, n: int) -> Config:
    """Worker `i` of `n`'s part of `cfg`: every listener's max_conns
    shared out (the first ones take the remainder), no metrics socket
    (the master serves it), upstreams checked once by the master."""
    def share(total: int) -> int:
        return total // n + (i < total % n) if total else 0
    return replace(cfg, metrics=None, check_upstreams=False,
                   listeners=tuple(replace(lc, max_conns=share(lc.max_conns)) for lc in cfg.listeners))


def _send(s: socket.socket, payload: bytes) -> None:
    s.sendall(struct.pack("!I", len(payload)) + payload)


def _recv(s: socket.socket) -> bytes | None:
    """One length-prefixed message; None at EOF."""
    def exactly(n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            got = s.recv(n - len(buf))
            if not got:
                return None
            buf += got
        return bytes(buf)
    head = exactly(4)
    return None if head is None else exactly(struct.unpack("!I", head)[0])


def merge(texts: list[bytes]) -> bytes:
    """The workers' Prometheus text expositions as one: every sample
    added up by name and labels, but a `*_created` timestamp (the oldest)
    and an Info (`*_info`, always 1). Families and their order come from
    the first text."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            into = values[fam.name]
            for smp in fam.samples:
                key = (smp.name, tuple(sorted(smp.labels.items())))
                if key not in into:
                    into[key] = smp.value
                elif smp.name.endswith("_created"):
                    into[key] = min(into[key], smp.value)
                elif fam.name.endswith("_info"):
                    into[key] = max(into[key], smp.value)
                else:
                    into[key] += smp.value

    class Merged:
        def collect(self):
            for name, fam in families.items():
                for (sname, labels), v in values[name].items():
                    fam.add_sample(sname, dict(labels), v)
                yield fam

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Merged())
    return generate_latest(reg)


def _pin_ports(cfg: Config) -> tuple[Config, list[socket.socket]]:
    """`cfg` with every listener's port 0 replaced by a port chosen now,
    and the sockets that hold them (bound, not listening: they take no
    connection) until the workers have bound theirs. Also refuses, before
    any fork, an address that cannot be bound."""
    held, listeners = [], []
    try:
        for lc in cfg.listeners:
            s = _bound(lc.bind, "listen", "LISTEN", reuseport=True)
            held.append(s)
            listeners.append(replace(lc, bind=(lc.bind[0], s.getsockname()[1])) if lc.bind[1] == 0 else lc)
    except BaseException:
        for s in held:
            s.close()
        raise
    return replace(cfg, listeners=tuple(listeners)), held


class Master:
    """Forks the workers and relays signals and scrapes (module docstring)."""

    def __init__(self, cfg: Config, reload_cfg: Callable[[], Config] | None) -> None:
        self.cfg = cfg
        self.reload_cfg = reload_cfg
        self.sel = selectors.DefaultSelector()
        self.chans: dict[int, socket.socket] = {}     # pid -> the master's end
        self.status = 0
        self.stops = 0
        self.metrics_sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- start ---------------------------------------------------------------

    def start(self) -> str:
        """Fork the workers, wait until every one listens; return the
        first line to print. Raises UsageError (no worker left running)."""
        cfg = check_config(self.cfg)
        if cfg.check_upstreams:
            check_reachable(cfg)
        cfg, held = _pin_ports(cfg)
        try:
            if cfg.metrics:
                self.metrics_sock = _bound(cfg.metrics, "listen for metrics", "--metrics")
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            for i in range(cfg.workers):
                self._fork(cfg, i, held)
            ready = [self._ready(pid) for pid in list(self.chans)]
        except BaseException:
            self._abort()
            raise
        finally:
            for s in held:
                s.close()
        describe, backend = ready[0]
        line = f"listening on {describe}"
        if self.metrics_sock is not None:
            self.metrics_sock.listen(64)
            self.metrics_sock.setblocking(True)
            self.sel.register(self.metrics_sock, selectors.EVENT_READ, self._scrape)
            line += f", metrics on http://{fmt_addr(self.metrics_sock.getsockname())}/metrics"
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        for pid, chan in self.chans.items():
            self.sel.register(chan, selectors.EVENT_READ, lambda pid=pid: self._worker_gone(pid))
        return line + f", backend {backend}, {cfg.workers} workers"

    def _fork(self, cfg: Config, i: int, held: list[socket.socket]) -> None:
        mine, theirs = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine.close()
                self.sel.close()
                for s in [*held, *self.chans.values(), self._wake_r, self._wake_w,
                          *([self.metrics_sock] if self.metrics_sock else [])]:
                    s.close()
                code = _worker(cfg, i, self.reload_cfg, theirs)
            except BaseException:
                log.exception("worker %d failed", i)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        theirs.close()
        self.chans[pid] = mine

    def _ready(self, pid: int) -> tuple[str, str]:
        msg = _recv(self.chans[pid])
        if msg is None:
            raise UsageError(f"worker {pid} exited before it listened")
        if msg[:1] == b"E":
            raise UsageError(msg[1:].decode())
        describe, backend = json.loads(msg[1:])
        return describe, backend

    def _abort(self) -> None:
        """Start failed: every worker stops at once (EOF on its channel
        stops it; its socket was never listening or had no client)."""
        for chan in self.chans.values():
            chan.close()
        for pid in self.chans:
            os.waitpid(pid, 0)
        self.chans.clear()
        if self.metrics_sock is not None:
            self.metrics_sock.close()
            self.metrics_sock = None

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        try:
            while self.chans:
                for key, _ in self.sel.select():
                    key.data()
        finally:
            for s in (self.metrics_sock, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self.sel.close()
        return self.status

    def _on_signal(self, signum: int, _frame) -> None:
        try:
            self._wake_w.send(b"h" if signum == signal.SIGHUP else b"s")
        except OSError:
            pass

    def _on_wake(self) -> None:
        try:
            got = self._wake_r.recv(64)
        except BlockingIOError:
            return
        if b"h" in got and not self.stops:
            self._order(b"h")
        for _ in range(got.count(b"s")):
            self.stops += 1
            self._order(b"s")

    def _order(self, what: bytes) -> None:
        for chan in self.chans.values():
            try:
                chan.send(what)
            except OSError:
                pass   # it is exiting; _worker_gone collects it

    def _worker_gone(self, pid: int) -> None:
        """Its channel is readable outside a scrape: EOF, it has exited
        (or the answer to a scrape that timed out came late: dropped)."""
        chan = self.chans[pid]
        try:
            if chan.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                _recv(chan)
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        del self.chans[pid]
        self.sel.unregister(chan)
        chan.close()
        _, st = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(st)
        if code != 0 or not self.stops:
            why = f"exited with {code}" if code >= 0 else f"was killed by signal {-code}"
            log.error("worker %d %s%s", pid, why,
                      "" if self.stops else "; stopping the others")
            self.status = 1
            if not self.stops:
                self.stops = 1
                self._order(b"s")

    def _scrape(self) -> None:
        """One metrics request: every worker's metrics, added up."""
        try:
            s, _ = self.metrics_sock.accept()
        except OSError:
            return
        with s:
            s.settimeout(SCRAPE_TIMEOUT)
            try:
                req = b""
                while b"\n\n" not in req and b"\r\n\r\n" not in req and len(req) < 65536:
                    got = s.recv(4096)
                    if not got:
                        break
                    req += got
                if not req.startswith(b"GET "):
                    s.sendall(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 9\r\n\r\nonly GET\n")
                    return
                texts = []
                for chan in self.chans.values():
                    chan.settimeout(SCRAPE_TIMEOUT)
                    try:
                        chan.send(b"m")
                        text = _recv(chan)
                    except OSError:
                        text = None
                    if text is not None:
                        texts.append(text)
                from .metrics import CONTENT_TYPE
                body = merge(texts)
                s.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                          b"Connection: close\r\n\r\n" % (CONTENT_TYPE.encode(), len(body)) + body)
            except OSError:
                pass


def _worker(cfg: Config, i: int, reload_cfg: Callable[[], Config] | None,
            chan: socket.socket) -> int:
    """A worker process's life: one Proxy, ordered by the master only."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    n = cfg.workers
    reloader = None if reload_cfg is None else (lambda: for_worker(reload_cfg(), i, n))
    chan.settimeout(SCRAPE_TIMEOUT)
    proxy = Proxy(for_worker(cfg, i, n), reloader=reloader, master=chan)
    proxy.next_id, proxy.id_step = i + 1, n
    try:
        proxy.start()
    except (UsageError, OSError) as e:
        _send(chan, b"E" + (getattr(e, "strerror", None) or str(e)).encode())
        return 2
    _send(chan, b"R" + json.dumps([proxy.describe(), proxy.backend_text()]).encode())
    return proxy.run()


def serve(cfg: Config, reload_cfg: Callable[[], Config] | None) -> int:
    """`splicectl proxy` with cfg.workers > 1: print the first line, run
    until stopped; the exit status is 1 if a worker failed."""
    master = Master(cfg, reload_cfg)
    print(master.start(), flush=True)
    return master.run()
