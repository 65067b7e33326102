"""`splicectl proxy`: a TCP proxy that relays short exchanges itself and
splices the rest in the kernel, where its bytes never enter user space.

One thread, one `selectors` loop, one `sosplice.Splicer`, any number of
listeners (one per `[[listen]]` of a config file, or the command line's
one). The loop accepts, connects to one of the listener's upstreams (round
robin, non-blocking, with a timeout, trying the next upstream on failure),
writes a PROXY protocol header if the listener asks for one, and then
relays both directions itself (recv, send) until the connection shows
bulk or has been relayed for --splice-after seconds, as HAProxy's `option
splice-auto` does: a short exchange costs far less copied than spliced
(two splices to set up and tear down). Then it splices both ways and
only learns of the end of each direction through `Splicer.fileno()`.
(`--workers N` runs N of these, in processes of their own:
splicectl.workers.)

`reload()` (SIGHUP) applies a new `Config`: listeners that are new start,
those that are gone stop accepting; a connection keeps the listener
settings it was accepted under and is never touched by a reload.

The loop's parts: each selector entry's data is the method to call when
it is ready (no dispatch on tags); every deadline (a connect's, the next
--splice-after or --idle look, --grace, an accept pause) is an entry in
one heap, and a connection's entries other than its current one are
skipped lazily (no pass scans the connections); a connection is a small
state machine, `ConnState`:

    accept -> CONNECTING -> RELAYING -> SPLICED -> (CLOSING) -> DONE
    (--splice-after 0: CONNECTING -> SPLICED at once)

and ends through one method, `_close`. The engine shares the proxy's two
sockets (`splice_pair`), so they are closed only once both splices of
the connection are reaped: a connection the proxy resets waits in
CLOSING until then. A connection one of whose directions ends while it is
relayed stays RELAYING to its end (a splice pair needs both directions).
Every option value is checked by one table, `CHECKS`, whichever way it
came (command line, config file, a caller's Config).

How a connection ends, relayed or spliced alike (the contract; docs:
README, `splicectl proxy --help`):

- A direction that ends cleanly (EOF on its source: error 0) is passed on
  as a FIN: `shutdown(SHUT_WR)` on its drain. The other direction goes on.
  Once both have, both sockets are closed normally.
- Anything else ends the whole connection with a reset on both sides,
  never a FIN: a direction that ends with an error (its source was reset:
  ECONNRESET; its drain failed: EPIPE; ...), and every connection the
  proxy cuts itself (`--idle`, `--grace` running out, a refused splice,
  no upstream). A FIN would tell the peers that the stream was complete;
  a truncated answer must not look like a whole one. That is how OpenBSD
  ends a splice whose socket failed.
- `--idle` is a connection timeout, as socat -T and HAProxy's `timeout
  tunnel`: it fires only when neither direction has moved a byte for that
  long, never because one direction alone is quiet.
"""
from __future__ import annotations

import enum
import errno
import heapq
import itertools
import logging
import math
import os
import resource
import select
import selectors
import socket
import struct
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from sosplice import _sock, reason_name

from . import proxyproto

log = logging.getLogger("splicectl.proxy")

UP, DOWN = "up", "down"

# SO_LINGER {on, 0 s}: close() sends a reset and drops what is unsent.
LINGER_RESET = struct.pack("ii", 1, 0)

# Durations (--idle, --grace, --connect-timeout): below a millisecond the
# proxy's own loop cannot keep them, beyond this they are a typo (HAProxy's
# timeouts stop at 2^31 ms too); both ends are refused at start-up.
MIN_SECONDS = 0.001
MAX_SECONDS = 2_000_000.0
# An active connection's idle deadline is looked at every IDLE_SLICES-th of
# --idle: the timeout fires between S and S * (1 + 1/IDLE_SLICES) seconds
# after the last byte, and a busy connection costs IDLE_SLICES looks per S.
IDLE_SLICES = 4
# File descriptors per connection: the two sockets, which the engine shares
# (splice_pair), and (worker) a pipe per direction.
FDS_PER_CONN = {"bpf": 2, "worker": 6}
FDS_SPARE = 64   # listeners, the engine's own, stdio, metrics clients
# Kept free of connections: metrics clients, a reload's new listeners.
FDS_RESERVE = 16
# Backlog cap range of sosplice.Splicer (checked here to name the option).
BACKLOG_CAP_MIN, BACKLOG_CAP_MAX = 1 << 16, 1 << 28
# --workers: processes (each its own loop and engine; splicectl.workers).
MAX_WORKERS = 256
# The relay phase (RELAYING): one recv takes at most RELAY_CHUNK bytes; a
# recv that fills it, a send that the drain does not take whole, or
# RELAY_BULK bytes relayed (both directions) is bulk, which is spliced.
RELAY_CHUNK = 1 << 16
RELAY_BULK = 256 << 10
# --splice-after: seconds of relaying before a connection is spliced anyway.
SPLICE_AFTER = 0.5


class UsageError(Exception):
    """A bad argument: main prints it on one line and exits 2."""


# -- option values: every check, here -----------------------------------------
#
# The command line (main's argparse types), the config file (config.py) and
# Proxy.start() (check_config, for a Config or Options a caller built) all
# check a setting with CHECKS[key]; they only parse text or check TOML types
# first. Each check returns the value or raises UsageError with the end of
# a sentence that the option's (or the key's) name starts.

BACKENDS = ("bpf", "worker", "auto")


def check_seconds(value: float, *, zero_ok: bool = False) -> float:
    """`value` if it is a usable duration in seconds, else UsageError.

    Finite, from MIN_SECONDS to MAX_SECONDS; 0 too with `zero_ok`.
    """
    if not (math.isfinite(value) and (MIN_SECONDS <= value <= MAX_SECONDS
                                      or (zero_ok and value == 0))):
        span = f"from {MIN_SECONDS:g} to {MAX_SECONDS:.0f} seconds"
        raise UsageError(f"must be {'0 or ' if zero_ok else ''}{span}, not {value!r}")
    return value


def check_seconds_or_zero(value: float) -> float:
    return check_seconds(value, zero_ok=True)


def check_count(value: int) -> int:
    if value < 0:
        raise UsageError(f"must be >= 0 (0: no limit), not {value}")
    return value


def check_workers(value: int) -> int:
    if not 1 <= value <= MAX_WORKERS:
        raise UsageError(f"must be from 1 to {MAX_WORKERS}, not {value}")
    return value


def check_backlog_cap(value: int) -> int:
    if not BACKLOG_CAP_MIN <= value <= BACKLOG_CAP_MAX:
        raise UsageError(f"must be from 64K to 256M bytes, not {value}")
    return value


def check_choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in options:
            raise UsageError(f"must be one of {', '.join(repr(o) for o in options)}, not {value!r}")
        return value
    return check


# By Config and ListenConfig field name. None (not set) is never checked.
CHECKS: dict[str, Callable] = {
    "connect_timeout": check_seconds,
    "grace": check_seconds_or_zero,
    "splice_after": check_seconds_or_zero,
    "idle": check_seconds,
    "max_conns": check_count,
    "backlog_cap": check_backlog_cap,
    "backend": check_choice(BACKENDS),
    "workers": check_workers,
    "send_proxy": check_choice(proxyproto.VERSIONS),
}
# How an error names a setting: its command-line option if it has one.
OPTION_NAMES = {"connect_timeout": "--connect-timeout", "grace": "--grace", "idle": "--idle",
                "splice_after": "--splice-after",
                "max_conns": "--max-conns", "backlog_cap": "--backlog-cap",
                "backend": "--backend", "workers": "--workers", "send_proxy": "send_proxy"}


