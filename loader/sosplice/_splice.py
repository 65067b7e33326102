"""One record per splice, and the handle the application holds.

Owner legend for every field of `SpliceRecord` and the backends' records
(`_sockmap.SockmapRecord`, `_worker.PipeRecord`; a test checks that each
field carries one of these tags):
  [I]  immutable: set by `Splicer.splice()` before the splice is published
  [C]  controller: written only under the engine lock by the transition
       functions (start, move, dissolve, finish)
  [K]  kernel: copied from the BPF `stats` map, which only the verdict writes
  [W]  worker: written only by the worker thread that owns the splice
"""
from __future__ import annotations

import enum
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, final

if TYPE_CHECKING:
    from ._engine import Splicer


# Longer than any real wait, shorter than threading.TIMEOUT_MAX.
_WAIT_FOREVER = 1e9


class State(enum.Enum):
    # Bytes flow (bpf: the verdict redirects, or passes while the
    # controller catches up; worker: splice(2) through the pipe).
    ACTIVE = "active"
    # Nothing new is taken from the source; waiting until the drain has taken
    # every byte counted in `bytes`. Nothing new is counted.
    DISSOLVING = "dissolving"
    # Flushed, reported, the engine holds no reference to either socket.
    DONE = "done"


@dataclass(eq=False, kw_only=True)
class SpliceRecord:
    """What every backend keeps per splice; each backend adds its fields."""

    handle: Splice                 # [I] what the application holds
    src: socket.socket             # [I] our dup of the source: it keeps
    dst: socket.socket             # [I] ... both sockets open until flushed
    src_cookie: int                # [I]
    dst_cookie: int                # [I]
    # The application's fd numbers and their inodes, to notice a close;
    # None for splice_pair(), whose sockets (`src` and `dst` themselves,
    # not dups) the application keeps open until the end.
    user_fds: tuple[int, int] | None  # [I]
    inodes: tuple[int, int] | None    # [I]
    max: int                       # [I] 0 = no limit
    idle_ns: int                   # [I] 0 = no idle timeout
    started_ns: int                # [I] time.monotonic_ns() at start
    addrs: tuple[tuple[Any, Any], tuple[Any, Any]]  # [I] (local, peer) of source, drain
    label: str = ""                # [I] the application's name for it (splice(label=))
    state: State = State.ACTIVE    # [C]
    error: int | None = None       # [C] reason, set once by dissolve()
    done_ns: int = 0               # [C] when it became DONE

    @property
    def borrowed(self) -> bool:
        """`src` and `dst` are the application's (splice_pair): never closed here."""
        return self.user_fds is None

    @property
    def bytes(self) -> int:
        """Bytes taken from the source so far."""
        raise NotImplementedError

    @property
    def throttled(self) -> bool:
        """Bytes are waiting for the drain (the slow path, or a full pipe)."""
        raise NotImplementedError

    @property
    def kernel_bytes(self) -> int:
        """Of `bytes`, those moved without a copy through this process."""
        raise NotImplementedError

    @property
    def last_active_ns(self) -> int:
        """When a byte last moved (or the start)."""
        raise NotImplementedError


@final
class Splice:
    """A one-way splice from a source socket to a drain socket.

    Returned by `sosplice.splice()` and `Splicer.splice()`. Every byte that
    arrives on the source is sent on the drain, in order, inside the kernel,
    until the splice dissolves: at EOF on the source (error 0), at its byte
    limit (EFBIG), after `idle` seconds without a byte (ETIMEDOUT), when the
    drain fails (EPIPE), or on `unsplice()` (0).
    """

    __slots__ = ("_engine", "_rec", "_done", "_waiters", "__weakref__")

    def __init__(self, engine: Splicer) -> None:
        self._engine = engine
        self._rec: SpliceRecord | None = None
        self._done = threading.Event()
        self._waiters: list[Callable[[], None]] = []

    @property
    def bytes(self) -> int:
        """Bytes moved so far (live while active, final once dissolved)."""
        return self._engine._bytes_of(self)

    @property
    def kernel_bytes(self) -> int:
        """Of `bytes`, those moved without a copy through this process."""
        return self._engine._bytes_of(self, kernel=True)

    @property
    def active(self) -> bool:
        """True until the splice has dissolved and flushed."""
        return not self._done.is_set()

    @property
    def error(self) -> int | None:
        """None while active; then 0 or the errno that ended the splice."""
        return self._rec.error if self._done.is_set() and self._rec else None

    def wait(self, timeout: float | None = None) -> int:
        """Block until dissolved and flushed; return `error`.

        Raises:
            TimeoutError: the splice is still active after `timeout` seconds.
        """
        if timeout is not None and timeout > _WAIT_FOREVER:
            timeout = None  # threading refuses timeouts past its limit
        if not self._engine._wait(self, timeout):
            raise TimeoutError(f"splice still active after {timeout} s")
        assert self._rec is not None and self._rec.error is not None
        return self._rec.error

    def unsplice(self) -> int:
        """Dissolve now, losslessly; return the final byte count.

        Raises:
            OSError(EPROTO): the splice has already dissolved.
        """
        return self._engine._unsplice_handle(self)

    def __await__(self) -> Generator[Any, None, int]:
        import asyncio  # here, not at the top: splicectl ls/top import sosplice
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(self.error or 0))

        self._engine._on_done(self, wake)
        return (yield from fut.__await__())

    def __repr__(self) -> str:
        r = self._rec
        where = f"{r.src_cookie:#x}->{r.dst_cookie:#x}" if r else "?"
        state = "active" if self.active else f"error={self.error}"
        return f"<Splice {where} bytes={self.bytes} {state}>"

