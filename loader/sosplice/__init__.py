"""sosplice: SO_SPLICE for Linux.

Hand it two connected TCP sockets and every byte that arrives on the first
is sent on the second inside the kernel (eBPF sockmap), with OpenBSD's
SO_SPLICE semantics: one-way splices, an exact byte limit, an idle timeout,
a byte count, lossless unsplicing, and a reason when a splice ends.

    import sosplice
    sp = sosplice.splice(client, upstream)      # client -> upstream
    sosplice.splice(upstream, client)           # and back
    sp.wait()                                    # 0 at EOF, else an errno

The module-level functions share one `Splicer` per process, created on
first use; create your own `Splicer` for an explicit lifetime.
"""
from __future__ import annotations

import atexit
import socket
import threading

from . import snapshot
from ._bpf import MIN_KERNEL
from ._engine import DEFAULT_BACKLOG_CAP, Life, Splicer
from .snapshot import SpliceInfo, reason_name
from ._splice import Splice

__version__ = "0.1.0"

__all__ = [
    "__version__", "Splice", "SpliceInfo", "Splicer", "splice", "splice_pair", "unsplice",
    "getsplice", "geterror", "default_engine", "reason_name", "snapshot",
    "DEFAULT_BACKLOG_CAP", "MIN_KERNEL",
]

for _name in ("Splice", "SpliceInfo", "Splicer"):
    globals()[_name].__module__ = "sosplice"

_default: Splicer | None = None
_default_lock = threading.Lock()


def default_engine() -> Splicer:
    """The process-wide `Splicer` used by the module-level functions.

    Its backend comes from $SOSPLICE_BACKEND ("bpf", "worker" or "auto",
    the default): see `Splicer`.
    """
    global _default
    with _default_lock:
        if _default is None or _default._life is Life.CLOSED:
            _default = Splicer()
            atexit.register(_default.close)
        return _default


Sock = socket.socket | int


def splice(source: Sock, drain: Sock, *, max: int = 0, idle: float | None = None,
           label: str = "") -> Splice:
    """Send every byte arriving on `source` to `drain`, in the kernel.

    Args:
        source, drain: connected TCP sockets (socket objects or fds), IPv4
            or IPv6 in any mix. Bytes already waiting on `source` move too.
        max: move exactly this many bytes, then dissolve with EFBIG; later
            bytes stay readable on `source`. 0: no limit.
        idle: dissolve with ETIMEDOUT after this many seconds without a
            byte moved. None: never.
        label: the application's name for the splice, shown in `stats()`
            and `splicectl ls/top` (splicectl proxy: its listener).

    The splice dissolves at EOF on `source` (error 0, once every byte has
    been taken by the drain; the drain is not shut down), when the drain
    fails (EPIPE), on `unsplice()`, or when the application closes either
    socket. Do not read from a spliced source or write to a spliced drain.

    Raises:
        OSError: EBADF, ENOTSOCK, EPROTONOSUPPORT, ENOTCONN, EOPNOTSUPP,
            EINVAL, EBUSY, ELOOP, EPERM; the message says what to do.
        TypeError: a socket, `max` or `idle` of the wrong type.
    """
    return default_engine().splice(source, drain, max=max, idle=idle, label=label)


def splice_pair(a: socket.socket, b: socket.socket, *, idle: float | None = None,
                label: str = "") -> tuple[Splice, Splice]:
    """Splice `a` into `b` and `b` into `a` in one call, sharing the sockets.

    The form for a proxy: each direction is a splice as `splice()` makes
    it (same ends, same errors, `idle` per direction), but the engine
    uses your two sockets themselves, not duplicates of them: a
    connection costs two fds in all instead of six, the sockets are
    checked once, and nothing watches for you closing them. In exchange:

    - Keep both sockets open until both splices have ended (`wait()`,
      `reap()`, `await`). To end them early, `unsplice()` either, or
      abort the connection (`connect(AF_UNSPEC)`, or `shutdown()`): both
      splices then end with the error. A socket closed while spliced
      loses what was in flight through it.
    - Both sockets are made non-blocking.
    - Passing the FIN on (shutdown(SHUT_WR) on the drain at a direction's
      EOF) and closing the sockets stay yours, as with `splice()`.

    Returns (a -> b, b -> a). If the second direction is refused, the
    first is unspliced (losslessly) before the error is raised: neither
    socket is spliced then.

    Raises:
        TypeError: `a` or `b` is not a socket.socket.
        OSError: as `splice()`; EBUSY if either socket is already in a splice.
    """
    return default_engine().splice_pair(a, b, idle=idle, label=label)


def unsplice(source: Sock) -> int:
    """Dissolve the splice from `source` losslessly; return its byte count.

    Bytes already moved reach the drain first; bytes not moved stay readable
    on `source`. Raises OSError(EPROTO) if `source` is not spliced.
    """
    return default_engine().unsplice(source)


def getsplice(source: Sock) -> int:
    """Bytes moved by the current or last splice from `source` (0: never)."""
    return default_engine().getsplice(source)


def geterror(source: Sock) -> int:
    """The reason the last splice from `source` ended, once; then 0."""
    return default_engine().geterror(source)