def check_config(cfg: Config) -> Config:
    """`cfg` if every value in it passes CHECKS, else one UsageError line
    that names the option. main and config.load check the same while
    parsing; this is for callers that build Config or Options themselves,
    so that no bad value reaches a connection."""
    values = [(k, getattr(cfg, k)) for k in ("connect_timeout", "grace", "splice_after",
                                              "backlog_cap", "backend", "workers")]
    if not cfg.listeners:
        raise UsageError("at least one listener is needed")
    for lc in cfg.listeners:
        if not lc.upstreams:
            raise UsageError("at least one UPSTREAM is needed")
        values += [(k, getattr(lc, k)) for k in ("idle", "max_conns", "send_proxy")]
        if lc.max_conns and lc.max_conns < cfg.workers:
            raise UsageError(f"--max-conns {lc.max_conns} is shared by {cfg.workers} workers: "
                             f"give at least {cfg.workers} (or 0: no limit)")
    for key, value in values:
        if value is not None:
            try:
                CHECKS[key](value)
            except UsageError as e:
                raise UsageError(f"{OPTION_NAMES[key]} {e}") from None
    return cfg


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
    if not (port.isascii() and port.isdigit()):
        raise UsageError(f"bad port in {text!r}: {port!r} is not a number")
    p = int(port)
    if not (0 if listen else 1) <= p <= 65535:
        raise UsageError(f"bad port in {text!r}: must be {'0' if listen else '1'}..65535")
    if not host:
        if not listen:
            raise UsageError(f"bad address {text!r}: an upstream needs a host")
        host = "0.0.0.0"
    return host, p


def resolve(host: str, port: int, what: str = "address") -> tuple[int, tuple]:
    """(family, sockaddr) of the first TCP address of host:port.

    `what` names the argument in the error ("UPSTREAM", "--metrics", ...).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        why = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        raise UsageError(f"{what} {fmt_addr((host, port))}: cannot resolve {host!r}: {why}") from None
    fam, _, _, _, sa = infos[0]
    return fam, sa


def check_reachable(cfg: Config) -> None:
    """UsageError naming the first upstream of `cfg` that a connect
    cannot reach (within connect_timeout)."""
    for h, p in dict.fromkeys(u for lc in cfg.listeners for u in lc.upstreams):
        fam, sa = resolve(h, p, "UPSTREAM")
        try:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(cfg.connect_timeout)
            try:
                s.connect(sa)
            finally:
                s.close()
        except OSError as e:
            why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise UsageError(f"upstream {fmt_addr((h, p))} is unreachable: {why}") from None


def _bound(addr: tuple[str, int], what: str, arg: str, *, reuseport: bool = False) -> socket.socket:
    """A non-blocking socket bound to `addr`, or one UsageError line. The
    caller listens once it can serve: until then a client is refused, as
    before the proxy started, rather than left waiting in the backlog.

    `reuseport`: for --workers, each of which binds the same address; the
    kernel spreads the connections over their listening sockets.
    """
    fam, sa = resolve(*addr, arg)
    ls = socket.socket(fam, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        ls.bind(sa)
    except OSError as e:
        ls.close()
        raise UsageError(f"cannot {what} on {fmt_addr(addr)}: {e.strerror}") from None
    ls.setblocking(False)
    return ls


def _is_local(fam: int, ip: str) -> bool:
    """Whether `ip` is an address of this host (binding to it works)."""
    with socket.socket(fam, socket.SOCK_DGRAM) as u:
        try:
            u.bind((ip, 0))
        except OSError:
            return False
    return True


def _loops_back(listener: socket.socket, fam: int, sa: tuple) -> bool:
    """Whether a connect to `sa` would reach `listener` itself."""
    lfam = listener.family
    lhost, lport = listener.getsockname()[:2]
    if sa[1] != lport:
        return False
    ip = sa[0]
    if fam != lfam:
        # A dual-stack [::] listener also takes IPv4; a 0.0.0.0 one no IPv6.
        if not (lfam == socket.AF_INET6 and lhost == "::"):
            return False
        return _is_local(fam, ip)
    if lhost in ("0.0.0.0", "::"):
        return _is_local(fam, ip)
    return ip == lhost


def _reset(s: socket.socket) -> None:
    """Abort the connection of `s` with a reset (RST), never a FIN, now.

    connect(AF_UNSPEC) (tcp_disconnect) sends the RST at once and ends any
    live splice on the socket: its source is closed, its drain can no
    longer send. SO_LINGER {1, 0} makes the later close() abortive too.
    The fd stays open: the engine shares it until both splices are reaped.
    """
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass  # already closed by the kernel (reset): nothing to send
    _disconnect(s)


def _disconnect(s: socket.socket) -> None:
    """connect(AF_UNSPEC) on `s`: an established TCP socket sends a reset.

    Python's connect() takes no AF_UNSPEC address, hence libc. Errors are
    ignored: a socket the peer has reset is already closed.
    """
    global _libc_connect
    if _libc_connect is None:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc_connect = libc.connect
        _libc_connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    _libc_connect(s.fileno(), _SOCKADDR_UNSPEC, len(_SOCKADDR_UNSPEC))


_libc_connect = None
# struct sockaddr with sa_family = AF_UNSPEC (0), the rest zero.
_SOCKADDR_UNSPEC = bytes(16)


def _reset_not_fin(source: socket.socket) -> bool:
    """Whether a source whose splice ended with 0 (EOF) was in fact reset.
    Asked only while the other direction has not passed its FIN on.

    A socket's error is reported once, to whoever asks first: when the
    other direction's send to the same socket takes the ECONNRESET, the
    engine's read of the source then finds no error and a closed stream,
    and reports EOF. The TCP state tells: a FIN received leaves the source
    in CLOSE_WAIT, or in CLOSE only if we had sent our own FIN on it
    first (through TIME_WAIT, which the socket leaves as CLOSE), which
    only the other direction's clean end does. So CLOSE without that is a
    reset (or a connection that timed out): an error, not an end.
    """
    try:
        return _sock.tcp_state(source) == _sock.TCP_CLOSE
    except OSError:
        return False


# How a connection ended (the log line's end=, and which counter counts
# it): both FINs passed on; a peer reset it; else a reason of the proxy's
# own (idle, grace, no_upstream, splice_refused, error, exit).
_END_CLOSED = "closed"
_END_CLIENT_ABORT = "client_abort"
_END_UPSTREAM_ABORT = "upstream_abort"


def _was_reset(s: socket.socket | None) -> bool:
    """Whether the kernel closed `s`, an open socket of ours: its peer
    reset it (or it timed out). The proxy's own resets come after."""
    if s is None:
        return False
    try:
        return _sock.tcp_state(s) == _sock.TCP_CLOSE
    except OSError:
        return False


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


def fmt_peer(sa: tuple | list | None) -> str:
    """fmt_addr of a peer, an IPv4-mapped IPv6 address (a dual-stack
    listener's IPv4 client) written as the IPv4 address it is."""
    if sa and str(sa[0]).startswith("::ffff:") and "." in str(sa[0]):
        sa = (str(sa[0])[7:], sa[1])
    return fmt_addr(sa)


# -- the proxy ---------------------------------------------------------------

class ConnState(enum.Enum):
    """Where a connection is. Each transition is made by one method:

        CONNECTING --_relay()----> RELAYING   upstream connected, relayed by the loop
        CONNECTING --_splice()---> SPLICED    upstream connected, --splice-after 0
        CONNECTING --_close()----> DONE       no upstream, a refused splice, stop
        RELAYING ---_splice()----> SPLICED    bulk, or --splice-after passed
        RELAYING ---_close()-----> DONE       both FINs passed on, a reset, --idle, stop
        SPLICED ----_close()-----> CLOSING    a splice of it is still to be reaped
        SPLICED ----_close()-----> DONE       none is (the second FIN passed on)
        CLOSING ----_release()---> DONE       its last splice reaped (by _reap)

    (`_close` goes on to `_release` itself when nothing is pending.)

    CONNECTING: accepted; the connect to an upstream is in flight (the
    upstream socket is in the selector, its deadline in the timer heap).
    RELAYING: the loop copies both directions itself (`_relay_io`), as
    HAProxy's splice-auto does before a transfer shows bulk; each socket
    is in the selector for reading its direction and, while a send to
    it is pending, for writing. `Conn.half` is the direction that has
    passed its FIN on, if one has: such a connection is relayed to its end.
    SPLICED: both directions spliced, each ending on its own; `Conn.half`
    is the one that has passed its FIN on, if one has.
    CLOSING: closed by the proxy (reset both ways) while the engine still
    shares its sockets with a splice that is not reaped yet (splice_pair):
    they stay open until it is. Counted in `Proxy.held`.
    DONE: sockets closed, its line logged, in no table.

    Only CONNECTING, RELAYING and SPLICED connections are in `Proxy.conns`.
    """
    CONNECTING = "connecting"
    RELAYING = "relaying"
    SPLICED = "spliced"
    CLOSING = "closing"
    DONE = "done"


