"""`splicectl proxy`: a TCP proxy whose bytes never enter user space.

One thread, one `selectors` loop, one `sosplice.Splicer`. The loop
accepts, connects to an upstream (round robin, non-blocking, with a
timeout, trying the next upstream on failure), splices both ways and then
only learns of the end of each direction through `Splicer.fileno()`.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("splicectl.proxy")

UP, DOWN = "up", "down"


class UsageError(Exception):
    """A bad argument: main prints it on one line and exits 2."""


# -- addresses ---------------------------------------------------------------

def parse_addr(text: str, *, listen: bool = False) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080', 'host:8080', ':8080' -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"bad address {text!r}: expected [IPV6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise UsageError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"bad port in {text!r}: {port!r} is not a number") from None
    if not (0 if listen else 1) <= p <= 65535:
        raise UsageError(f"bad port in {text!r}: must be {'0' if listen else '1'}..65535")
    if not host:
        if not listen:
            raise UsageError(f"bad address {text!r}: an upstream needs a host")
        host = "0.0.0.0"
    return host, p


def resolve(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of the first TCP address of host:port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve {host!r}: {e.strerror}") from None
    fam, _, _, _, sa = infos[0]
    return fam, sa


def _listen(addr: tuple[str, int], backlog: int, what: str) -> socket.socket:
    """A non-blocking listening socket on `addr`, or one UsageError line."""
    fam, sa = resolve(*addr)
    ls = socket.socket(fam, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(sa)
        ls.listen(backlog)
    except OSError as e:
        ls.close()
        raise UsageError(f"cannot {what} on {fmt_addr(addr)}: {e.strerror}") from None
    ls.setblocking(False)
    return ls


def _writable(s: socket.socket) -> bool:
    """Whether a connecting socket has finished (either way), now."""
    p = select.poll()
    p.register(s, select.POLLOUT)
    return bool(p.poll(0))


def fmt_addr(sa: tuple | list | None) -> str:
    if not sa:
        return "-"
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# -- metrics -----------------------------------------------------------------

@dataclass
class Metrics:
    connections_total: int = 0
    bytes_done: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    dissolve: dict[str, int] = field(default_factory=dict)
    errors_total: int = 0

    def render(self, active: int, live_bytes: dict[str, int]) -> str:
        out = [
            "# HELP sosplice_connections_total Client connections accepted.",
            "# TYPE sosplice_connections_total counter",
            f"sosplice_connections_total {self.connections_total}",
            "# HELP sosplice_connections_active Client connections open now.",
            "# TYPE sosplice_connections_active gauge",
            f"sosplice_connections_active {active}",
            "# HELP sosplice_bytes_total Bytes spliced, up = client to upstream.",
            "# TYPE sosplice_bytes_total counter",
        ]
        for d in (UP, DOWN):
            out.append(f'sosplice_bytes_total{{direction="{d}"}} {self.bytes_done[d] + live_bytes.get(d, 0)}')
        out += ["# HELP sosplice_dissolve_total Splices dissolved, by reason.",
                "# TYPE sosplice_dissolve_total counter"]
        for reason, n in sorted(self.dissolve.items()):
            out.append(f'sosplice_dissolve_total{{reason="{reason}"}} {n}')
        out += ["# HELP sosplice_errors_total Failed upstream connects and splices ended by an error.",
                "# TYPE sosplice_errors_total counter",
                f"sosplice_errors_total {self.errors_total}", ""]
        return "\n".join(out)


def reason_name(err: int | None) -> str:
    if err is None:
        return "-"
    if err == 0:
        return "EOF"
    return errno.errorcode.get(err, str(err))


# -- the proxy ---------------------------------------------------------------

@dataclass(eq=False)
class Conn:
    id: int
    client: socket.socket
    peer: tuple
    upstream: socket.socket | None = None
    up_index: int = 0          # upstream being tried
    tries: int = 0             # upstreams tried so far
    deadline: float = 0.0      # connect deadline (monotonic)
    spliced: bool = False
    done: set = field(default_factory=set)   # directions dissolved with EOF
    closed: bool = False
    splices: list = field(default_factory=list)


@dataclass
class Options:
    listen: tuple[str, int]
    upstreams: list[tuple[str, int]]
    connect_timeout: float = 3.0
    idle: float | None = None
    max_conns: int = 0
    backlog_cap: int | None = None
    metrics: tuple[str, int] | None = None
    grace: float = 5.0
    check_upstreams: bool = True
    backend: str | None = None     # None: $SOSPLICE_BACKEND, else "auto"


class Proxy:
    """The loop. Create, `start()` (binds; may raise UsageError), `run()`.

    `stop()` may be called from any thread or a signal handler: the first
    call stops accepting and lets connections finish for `grace` seconds;
    a second call closes everything at once.
    """

    def __init__(self, opts: Options, *, engine_factory: Callable | None = None,
                 on_ready: Callable[[tuple], None] | None = None) -> None:
        self.opts = opts
        self.engine_factory = engine_factory
        self.on_ready = on_ready
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.metrics_sock: socket.socket | None = None
        self.engine = None
        self.conns: dict[int, Conn] = {}
        self.splices: dict[object, tuple[Conn, str]] = {}
        self.m = Metrics()
        self.rr = 0
        self.next_id = 1
        self.accepting = False
        self.stopping = 0          # 0 running, 1 draining, 2 hard stop
        self.stop_deadline = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.upstream_addrs: list[tuple[int, tuple]] = []
        self.address: tuple | None = None

    # -- setup ---------------------------------------------------------------

    def start(self) -> tuple:
        o = self.opts
        self.upstream_addrs = [resolve(h, p) for h, p in o.upstreams]
        if o.check_upstreams:
            for (h, p), (fam, sa) in zip(o.upstreams, self.upstream_addrs):
                try:
                    s = socket.socket(fam, socket.SOCK_STREAM)
                    s.settimeout(o.connect_timeout)
                    try:
                        s.connect(sa)
                    finally:
                        s.close()
                except OSError as e:
                    why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
                    raise UsageError(f"upstream {fmt_addr((h, p))} is unreachable: {why}") from None
        self.listener = _listen(o.listen, 1024, "listen")
        if o.metrics:
            try:
                self.metrics_sock = _listen(o.metrics, 64, "listen for metrics")
            except UsageError:
                self._close_listener()
                raise
        try:
            if self.engine_factory is not None:
                self.engine = self.engine_factory()
            else:
                import sosplice
                kw = {} if o.backlog_cap is None else {"backlog_cap": o.backlog_cap}
                self.engine = sosplice.Splicer(backend=o.backend, **kw)
        except BaseException:
            self._close_listener()
            if self.metrics_sock:
                self.metrics_sock.close()
            raise
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.sel.register(self.engine.fileno(), selectors.EVENT_READ, ("engine", None))
        if self.metrics_sock:
            self.sel.register(self.metrics_sock, selectors.EVENT_READ, ("metrics", None))
        self._set_accepting(True)
        self.address = self.listener.getsockname()
        return self.address

    def metrics_address(self) -> tuple | None:
        return self.metrics_sock.getsockname() if self.metrics_sock else None

    def stop(self) -> None:
        """Thread- and signal-safe."""
        try:
            self._wake_w.send(b"s")
        except OSError:
            pass

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        try:
            if self.on_ready:
                self.on_ready(self.address)
            while True:
                if self.stopping and not self.conns:
                    break
                if self.stopping and time.monotonic() >= self.stop_deadline:
                    if self.conns:
                        log.warning("grace period over: closing %d connection(s)", len(self.conns))
                    for c in list(self.conns.values()):
                        self._close(c, "shutdown")
                    break
                for key, ev in self.sel.select(self._timeout()):
                    kind, obj = key.data
                    if kind == "listen":
                        self._accept()
                    elif kind == "engine":
                        self._reap()
                    elif kind == "connect":
                        self._connected(obj)
                    elif kind == "wake":
                        self._on_wake()
                    elif kind == "metrics":
                        self._metrics_accept()
                    elif kind == "http":
                        self._metrics_serve(key.fileobj, obj)
                self._check_connect_timeouts()
        finally:
            self._shutdown()
        return 0

    def _timeout(self) -> float:
        t = 1.0
        now = time.monotonic()
        for c in self.conns.values():
            if not c.spliced and c.upstream is not None:
                t = min(t, c.deadline - now)
        if self.stopping:
            t = min(t, self.stop_deadline - now)
        return max(0.0, t)

    def _on_wake(self) -> None:
        try:
            n = len(self._wake_r.recv(64))
        except BlockingIOError:
            return
        for _ in range(n):
            self.stopping += 1
            if self.stopping == 1:
                log.info("stopping: no new connections, %d live, grace %.1f s", len(self.conns), self.opts.grace)
                self.stop_deadline = time.monotonic() + self.opts.grace
                self._set_accepting(False)
                self._close_listener()
            else:
                self.stop_deadline = time.monotonic()

    def _set_accepting(self, on: bool) -> None:
        if self.listener is None or on == self.accepting:
            return
        if on:
            self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        else:
            self.sel.unregister(self.listener)
        self.accepting = on

    def _close_listener(self) -> None:
        if self.listener is not None:
            self._set_accepting(False)
            self.listener.close()
            self.listener = None

    def _accept(self) -> None:
        for _ in range(64):
            if self.opts.max_conns and len(self.conns) >= self.opts.max_conns:
                self._set_accepting(False)
                return
            try:
                s, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: back off
                log.error("accept: %s", e)
                return
            s.setblocking(False)
            c = Conn(self.next_id, s, peer, up_index=self.rr % len(self.upstream_addrs))
            self.next_id += 1
            self.rr += 1
            self.conns[c.id] = c
            self.m.connections_total += 1
            log.debug("conn %d from %s", c.id, fmt_addr(peer))
            self._try_connect(c)

    def _try_connect(self, c: Conn) -> None:
        while c.tries < len(self.upstream_addrs):
            fam, sa = self.upstream_addrs[c.up_index]
            c.tries += 1
            u = socket.socket(fam, socket.SOCK_STREAM)
            u.setblocking(False)
            rc = u.connect_ex(sa)
            if rc in (0, errno.EINPROGRESS):
                c.upstream = u
                c.deadline = time.monotonic() + self.opts.connect_timeout
                if rc == 0:
                    self._splice(c)
                else:
                    self.sel.register(u, selectors.EVENT_WRITE, ("connect", c))
                return
            u.close()
            self._connect_failed(c, os.strerror(rc))
        log.warning("conn %d: no upstream reachable, closing the client", c.id)
        self._close(c, "no upstream")

    def _connect_failed(self, c: Conn, why: str) -> None:
        self.m.errors_total += 1
        log.warning("conn %d: upstream %s: %s", c.id, fmt_addr(self.opts.upstreams[c.up_index]), why)
        c.up_index = (c.up_index + 1) % len(self.upstream_addrs)

    def _drop_upstream(self, c: Conn) -> None:
        if c.upstream is not None:
            try:
                self.sel.unregister(c.upstream)
            except (KeyError, ValueError):
                pass
            c.upstream.close()
            c.upstream = None

    def _connected(self, c: Conn) -> None:
        if c.closed or c.spliced or c.upstream is None:
            return
        err = c.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop_upstream(c)
            self._connect_failed(c, os.strerror(err))
            self._try_connect(c)
            return
        self.sel.unregister(c.upstream)
        self._splice(c)

    def _check_connect_timeouts(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.conns.values() if not c.spliced and c.upstream is not None]:
            if now >= c.deadline:
                if _writable(c.upstream):
                    # Connected while this loop was busy elsewhere: the
                    # event is still in the selector's queue.
                    self._connected(c)
                    continue
                self._drop_upstream(c)
                self._connect_failed(c, "connect timed out")
                self._try_connect(c)

    def _splice(self, c: Conn) -> None:
        c.spliced = True
        try:
            for src, dst, d in ((c.client, c.upstream, UP), (c.upstream, c.client, DOWN)):
                sp = self.engine.splice(src, dst, idle=self.opts.idle)
                c.splices.append(sp)
                self.splices[sp] = (c, d)
        except OSError as e:
            # ENOTCONN / EPIPE: the client went away while we connected.
            log.info("conn %d: cannot splice: %s", c.id, e)
            self._close(c, "splice failed")
            return
        log.debug("conn %d spliced to %s", c.id, fmt_addr(c.upstream.getpeername()))

    def _reap(self) -> None:
        for sp in self.engine.reap():
            entry = self.splices.pop(sp, None)
            if entry is None:
                continue
            c, d = entry
            err = sp.error
            self.m.bytes_done[d] += sp.bytes
            reason = reason_name(err)
            self.m.dissolve[reason] = self.m.dissolve.get(reason, 0) + 1
            if c.closed:
                continue
            if err == 0:
                drain = c.upstream if d == UP else c.client
                try:
                    drain.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                c.done.add(d)
                if len(c.done) == 2:
                    self._close(c, "done", graceful=True)
            else:
                if err not in (errno.ETIMEDOUT,):
                    self.m.errors_total += 1
                self._close(c, f"{d} {reason}")

    def _close(self, c: Conn, why: str, graceful: bool = False) -> None:
        if c.closed:
            return
        c.closed = True
        log.debug("conn %d closed: %s", c.id, why)
        self.conns.pop(c.id, None)
        for s in (c.client, c.upstream):
            if s is not None and s.fileno() >= 0 and s.fileno() in self.sel.get_map():
                self.sel.unregister(s)
        socks = [c.client]
        if c.upstream is not None:
            try:
                self.sel.unregister(c.upstream)
            except (KeyError, ValueError):
                pass
            socks.append(c.upstream)
        for s in socks:
            if not graceful:
                # The engine holds its own dups until a splice flushes;
                # shutting the socket itself ends any live splice at once
                # and lets both peers see the end now.
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            s.close()
        if not self.stopping and not self.accepting and self.listener is not None:
            if not self.opts.max_conns or len(self.conns) < self.opts.max_conns:
                self._set_accepting(True)

    # -- metrics over HTTP, in the same loop ---------------------------------

    def _metrics_accept(self) -> None:
        try:
            s, _ = self.metrics_sock.accept()
        except OSError:
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, ("http", bytearray()))

    def _metrics_serve(self, s: socket.socket, buf: bytearray) -> None:
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < 65536:
            return
        self.sel.unregister(s)
        try:
            if buf.startswith(b"GET "):
                body = self.render_metrics().encode()
                head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            else:
                body = b"only GET\n"
                head = b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 9\r\n\r\n"
            s.settimeout(1.0)
            s.sendall(head + body)
        except OSError:
            pass
        finally:
            s.close()

    def render_metrics(self) -> str:
        live = {UP: 0, DOWN: 0}
        for sp, (_, d) in list(self.splices.items()):
            live[d] += sp.bytes
        return self.m.render(len(self.conns), live)

    # -- the end -------------------------------------------------------------

    def _shutdown(self) -> None:
        for c in list(self.conns.values()):
            self._close(c, "exit")
        self._close_listener()
        for key in list(self.sel.get_map().values()):
            if key.data and key.data[0] == "http":
                key.fileobj.close()
        if self.metrics_sock:
            self.metrics_sock.close()
            self.metrics_sock = None
        self.sel.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._wake_r.close()
        self._wake_w.close()


def run_cli(args) -> int:
    """`splicectl proxy` from parsed arguments. Raises UsageError."""
    import signal

    if args.connect_timeout <= 0:
        raise UsageError("--connect-timeout must be > 0")
    if args.idle is not None and args.idle <= 0:
        raise UsageError("--idle must be > 0 seconds")
    if args.max_conns < 0:
        raise UsageError("--max-conns must be >= 0")
    if args.grace < 0:
        raise UsageError("--grace must be >= 0")
    if args.backlog_cap is not None and args.backlog_cap < 65536:
        raise UsageError("--backlog-cap must be at least 65536 bytes")
    opts = Options(
        listen=parse_addr(args.listen, listen=True),
        upstreams=[parse_addr(u) for u in args.upstream],
        connect_timeout=args.connect_timeout, idle=args.idle, max_conns=args.max_conns,
        backlog_cap=args.backlog_cap,
        metrics=parse_addr(args.metrics, listen=True) if args.metrics else None,
        grace=args.grace, check_upstreams=not args.no_check, backend=args.backend,
    )
    proxy = Proxy(opts)
    try:
        addr = proxy.start()
    except PermissionError as e:
        raise SystemExit(f"splicectl proxy: {e.strerror or e}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proxy.stop())
    msg = f"listening on {fmt_addr(addr)}"
    if proxy.metrics_address():
        msg += f", metrics on http://{fmt_addr(proxy.metrics_address())}/metrics"
    msg += " -> " + ", ".join(fmt_addr(u) for u in opts.upstreams)
    msg += f", backend {proxy.engine.backend}"
    print(msg, flush=True)
    return proxy.run()