CONNECTING, RELAYING, SPLICED, CLOSING, DONE = (
    ConnState.CONNECTING, ConnState.RELAYING, ConnState.SPLICED, ConnState.CLOSING,
    ConnState.DONE)

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Stop(enum.Enum):
    """The proxy's own state: RUNNING -> DRAINING (the first stop(): no
    new connections, the live ones have --grace) -> STOPPING (a second
    stop(), or --grace over: reset what is left and leave the loop)."""
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"


@dataclass(eq=False, slots=True)
class Conn:
    id: int
    client: socket.socket
    peer: tuple
    via: Listener              # the listener that accepted it, as it was then
    listener: str = ""         # its address, "HOST:PORT" (labels: ls/top, metrics)
    state: ConnState = CONNECTING
    upstream: socket.socket | None = None
    up_index: int = 0          # upstream being tried; once connected, the one it is spliced to
    tries: int = 0             # upstreams tried so far
    # Its one live entry in Proxy.timers: the connect deadline (CONNECTING),
    # the next --splice-after or --idle look (RELAYING), the next --idle
    # look (SPLICED); 0: none. Any other entry is stale.
    due: float = 0.0
    splices: tuple = ()        # (up, down), once SPLICED
    pending: int = 0           # of those, the ones not reaped yet
    half: str | None = None    # the direction that has passed its FIN on
    # --idle: the bytes of both splices (RELAYING: relayed) at the last
    # look, and when that count last changed (monotonic).
    seen: int = 0
    quiet_since: float = 0.0
    # RELAYING: the bytes relayed each way (they count in the log line's
    # and the metrics' bytes, never in the kernel share); the bytes read
    # and not yet taken by the drain, each way; the selector events of
    # each socket (0: not in the selector); when --splice-after is up;
    # whether it is to be spliced once nothing is pending.
    relayed_up: int = 0
    relayed_down: int = 0
    pend_up: bytes = b""
    pend_down: bytes = b""
    client_ev: int = 0
    upstream_ev: int = 0
    splice_at: float = 0.0
    bulk: bool = False
    relayed: bool = False      # it was RELAYING (its log line says `cut`, not `-`)
    # What its log line and metrics tell (see _log_end).
    accepted: float = 0.0      # monotonic
    connect_started: float = 0.0
    connect_secs: float | None = None   # None: no upstream reached
    up_end: str = ""           # why each direction ended, if it did while SPLICED
    down_end: str = ""
    end: str = ""              # why the connection ended (_END_*)
    duration: float = 0.0


@dataclass(frozen=True)
class ListenConfig:
    """One listener: a `[[listen]]` table, or the command line's LISTEN."""
    bind: tuple[str, int]
    upstreams: tuple[tuple[str, int], ...]
    idle: float | None = None      # --idle: seconds without a byte either way
    max_conns: int = 0             # 0: no limit
    send_proxy: str | None = None  # "v1", "v2": PROXY protocol header to the upstream


@dataclass(frozen=True)
class Config:
    """Everything `Proxy` runs: its listeners and the process-wide settings.

    splicectl.config builds one from a file and checks every value; a
    reload replaces it whole. `backend`, `backlog_cap` and `metrics` are
    the engine's and the process's: a reload keeps the running ones.
    """
    listeners: tuple[ListenConfig, ...]
    connect_timeout: float = 3.0
    backlog_cap: int | None = None
    metrics: tuple[str, int] | None = None
    grace: float = 5.0
    check_upstreams: bool = True
    backend: str | None = None     # None: $SOSPLICE_BACKEND, else "auto"
    workers: int = 1               # processes (splicectl.workers); each max_conns is shared
    splice_after: float = SPLICE_AFTER   # seconds relayed before splicing; 0: splice at once


@dataclass
class Options:
    """The command line's one listener (and what demo builds)."""
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
    workers: int = 1
    splice_after: float = SPLICE_AFTER

    def config(self) -> Config:
        """As a Config, checked (check_config)."""
        return check_config(Config(
            listeners=(ListenConfig(self.listen, tuple(self.upstreams), self.idle, self.max_conns),),
            connect_timeout=self.connect_timeout, backlog_cap=self.backlog_cap,
            metrics=self.metrics, grace=self.grace, check_upstreams=self.check_upstreams,
            backend=self.backend, workers=self.workers, splice_after=self.splice_after))


class Listener:
    """A listening socket and what its connections are routed by.

    A reload that changes a listener's settings makes a new Listener on
    the same socket; the connections of the old one keep it (and its
    upstreams, --idle, send_proxy) until they end.
    """

    def __init__(self, conf: ListenConfig, sock: socket.socket,
                 upstream_addrs: list[tuple[int, tuple]]) -> None:
        self.conf = conf
        self.sock: socket.socket | None = sock
        self.upstream_addrs = upstream_addrs
        self.name = fmt_addr(sock.getsockname())
        self.rr = 0                # round robin over upstream_addrs
        self.counted = None        # its sosplice_connections_total child (Proxy._bind_all)
        self.accepting = False     # registered with the selector


class Proxy:
    """The loop. Create, `start()` (binds; may raise UsageError), `run()`.

    `stop()` may be called from any thread or a signal handler: the first
    call stops accepting and lets connections finish for `grace` seconds,
    then resets those still open; a second call resets them at once
    (`Stop`). `reload()` may be too: the loop then calls `reloader`
    (which returns the new Config, or raises UsageError to keep the old
    one) and applies its result (see `_apply`).

    The loop: every selector entry's data is the callable to run when it
    is ready (`_accept` of a listener, `_connected` of a CONNECTING
    connection, `_relay_io` of a RELAYING one's sockets, `_on_wake`, the
    metrics server; the engine's fd only marks that `_reap` is to run
    after the pass); every deadline (a connect's, a --splice-after or
    --idle look, --grace, an accept pause) is one entry of one heap,
    `timers` (`_at`). A connection moves
    through `ConnState`, and ends through `_close` only.
    """

    def __init__(self, opts: Options | Config, *, engine_factory: Callable | None = None,
                 on_ready: Callable[[tuple], None] | None = None,
                 reloader: Callable[[], Config] | None = None,
                 master: socket.socket | None = None) -> None:
        self.opts = opts
        self.cfg: Config | None = None   # set by start(), replaced by reloads
        self.engine_factory = engine_factory
        self.on_ready = on_ready
        self.reloader = reloader
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[tuple[str, int], Listener] = {}   # by ListenConfig.bind
        self.live: dict[str, int] = {}   # live connections by listener name (max_conns)
        self.metrics_sock: socket.socket | None = None
        self.engine = None
        self.conns: dict[int, Conn] = {}   # CONNECTING, RELAYING and SPLICED ones, by id
        # Every deadline, one heap (see _at): (when, seq, callback, conn or
        # None). A connection's entry is live while its `due` is `when`;
        # the others are skipped (and dropped in bulk, see _at).
        self.timers: list[tuple[float, int, Callable, Conn | None]] = []
        self._seq = itertools.count()
        self.splices: dict[object, tuple[Conn, str]] = {}   # splice -> (conn, direction)
        self.scrapes: set[socket.socket] = set()   # metrics clients being served
        from .metrics import Metrics   # prometheus_client: not for ls/top
        self.m = Metrics(self._live_counts)
        # Connection ids (log lines): 1, 2, 3, ...; worker i of n numbers
        # i+1, i+1+n, ... so that ids stay unique across workers.
        self.next_id, self.id_step = 1, 1
        self.accept_again = 0.0    # accept paused by EMFILE and the like until then
        # Connections the fd limit leaves room for (None: no limit), and
        # whether accepting is paused because they are all open.
        self.fd_room: int | None = None
        self.fd_full = False
        self.held = 0   # CLOSING connections: their sockets wait for their splices
        self.stop_state = Stop.RUNNING
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.address: tuple | None = None
        self.ev = 0     # the events of the selector entry being run
        # Whether run() drives and reaps the engine after this pass, and
        # when it must at the latest (its timeout(); never for a threaded one).
        self.engine_due = True
        self.engine_at = math.inf
        # A worker of splicectl.workers: its master's end of a socketpair
        # (stop, reload, a metrics scrape), and listeners it shares with
        # the other workers (SO_REUSEPORT).
        self.master = master

    # -- setup ---------------------------------------------------------------

    def start(self) -> tuple:
        """Check, bind, build the engine, listen; return the first
        listener's address. Raises UsageError (nothing is left bound)."""
        cfg = self.opts.config() if isinstance(self.opts, Options) else check_config(self.opts)
        if cfg.check_upstreams:
            check_reachable(cfg)
        listeners = self._bind_all(cfg.listeners)
        try:
            if cfg.metrics:
                self.metrics_sock = _bound(cfg.metrics, "listen for metrics", "--metrics")
            if self.engine_factory is not None:
                self.engine = self.engine_factory()
            else:
                import sosplice
                # thread=False: this loop drives the bpf engine (_reap), so no
                # controller thread contends with it for the GIL and the lock.
                kw = {"thread": False}
                if cfg.backlog_cap is not None:
                    kw["backlog_cap"] = cfg.backlog_cap
                try:
                    self.engine = sosplice.Splicer(backend=cfg.backend, **kw)
                except OSError as e:    # backend "bpf" asked for and not loadable
                    raise UsageError(f"backend {cfg.backend or 'bpf'}: {e.strerror or e}") from None
            self._check_fd_limit(cfg)
            self.fd_room = self._fd_room()
            # Only now: building a bpf engine compiles its programs, which
            # takes seconds; a client that came meanwhile would wait.
            for lst in listeners:
                self._listen(lst.sock, 1024, lst.conf.bind)
            if self.metrics_sock is not None:
                self._listen(self.metrics_sock, 64, cfg.metrics)
        except BaseException:
            for lst in listeners:
                lst.sock.close()
            if self.metrics_sock:
                self.metrics_sock.close()
                self.metrics_sock = None
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            raise
        self.cfg = cfg
        # Each selector entry's data is what run() calls when it is ready.
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.sel.register(self.engine.fileno(), selectors.EVENT_READ, self._engine_ready)
        if self.metrics_sock:
            self.sel.register(self.metrics_sock, selectors.EVENT_READ, self._metrics_accept)
        if self.master is not None:
            self.sel.register(self.master, selectors.EVENT_READ, self._on_master)
        for lst in listeners:
            self.listeners[lst.conf.bind] = lst
            self._set_accepting(lst, True)
        self.address = listeners[0].sock.getsockname()
        self.m.set_backend(self.engine.backend)
        return self.address

    def _bind_all(self, confs: tuple[ListenConfig, ...],
                  have: dict[tuple[str, int], Listener] | None = None) -> list[Listener]:
        """A Listener per conf, bound (not listening): on the socket of
        `have`'s listener of the same bind, else on a new one. Resolves
        every upstream and refuses one that loops back into its listener.
        Raises UsageError with nothing new left bound."""
        made: list[Listener] = []
        try:
            for lc in confs:
                addrs = [resolve(h, p, "UPSTREAM") for h, p in lc.upstreams]
                old = (have or {}).get(lc.bind)
                if old is None and self.master is not None and lc.bind[1] == 0:
                    raise UsageError(f"listener {fmt_addr(lc.bind)}: with --workers a listener "
                                     "added by a reload needs its port: each worker would get "
                                     "another one for port 0")
                sock = old.sock if old is not None else \
                    _bound(lc.bind, "listen", "LISTEN", reuseport=self.master is not None)
                lst = Listener(lc, sock, addrs)
                lst.counted = self.m.connections.labels(lst.name)
                made.append(lst)
                for (h, p), (fam, sa) in zip(lc.upstreams, addrs):
                    if _loops_back(sock, fam, sa):
                        raise UsageError(f"upstream {fmt_addr((h, p))} is the listener "
                                         f"{fmt_addr(lc.bind)} itself: every connection "
                                         "would loop back into it")
        except BaseException:
            for lst in made:
                if have is None or lst.conf.bind not in have:
                    lst.sock.close()
            raise
        return made

    @staticmethod
    def _listen(s: socket.socket, backlog: int, arg: tuple) -> None:
        try:
            s.listen(backlog)
        except OSError as e:
            raise UsageError(f"cannot listen on {fmt_addr(arg)}: {e.strerror}") from None

    def _check_fd_limit(self, cfg: Config) -> None:
        """Every listener's max_conns fits in the fd limit (raised if need be).

        Beyond it, accept() and socket() fail with EMFILE on every try, so
        every connection over the limit would be refused at once.
        """
        limits = [lc.max_conns for lc in cfg.listeners]
        if not all(limits):
            return
        n = sum(limits)
        backend = getattr(self.engine, "backend", "worker")
        need = n * FDS_PER_CONN.get(backend, max(FDS_PER_CONN.values())) + FDS_SPARE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or need <= soft:
            return
        if hard == resource.RLIM_INFINITY or need <= hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
        raise UsageError(f"--max-conns {n} needs about {need} file descriptors on the {backend} "
                         f"backend, the limit is {hard}: lower --max-conns or raise the "
                         "limit (ulimit -n)")

    def _fd_room(self) -> int | None:
        """How many connections fit in the fds left under RLIMIT_NOFILE,
        counting what the process holds now (the engine's included)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        held = len(os.listdir("/proc/self/fd")) - 1   # less listdir's own
        backend = getattr(self.engine, "backend", "worker")
        per_conn = FDS_PER_CONN.get(backend, max(FDS_PER_CONN.values()))
        return max(0, (soft - held - FDS_RESERVE) // per_conn)

    def _fds_for_one_more(self) -> bool:
        return self.fd_room is None or len(self.conns) + self.held < self.fd_room

    def metrics_address(self) -> tuple | None:
        return self.metrics_sock.getsockname() if self.metrics_sock else None

    def backend_text(self) -> str:
        """"bpf", or "worker (bpf: EPERM, needs CAP_BPF)" when auto fell back."""
        why = getattr(self.engine, "fallback", "")
        return self.engine.backend + (f" ({why})" if why else "")

    def describe(self) -> str:
        """The listeners, as the first line says them:
        "127.0.0.1:8080 -> 10.0.0.1:80, 10.0.0.2:80; [::]:8443 -> ..."."""
        return "; ".join(f"{lst.name} -> " + ", ".join(fmt_addr(u) for u in lst.conf.upstreams)
                         + (f" (send_proxy {lst.conf.send_proxy})" if lst.conf.send_proxy else "")
                         for lst in self.listeners.values())

    def stop(self) -> None:
        """Thread- and signal-safe."""
        self._wake(b"s")

    def reload(self) -> None:
        """Thread- and signal-safe: the loop calls `reloader` and applies it."""
        self._wake(b"h")

    def _wake(self, what: bytes) -> None:
        try:
            self._wake_w.send(what)
        except OSError:
            pass

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        try:
            if self.on_ready:
                self.on_ready(self.address)
            select = self.sel.select
            while True:
                if self.stop_state is not Stop.RUNNING:
                    if not self.conns:
                        break
                    if self.stop_state is Stop.STOPPING:
                        log.warning("grace period over: resetting %d connection(s)", len(self.conns))
                        for c in list(self.conns.values()):
                            self._close(c, "grace", "grace period over")
                        break
                for key, ev in select(self._timeout()):
                    self.ev = ev    # for the relay's callbacks (_relay_io)
                    key.data()
                # The engine is driven (an engine without a thread, bpf)
                # or reaped (a threaded one) when its fd was ready, its
                # timeout() has come, or the loop spliced: not on the
                # passes that only relayed (a drive is an epoll_wait and
                # a lock, some 20 us).
                now = time.monotonic()
                if self.engine_due or now >= self.engine_at:
                    self.engine_due = False
                    self._reap()
                self._run_due(now)
        finally:
            self._shutdown()
        return 0

    # -- deadlines: one heap --------------------------------------------------

    def _at(self, when: float, callback: Callable, c: Conn | None = None) -> None:
        """Call `callback(c, now)` once `when` (monotonic) has come. With a
        connection, the entry is its one live deadline (`c.due`): arming
        another, or any change of state, makes this one stale."""
        if c is not None:
            c.due = when
        timers = self.timers
        heapq.heappush(timers, (when, next(self._seq), callback, c))
        if len(timers) > 2 * len(self.conns) + 1024:
            # Stale entries wait for their time to come; with a long
            # --idle and many short connections they would pile up.
            timers[:] = [t for t in timers if t[3] is None or t[3].due == t[0]]
            heapq.heapify(timers)

    def _run_due(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            when, _, callback, c = heapq.heappop(timers)
            if c is None or c.due == when:
                callback(c, now)

    def _timeout(self) -> float:
        """Until the first live deadline (stale ones on top are dropped),
        or sooner if the engine (driven by this loop) asks to be."""
        timers = self.timers
        t = 1.0
        while timers:
            when, _, _, c = timers[0]
            if c is None or c.due == when:
                t = min(t, when - time.monotonic())
                break
            heapq.heappop(timers)
        if (e := self.engine.timeout()) is not None:
            t = min(t, e)
            self.engine_at = time.monotonic() + e
        return max(0.0, t)

    def _engine_ready(self) -> None:
        """The engine's fd: run() reaps after this pass."""
        self.engine_due = True

    # -- stop and reload, from the wake socket ----------------------------------

    def _on_wake(self) -> None:
        try:
            got = self._wake_r.recv(64)
        except BlockingIOError:
            return
        if b"h" in got and self.stop_state is Stop.RUNNING:
            self._reload()
        for _ in range(got.count(b"s")):
            if self.stop_state is Stop.RUNNING:
                self.stop_state = Stop.DRAINING
                log.info("stopping: no new connections, %d live, grace %.1f s", len(self.conns), self.cfg.grace)
                self._at(time.monotonic() + self.cfg.grace, self._grace_over)
                for lst in list(self.listeners.values()):
                    self._close_listener(lst)
                self.listeners.clear()
            else:
                self.stop_state = Stop.STOPPING

    def _on_master(self) -> None:
        """A worker's orders from splicectl.workers: one byte each, "s"
        stop (as stop()), "h" reload, "m" send the metrics (a 4-byte
        length, then the text). EOF: the master is gone; stop as for "s"."""
        try:
            got = self.master.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = b""
        if not got:
            self.sel.unregister(self.master)
            if self.stop_state is Stop.RUNNING:
                self._wake(b"s")
            return
        if b"m" in got:
            body = self.m.render()
            try:
                self.master.sendall(struct.pack("!I", len(body)) + body)
            except OSError:
                pass
        self._wake(got.replace(b"m", b""))

    def _grace_over(self, _c: None, _now: float) -> None:
        self.stop_state = Stop.STOPPING

    # -- reload ----------------------------------------------------------------

    def _reload(self) -> None:
        if self.reloader is None:
            log.warning("reload asked for, but there is no config file to read (--config)")
            return
        try:
            cfg = self.reloader()
            self._apply(cfg)
        except UsageError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        log.warning("reloaded: %s", self.describe())

    def _apply(self, cfg: Config) -> None:
        """Run `cfg` from now on, all of it or (UsageError) none of it.

        New listeners are bound and listening before any old one stops,
        so a failure (a port in use) changes nothing. A listener whose
        settings are unchanged stays as it is; a changed one keeps its
        socket (and its backlog of clients) under a new Listener; a
        removed one is closed: clients already accepted are connections
        like any other, those still in its backlog are refused by the
        kernel (a reset), as a restart would. Live connections are not
        looked at: each keeps the Listener it was accepted by.
        """
        check_config(cfg)
        old = self.cfg
        for key in ("backend", "backlog_cap", "metrics", "workers"):
            if getattr(cfg, key) != getattr(old, key):
                log.warning("reload: %s changed from %r to %r; it takes effect on restart only",
                            key, getattr(old, key), getattr(cfg, key))
        keep = {lc.bind: self.listeners[lc.bind] for lc in cfg.listeners
                if lc.bind in self.listeners and self.listeners[lc.bind].conf == lc}
        made = self._bind_all(tuple(lc for lc in cfg.listeners if lc.bind not in keep),
                              have=self.listeners)
        try:
            for lst in made:
                if lst.conf.bind not in self.listeners:
                    self._listen(lst.sock, 1024, lst.conf.bind)
        except BaseException:
            for lst in made:
                if lst.conf.bind not in self.listeners:
                    lst.sock.close()
            raise
        self.cfg = replace(cfg, backend=old.backend, backlog_cap=old.backlog_cap, metrics=old.metrics,
                           workers=old.workers)
        try:
            self._check_fd_limit(self.cfg)
        except UsageError as e:
            log.warning("reload: %s", e)
        current = {**keep, **{lst.conf.bind: lst for lst in made}}
        for bind, lst in self.listeners.items():
            if bind not in current:
                log.info("listener %s removed: no new connections on it", lst.name)
                self._close_listener(lst)
            elif current[bind] is not lst:
                self._set_accepting(lst, False)   # its socket goes on, under the new one
                lst.sock = None
        self.listeners = {lc.bind: current[lc.bind] for lc in cfg.listeners}
        for lst in self.listeners.values():
            self._resume_accepting(lst)

    # -- accepting ---------------------------------------------------------------

    def _set_accepting(self, lst: Listener, on: bool) -> None:
        if lst.sock is None or on == lst.accepting:
            return
        if on:
            self.sel.register(lst.sock, selectors.EVENT_READ, partial(self._accept, lst))
        else:
            self.sel.unregister(lst.sock)
        lst.accepting = on

    def _resume_accepting(self, lst: Listener) -> None:
        """Accept again unless stopping, paused, out of fds, or at the
        listener's max_conns."""
        if (self.stop_state is not Stop.RUNNING or self.accept_again or self.fd_full
                or lst.sock is None):
            return
        if not lst.conf.max_conns or self.live.get(lst.name, 0) < lst.conf.max_conns:
            self._set_accepting(lst, True)

    def _accept_again_due(self, _c: None, now: float) -> None:
        if self.accept_again and now >= self.accept_again:
            self.accept_again = 0.0
            for lst in self.listeners.values():
                self._resume_accepting(lst)

    def _close_listener(self, lst: Listener) -> None:
        if lst.sock is not None:
            self._set_accepting(lst, False)
            lst.sock.close()
            lst.sock = None

    def _accept(self, lst: Listener) -> None:
        if lst.sock is None:   # closed by a reload or a stop in this same round
            return
        for _ in range(64):
            if lst.conf.max_conns and self.live.get(lst.name, 0) >= lst.conf.max_conns:
                self._set_accepting(lst, False)
                return
            if not self._fds_for_one_more():
                self._fds_exhausted()
                return
            try:
                s, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: the connection stays queued and the
                # listener readable, so pause rather than spin on it.
                log.error("accept: %s; pausing accept for 0.5 s", e)
                for other in self.listeners.values():
                    self._set_accepting(other, False)
                self.accept_again = time.monotonic() + 0.5
                self._at(self.accept_again, self._accept_again_due)
                return
            s.setblocking(False)
            # As HAProxy: a relay must not hold bytes back for Nagle.
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(self.next_id, s, peer, lst, lst.name,
                     up_index=lst.rr % len(lst.upstream_addrs), accepted=time.monotonic())
            self.next_id += self.id_step
            lst.rr += 1
            self.conns[c.id] = c
            self.live[c.listener] = self.live.get(c.listener, 0) + 1
            lst.counted.inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("conn %d from %s on %s", c.id, fmt_addr(peer), c.listener)
            self._try_connect(c)

    def _fds_exhausted(self) -> None:
        """Stop accepting until a connection closes, as HAProxy does at
        maxconn: a connection accepted now could get no upstream socket or
        splice (EMFILE) and would have to be cut, while one left in the
        listen backlog waits and is served later. Logged once per episode."""
        if not self.fd_full:
            self.fd_full = True
            log.warning("file descriptors: %d connections fill the limit (RLIMIT_NOFILE %d); "
                        "new ones wait in the listen backlog until one closes",
                        len(self.conns), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for lst in self.listeners.values():
            self._set_accepting(lst, False)

    # -- CONNECTING -------------------------------------------------------------

    def _try_connect(self, c: Conn) -> None:
        """Connect to the next upstream not tried yet (round robin from the
        listener's turn), or close `c` (no_upstream) when none is left."""
        addrs = c.via.upstream_addrs
        while c.tries < len(addrs):
            fam, sa = addrs[c.up_index]
            c.tries += 1
            try:
                u = socket.socket(fam, socket.SOCK_STREAM)
            except OSError as e:  # EMFILE, ENOBUFS: no upstream will do better now
                log.error("conn %d: cannot create an upstream socket: %s", c.id, e)
                self._close(c, "no_upstream", "no socket")
                return
            u.setblocking(False)
            u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.connect_started = now = time.monotonic()
            rc = u.connect_ex(sa)
            if rc in (0, errno.EINPROGRESS):
                # Done at once (0) too: the socket is writable at once, and
                # a CONNECTING upstream is always in the selector.
                c.upstream = u
                self.sel.register(u, selectors.EVENT_WRITE, partial(self._connected, c))
                self._at(now + self.cfg.connect_timeout, self._connect_due, c)
                return
            u.close()
            self._connect_failed(c, os.strerror(rc))
        log.warning("conn %d: no upstream reachable, resetting the client", c.id)
        self._close(c, "no_upstream", "no upstream")

    def _connect_failed(self, c: Conn, why: str) -> None:
        name = fmt_addr(c.via.conf.upstreams[c.up_index])
        self.m.connect_failures.labels(name).inc()
        log.warning("conn %d: upstream %s: %s", c.id, name, why)
        c.up_index = (c.up_index + 1) % len(c.via.upstream_addrs)

    def _drop_upstream(self, c: Conn) -> None:
        self.sel.unregister(c.upstream)
        c.upstream.close()
        c.upstream = None

    def _connected(self, c: Conn) -> None:
        """The upstream socket is writable: connected, or failed."""
        if c.state is not CONNECTING:   # closed earlier in this same round
            return
        err = c.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop_upstream(c)
            self._connect_failed(c, os.strerror(err))
            self._try_connect(c)
            return
        self._established(c)

    def _connect_due(self, c: Conn, _now: float) -> None:
        """--connect-timeout has passed since the connect started."""
        if _writable(c.upstream):
            # Connected while this loop was busy elsewhere: the event is
            # still in the selector's queue.
            self._connected(c)
            return
        self._drop_upstream(c)
        self._connect_failed(c, "connect timed out")
        self._try_connect(c)

    def _established(self, c: Conn) -> None:
        """The upstream is connected: the PROXY header, if asked for, then
        CONNECTING -> RELAYING, or -> SPLICED at once with --splice-after
        0. A header that cannot be sent closes `c` (splice_refused, as
        a refused splice: the stream to the upstream would be corrupt)."""
        c.connect_secs = time.monotonic() - c.connect_started
        self.m.connect_time.observe(c.connect_secs)
        if c.via.conf.send_proxy:
            try:
                self._send_proxy_header(c)
            except OSError as e:
                log.warning("conn %d: cannot send the PROXY protocol header: %s", c.id, e)
                gone = _END_CLIENT_ABORT if _was_reset(c.client) else "splice_refused"
                self._close(c, gone, "no PROXY header")
                return
        if self.cfg.splice_after:
            self._relay(c)
        else:
            self.sel.unregister(c.upstream)
            self._splice(c)

    def _splice(self, c: Conn) -> None:
        """CONNECTING or RELAYING -> SPLICED: both directions in the
        engine (neither socket is in the selector any more, nothing relayed
        is pending); a refusal closes `c` (splice_refused)."""
        self.engine_due = True   # reap after this pass, whatever the splice did
        try:
            # No idle= here: an idle timeout per direction would end a
            # quiet upload under a streaming download; --idle is kept per
            # connection (_idle_due). The engine shares the two sockets,
            # which stay open until both splices are reaped (_release).
            up, down = c.splices = self.engine.splice_pair(c.client, c.upstream, label=c.listener)
        except Exception as e:
            # Usually ENOTCONN or EPIPE: the client went away while we
            # connected. But a refusal for any other reason (EINVAL, ENOSPC,
            # EBUSY, ...) would go on breaking every connection, so each
            # one is a warning, and an unexpected exception an error.
            if isinstance(e, OSError):
                log.warning("conn %d: the engine refused to splice: %s", c.id, e)
            else:
                log.exception("conn %d: splice failed", c.id)
            gone = _END_CLIENT_ABORT if _was_reset(c.client) else "splice_refused"
            self._close(c, gone, "splice refused")
            return
        splices = self.splices
        splices[up] = (c, UP)
        splices[down] = (c, DOWN)
        c.pending = 2
        relaying, c.state = c.state is RELAYING, SPLICED
        idle = c.via.conf.idle
        if idle is None:
            c.due = 0.0     # the connect deadline's (or relay look's) entry is stale now
        else:
            now = time.monotonic()
            # --idle counts from the last byte, relayed or spliced: a relay
            # that moved none since its last look keeps its quiet_since.
            if not relaying or c.relayed_up + c.relayed_down != c.seen:
                c.quiet_since = now
            c.seen = 0      # from now on: the splices' bytes
            self._at(now + idle / IDLE_SLICES, self._idle_due, c)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %d spliced to %s (%d bytes relayed before)", c.id,
                      fmt_addr(c.upstream.getpeername()), c.relayed_up + c.relayed_down)

    # -- RELAYING: the loop copies, until the connection shows bulk ------------

    def _relay(self, c: Conn) -> None:
        """CONNECTING -> RELAYING: each socket in the selector for reading
        its direction (the upstream's entry, so far for the connect, is
        changed, not made anew); one deadline for --splice-after and --idle."""
        c.state = RELAYING
        c.relayed = True
        c.client_ev = c.upstream_ev = _READ
        self.sel.modify(c.upstream, _READ, partial(self._relay_io, c, DOWN))
        self.sel.register(c.client, _READ, partial(self._relay_io, c, UP))
        now = time.monotonic()
        c.splice_at = now + self.cfg.splice_after
        c.quiet_since = now
        idle = c.via.conf.idle
        self._at(c.splice_at if idle is None else min(c.splice_at, now + idle / IDLE_SLICES),
                 self._relay_due, c)

    def _relay_io(self, c: Conn, d: str) -> None:
        """A socket of a RELAYING connection is ready: the source of
        direction `d` (client: UP, upstream: DOWN) to read, or the drain of
        the other direction to write."""
        if c.state is not RELAYING:   # spliced or closed earlier in this same round
            return
        ev = self.ev
        if ev & _WRITE:
            other = DOWN if d is UP else UP
            if (c.pend_down if other is DOWN else c.pend_up) and not self._flush(c, other):
                return
        if ev & _READ and c.state is RELAYING:
            self._pump(c, d)

    def _pump(self, c: Conn, d: str) -> None:
        """One recv from the source of `d`, sent on to its drain."""
        if d is UP:
            source, drain = c.client, c.upstream
            if c.up_end or c.pend_up:     # ended, or waiting for its drain
                return
        else:
            source, drain = c.upstream, c.client
            if c.down_end or c.pend_down:
                return
        try:
            data = source.recv(RELAY_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._relay_failed(c, d, e)
            return
        n = len(data)
        if not n:
            self._relay_eof(c, d, source, drain)
            return
        try:
            sent = drain.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self._relay_failed(c, d, e)
            return
        self._relayed(c, d, sent)
        if sent < n:
            # The drain is full: bulk. Read no more of `d` until it takes
            # the rest; the drain is watched for writing.
            c.bulk = True
            if d is UP:
                c.pend_up = data[sent:]
            else:
                c.pend_down = data[sent:]
            self._watch(c)
            return
        if n == RELAY_CHUNK or c.relayed_up + c.relayed_down >= RELAY_BULK:
            c.bulk = True
        if c.bulk and not c.pend_up and not c.pend_down and c.half is None:
            self._unwatch_and_splice(c)

    def _flush(self, c: Conn, d: str) -> bool:
        """Send what is pending of direction `d` to its drain. Whether the
        connection is still RELAYING (a failed send closes it)."""
        drain, pend = (c.upstream, c.pend_up) if d is UP else (c.client, c.pend_down)
        try:
            sent = drain.send(pend)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            self._relay_failed(c, d, e)
            return False
        self._relayed(c, d, sent)
        rest = pend[sent:]
        if d is UP:
            c.pend_up = rest
        else:
            c.pend_down = rest
        if rest:
            return True
        if c.bulk and not c.pend_up and not c.pend_down and c.half is None:
            self._unwatch_and_splice(c)
            return False
        self._watch(c)
        return True

    def _relayed(self, c: Conn, d: str, n: int) -> None:
        if d is UP:
            c.relayed_up += n
        else:
            c.relayed_down += n
        self.m.bytes_done[d] += n

    def _watch(self, c: Conn) -> None:
        """Each socket's selector events, from what its two roles need:
        reading (its direction not ended, nothing of it pending) and
        writing (a send to it pending). Only changes make a syscall."""
        cev = ((0 if c.up_end or c.pend_up else _READ) | (_WRITE if c.pend_down else 0))
        uev = ((0 if c.down_end or c.pend_down else _READ) | (_WRITE if c.pend_up else 0))
        if cev != c.client_ev:
            self._set_events(c, c.client, c.client_ev, cev, UP)
            c.client_ev = cev
        if uev != c.upstream_ev:
            self._set_events(c, c.upstream, c.upstream_ev, uev, DOWN)
            c.upstream_ev = uev

    def _set_events(self, c: Conn, s: socket.socket, old: int, new: int, d: str) -> None:
        """Socket `s` (the source of `d`) from events `old` to `new`."""
        sel = self.sel
        if not old:
            sel.register(s, new, partial(self._relay_io, c, d))
        elif not new:
            sel.unregister(s)
        else:
            sel.modify(s, new, sel.get_key(s).data)

    def _unwatch(self, c: Conn) -> None:
        """Take both sockets of `c` out of the selector."""
        if c.client_ev:
            self.sel.unregister(c.client)
            c.client_ev = 0
        if c.upstream_ev:
            self.sel.unregister(c.upstream)
            c.upstream_ev = 0

    def _unwatch_and_splice(self, c: Conn) -> None:
        """RELAYING -> SPLICED: both directions open, nothing pending."""
        self._unwatch(c)
        self._splice(c)

    def _relay_eof(self, c: Conn, d: str, source: socket.socket, drain: socket.socket) -> None:
        """EOF on the source of `d` (nothing of `d` pending): passed on as
        a FIN, as a splice's clean end is (_reap), unless the source was in
        fact reset (_reset_not_fin)."""
        if c.half is None and _reset_not_fin(source):
            log.debug("conn %d: %s relay read EOF, but its source was reset", c.id, d)
            self._relay_failed(c, d, ConnectionResetError(errno.ECONNRESET, "reset"))
            return
        log.debug("conn %d: %s relay read EOF: passing the FIN on", c.id, d)
        if d is UP:
            c.up_end = "EOF"
        else:
            c.down_end = "EOF"
        self.m.splice_ended("EOF")
        if self._pass_fin(c, d, drain):
            self._watch(c)

    def _pass_fin(self, c: Conn, d: str, drain: socket.socket) -> bool:
        """Direction `d` ended cleanly (relayed or spliced): its FIN goes
        on to `drain`; the second one closes `c` normally. True while the
        other direction goes on."""
        try:
            drain.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if c.half is None:
            c.half = d
            return True
        self._close(c, _END_CLOSED, "both FINs passed on")
        return False

    def _relay_failed(self, c: Conn, d: str, e: OSError) -> None:
        """A recv from the source of `d` or a send to its drain failed
        (ECONNRESET, EPIPE, ...): the stream is cut, both sides are reset,
        as for a splice that ends with an error (_reap)."""
        reason = reason_name(e.errno) if e.errno else "error"
        if d is UP:
            c.up_end = reason
        else:
            c.down_end = reason
        self.m.splice_ended(reason)
        end = (_END_CLIENT_ABORT if _was_reset(c.client) else
               _END_UPSTREAM_ABORT if _was_reset(c.upstream) else "error")
        log.debug("conn %d: %s relay failed with %s: resetting both sides", c.id, d, reason)
        self._close(c, end, "a relay failed")

    def _relay_due(self, c: Conn, now: float) -> None:
        """The one deadline of a RELAYING connection: --splice-after (splice
        now if both directions are open and nothing is pending, else once
        it is flushed) and --idle (as _idle_due, on the relayed bytes)."""
        if c.half is None and not c.bulk and now >= c.splice_at:
            c.bulk = True
            if not c.pend_up and not c.pend_down:
                self._unwatch_and_splice(c)
                return
        idle = c.via.conf.idle
        due = math.inf
        if idle is not None:
            total = c.relayed_up + c.relayed_down
            if total != c.seen:
                c.seen, c.quiet_since = total, now
                due = now + idle / IDLE_SLICES
            elif now - c.quiet_since >= idle:
                log.debug("conn %d: no byte either way for %.1f s (--idle %g): resetting",
                          c.id, now - c.quiet_since, idle)
                self._close(c, "idle", "idle")
                return
            else:
                due = c.quiet_since + idle
        if c.half is None and not c.bulk:
            due = min(due, c.splice_at)
        if due < math.inf:
            self._at(due, self._relay_due, c)
        else:
            c.due = 0.0

    @staticmethod
    def _send_proxy_header(c: Conn) -> None:
        """The PROXY protocol header, first on the upstream, before the
        splice moves a byte of the client's. The connect has just
        completed: the send buffer is empty and takes the header (at most
        108 bytes) whole; a short send would corrupt the stream, so it
        is an error like a refused splice."""
        hdr = proxyproto.header(c.via.conf.send_proxy, c.peer, c.client.getsockname())
        if c.upstream.send(hdr) != len(hdr):
            raise OSError(errno.EAGAIN, "the PROXY protocol header did not fit the send buffer")

    # -- SPLICED: --idle, looked at lazily --------------------------------------

    def _idle_due(self, c: Conn, now: float) -> None:
        """Reset `c` if it moved no byte either way for --idle.

        Only connections whose look is due are looked at (two byte counts
        each). One that moved since the last look is looked at again a
        slice of --idle later; one that did not, when --idle will have
        passed since it last moved. So the timeout fires between --idle and
        --idle * (1 + 1/IDLE_SLICES) after the last byte, a busy connection
        costs IDLE_SLICES looks per --idle, and a quiet one two looks.
        """
        idle = c.via.conf.idle
        total = sum(sp.bytes for sp in c.splices)
        if total != c.seen:
            c.seen, c.quiet_since = total, now
            self._at(now + idle / IDLE_SLICES, self._idle_due, c)
        elif now - c.quiet_since >= idle:
            log.debug("conn %d: no byte either way for %.1f s (--idle %g): resetting",
                      c.id, now - c.quiet_since, idle)
            self._close(c, "idle", "idle")
        else:
            self._at(c.quiet_since + idle, self._idle_due, c)

    # -- the end of a connection ----------------------------------------------

    def _reap(self) -> None:
        """The engine's fd is readable: splices have ended."""
        m = self.m
        for sp in self.engine.reap():
            entry = self.splices.pop(sp, None)
            if entry is None:
                continue
            c, d = entry
            err = sp.error
            m.bytes_done[d] += sp.bytes
            m.kernel_done[d] += sp.kernel_bytes
            reason = reason_name(err)
            m.splice_ended(reason)
            c.pending -= 1
            if c.state is not SPLICED:   # CLOSING: the proxy has reset it
                if not c.pending:
                    self._release(c)
                continue
            source, drain = (c.client, c.upstream) if d is UP else (c.upstream, c.client)
            if err == 0 and c.half is None and _reset_not_fin(source):
                log.debug("conn %d: %s splice ended with EOF, but its source was reset", c.id, d)
                err, reason = errno.ECONNRESET, "ECONNRESET"
            if d is UP:
                c.up_end = reason
            else:
                c.down_end = reason
            if err == 0:
                # A clean end, and only that, is passed on as a FIN.
                log.debug("conn %d: %s splice ended with EOF: passing the FIN on", c.id, d)
                self._pass_fin(c, d, drain)
            else:
                # The source was reset (ECONNRESET), the drain failed
                # (EPIPE), ...: the stream is cut, and both peers must
                # learn that it is, not see a FIN that says it is whole.
                # Whose socket the kernel closed says who aborted.
                end = (_END_CLIENT_ABORT if _was_reset(c.client) else
                       _END_UPSTREAM_ABORT if _was_reset(c.upstream) else "error")
                log.debug("conn %d: %s splice ended with %s: resetting both sides", c.id, d, reason)
                self._close(c, end, "a splice failed")

    def _close(self, c: Conn, end: str, why: str) -> None:
        """The one way a connection ends: CONNECTING, RELAYING or SPLICED
        -> CLOSING, or on to DONE (`_release`) when no splice of it is left
        to reap (always so for CONNECTING and RELAYING).

        `end` is why (the log line's end=): _END_CLOSED once both
        directions have passed their FIN on, and then the sockets are
        closed normally; else a reset on both sides (see the module
        docstring), counted as a peer's abort (_END_CLIENT_ABORT,
        _END_UPSTREAM_ABORT) or in sosplice_resets_total by its reason.
        `why` is for the debug line.
        """
        state = c.state
        if state is CLOSING or state is DONE:
            return
        c.end = end
        c.due = 0.0     # its deadline, if any, is stale now
        c.duration = time.monotonic() - c.accepted
        self.m.duration.observe(c.duration)
        del self.conns[c.id]
        if state is RELAYING:
            self._unwatch(c)
            c.pend_up = c.pend_down = b""   # dropped with the reset
        elif state is CONNECTING and c.upstream is not None \
                and c.upstream.fileno() in self.sel.get_map():
            self.sel.unregister(c.upstream)
        if end != _END_CLOSED:
            if end == _END_CLIENT_ABORT:
                self.m.client_aborts.inc()
            elif end == _END_UPSTREAM_ABORT:
                self.m.upstream_aborts.inc()
            else:
                self.m.resets.labels(end).inc()
            _reset(c.client)
            if c.upstream is not None:
                _reset(c.upstream)
        log.debug("conn %d closed: %s (end=%s)", c.id, why, end)
        if c.pending:
            c.state = CLOSING
            self.held += 1
        else:
            self._release(c)
        self.live[c.listener] -= 1
        if self.fd_full and self._fds_for_one_more():
            self.fd_full = False
            log.warning("file descriptors free again: accepting")
            for lst in self.listeners.values():
                self._resume_accepting(lst)
            return
        lst = self.listeners.get(c.via.conf.bind)
        if lst is not None:
            self._resume_accepting(lst)

    def _release(self, c: Conn) -> None:
        """-> DONE, once no splice of `c` is left to reap: close its
        sockets (the engine no longer uses them), write its line."""
        if c.state is CLOSING:
            self.held -= 1
        c.state = DONE
        c.client.close()
        if c.upstream is not None:
            c.upstream.close()
        if log.isEnabledFor(logging.INFO):
            self._log_end(c)

    def _log_end(self, c: Conn) -> None:
        """The connection's one line, at info, once it is closed and its
        splices have ended (so that the byte counts are final).

        logfmt, keys in this order (docs/observing.md): conn client listener
        upstream connect duration up_bytes down_bytes kernel up_end
        down_end end. Bytes are exact, relayed and spliced; kernel is the
        share of both directions moved without a copy through the proxy,
        floored (100%: every byte; relayed bytes are copies). A direction
        still running when the proxy closed the connection was `cut`; one
        never started is `-`.
        """
        moved_up, moved_down = c.relayed_up, c.relayed_down
        if c.splices:
            up, down = c.splices
            moved_up += up.bytes
            moved_down += down.bytes
            kernel = up.kernel_bytes + down.kernel_bytes
            cut = "cut"
        else:
            kernel = 0
            cut = "cut" if c.relayed else "-"
        total = moved_up + moved_down
        log.info("conn=%d client=%s listener=%s upstream=%s connect=%s duration=%.3fs "
                 "up_bytes=%d down_bytes=%d kernel=%s up_end=%s down_end=%s end=%s",
                 c.id, fmt_peer(c.peer), c.listener or "-",
                 "-" if c.connect_secs is None else fmt_addr(c.via.conf.upstreams[c.up_index]),
                 "-" if c.connect_secs is None else f"{c.connect_secs:.6f}s", c.duration,
                 moved_up, moved_down, f"{kernel * 100 // total}%" if total else "-",
                 c.up_end or cut, c.down_end or cut, c.end)

    # -- metrics over HTTP, in the same loop ---------------------------------

    def _metrics_accept(self) -> None:
        try:
            s, _ = self.metrics_sock.accept()
        except OSError:
            return
        s.setblocking(False)
        self.scrapes.add(s)
        self.sel.register(s, selectors.EVENT_READ, partial(self._metrics_serve, s, bytearray()))

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
        self.scrapes.discard(s)
        try:
            if buf.startswith(b"GET "):
                from .metrics import CONTENT_TYPE
                body = self.m.render()
                head = (b"HTTP/1.0 200 OK\r\nContent-Type: %s\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                        % (CONTENT_TYPE.encode(), len(body)))
            else:
                body = b"only GET\n"
                head = b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 9\r\n\r\n"
            s.settimeout(1.0)
            s.sendall(head + body)
        except OSError:
            pass
        finally:
            s.close()

    def _live_counts(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """For the metrics at each scrape: connections open, and the bytes
        (all, in-kernel) that live splices have moved so far, by direction.
        (Relayed bytes are in `m.bytes_done` as soon as they are sent.)"""
        live, kernel = {UP: 0, DOWN: 0}, {UP: 0, DOWN: 0}
        for sp, (_, d) in list(self.splices.items()):
            live[d] += sp.bytes
            kernel[d] += sp.kernel_bytes
        return len(self.conns), live, kernel

    # -- the end -------------------------------------------------------------

    def _shutdown(self) -> None:
        for c in list(self.conns.values()):   # only after an exception in the loop
            self._close(c, "exit", "exit")
        for lst in self.listeners.values():
            self._close_listener(lst)
        for s in self.scrapes:
            s.close()
        self.scrapes.clear()
        if self.metrics_sock:
            self.metrics_sock.close()
            self.metrics_sock = None
        self.sel.close()
        if self.engine is not None:
            self.engine.close()
            # CLOSING connections, whose splices were not reaped yet: their
            # lines, with the counts that closing the engine made final.
            for c in {c for c, _ in self.splices.values()}:
                if c.state is CLOSING:
                    self._release(c)
            self.splices.clear()
            self.engine = None
        self._wake_r.close()
        self._wake_w.close()


# The command line's options that a config file sets instead.
FILE_SETS = {"idle": "--idle", "max_conns": "--max-conns", "backlog_cap": "--backlog-cap",
             "metrics": "--metrics", "grace": "--grace", "connect_timeout": "--connect-timeout",
             "backend": "--backend", "workers": "--workers", "splice_after": "--splice-after"}


def cli_config(args) -> tuple[Config, str | None]:
    """The Config the command line asks for, and the file it came from.

    Either LISTEN and UPSTREAM with options, or --config FILE (which sets
    all of those itself). Raises UsageError, or config.ConfigError.
    """
    if args.config is None:
        if args.check:
            raise UsageError("--check checks a --config FILE")
        if args.listen is None or not args.upstream:
            raise UsageError("LISTEN and at least one UPSTREAM are needed (or --config FILE)")
        given = {k: getattr(args, k) for k in FILE_SETS if getattr(args, k) is not None}
        # main's argument types parsed and checked every value;
        # Options.config() checks them again for callers that build Options.
        opts = Options(listen=args.listen, upstreams=args.upstream,
                       check_upstreams=not args.no_check, **given)
        return opts.config(), None
    if args.listen is not None:
        raise UsageError("give LISTEN and UPSTREAM or --config FILE, not both")
    for key, option in FILE_SETS.items():
        if getattr(args, key) is not None:
            raise UsageError(f"{option} is set in the --config file ({key}), not on the "
                             "command line")
    from . import config
    cfg = replace(config.load(args.config), check_upstreams=not args.no_check)
    return cfg, args.config


def run_cli(args) -> int:
    """`splicectl proxy` from parsed arguments. Raises UsageError."""
    import signal

    cfg, path = cli_config(args)
    if args.check:
        print(f"{path}: ok, {len(cfg.listeners)} listener(s): "
              + "; ".join(f"{fmt_addr(lc.bind)} -> " + ", ".join(fmt_addr(u) for u in lc.upstreams)
                          for lc in cfg.listeners))
        return 0
    reloader = None
    if path is not None:
        from . import config
        reloader = lambda: replace(config.load(path), check_upstreams=False)  # noqa: E731
    if cfg.workers > 1:
        from . import workers
        return workers.serve(cfg, reloader)
    proxy = Proxy(cfg, reloader=reloader)
    # Before start(), which can take seconds (bpf compiles): a SIGHUP then
    # (systemctl reload) is queued for the loop instead of killing us.
    signal.signal(signal.SIGHUP, lambda *_: proxy.reload())
    try:
        proxy.start()
    except PermissionError as e:
        raise SystemExit(f"splicectl proxy: {e.strerror or e}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proxy.stop())
    # One line, first: where, and on which backend and why (service logs
    # and scripts read it; the tests parse the first address).
    msg = f"listening on {proxy.describe()}"
    if proxy.metrics_address():
        msg += f", metrics on http://{fmt_addr(proxy.metrics_address())}/metrics"
    msg += f", backend {proxy.backend_text()}"
    print(msg, flush=True)
    return proxy.run()
