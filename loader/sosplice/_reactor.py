"""The loop both backends run: one epoll, an eventfd that wakes it, a timer
heap, and the sockets it watches on behalf of splices.

A socket can serve two splices of one reactor at once: the source of one
and the drain of the other, the two directions of a connection. Through
`Splicer.splice_pair` both get the one fd (no dup), and epoll holds an fd
once, so a socket has one registration whose mask is the union of its
roles' masks, and each event goes to the roles it concerns. A role is
only ever removed by the record that holds it: an fd whose number was
reused under a record that misbehaved (its socket closed by the
application while spliced) cannot lose another record's watch.

epoll reports an fd by its number, and the bpf backend polls outside its
lock while other threads watch and unwatch under it: a splice that ends
in the caller's thread closes its dups, and the next splice's dups take
the same numbers. So a batch of events can name an fd whose registration
was removed, and the number given to another socket, after epoll
collected them: the old socket's EPOLLRDHUP would reach the new one's
record as a false EOF, and the bpf backend would end that splice before
its bytes came (tests/test_transfer.py::
test_answers_and_fins_racing_the_splice lost whole answers so). dispatch()
therefore does not trust an event of an fd unregistered since the poll
began: it asks the socket now at that number for its state instead
(_level).
"""
from __future__ import annotations

import heapq
import os
import select
from typing import Any

SOURCE, DRAIN = 0, 1
# Reported whatever the mask says; EPOLLET is a mode, not an event.
_ALWAYS = select.EPOLLERR | select.EPOLLHUP
_MODE = select.EPOLLET


class Reactor:
    """epoll + wake-up + timers; the owner's thread alone polls it."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wake_fd, select.EPOLLIN)
        # fd -> [record as source, its mask, record as drain, its mask]
        self._ports: dict[int, list[Any]] = {}
        self._timers: list[tuple[int, int, Any]] = []   # (when ns, tiebreak, record)
        self._seq = 0
        # Polls begun, and for each fd number that was unregistered, the
        # count read just after: dispatch() compares the two. One entry
        # per fd number ever watched, so as small as the fd table.
        self._polls = 0
        self._removed: dict[int, int] = {}

    # -- sockets ------------------------------------------------------------

    def watch(self, fd: int, role: int, rec: Any, mask: int) -> None:
        """Watch `fd` for `rec` in `role` (SOURCE or DRAIN)."""
        port = self._ports.get(fd)
        if port is None:
            self._ports[fd] = port = [None, 0, None, 0]
            port[2 * role], port[2 * role + 1] = rec, mask
            self.ep.register(fd, mask)
            return
        assert port[2 * role] is None, "one splice per role per socket"
        before = port[1] | port[3]
        port[2 * role], port[2 * role + 1] = rec, mask
        if port[1] | port[3] != before:
            # (The same mask needs no syscall: a drain's 0 joining its
            # socket's source role, in splice_pair, changes nothing.)
            self.ep.modify(fd, port[1] | port[3])

    def modify(self, fd: int, role: int, rec: Any, mask: int) -> None:
        port = self._ports.get(fd)
        if port is None or port[2 * role] is not rec:
            return
        port[2 * role + 1] = mask
        try:
            self.ep.modify(fd, port[1] | port[3])
        except OSError:
            pass  # closed under us (see the module docstring)

    def unwatch(self, fd: int, role: int, rec: Any) -> None:
        """Stop watching `fd` for `rec` (before our dup of it is closed)."""
        port = self._ports.get(fd)
        if port is None or port[2 * role] is not rec:
            return
        before = port[1] | port[3]
        port[2 * role], port[2 * role + 1] = None, 0
        if port[0] is None and port[2] is None:
            del self._ports[fd]
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            # Read after the unregister: one that came after a poll
            # collected its events reads that poll's count or a later one.
            self._removed[fd] = self._polls
            return
        if port[1] | port[3] == before:
            return
        try:
            self.ep.modify(fd, port[1] | port[3])
        except OSError:
            pass

    def poll(self, timeout: float | None) -> tuple[int, list[tuple[int, int]]]:
        """Wait up to `timeout` s (None: for ever) for events: the poll's
        count and [(fd, events)], for dispatch().

        Raises OSError/ValueError once the epoll is closed."""
        self._polls = n = self._polls + 1   # before epoll_wait collects anything
        return n, self.ep.poll(-1 if timeout is None else timeout)

    def dispatch(self, polled: tuple[int, list[tuple[int, int]]]
                 ) -> tuple[bool, list[tuple[Any, int, int]]]:
        """(woken, [(record, role, events)]) for what poll() returned; fds
        that are not sockets of ours come back as (None, fd, events).

        Called under the same lock as watch/modify/unwatch: a record is
        handed an event only while it holds its role, and only an event
        of its own socket. An fd unregistered since the poll began may
        name another socket now (see the module docstring): its events
        may be the old socket's, and are replaced by the state of the
        socket the number names now. Never dropped outright: the new
        registration's first edge (a source already at EOF) may be in
        this batch too, and edge-triggered, it would not come again.
        """
        n, events = polled
        woken = False
        out = []
        for fd, ev in events:
            if fd == self.wake_fd:
                try:
                    os.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
                woken = True
                continue
            port = self._ports.get(fd)
            if port is None:
                out.append((None, fd, ev))
                continue
            if self._removed.get(fd, -1) >= n:
                ev = self._level(fd, port[1] | port[3])
            for role in (SOURCE, DRAIN):
                rec = port[2 * role]
                if rec is not None and ev & (port[2 * role + 1] | _ALWAYS) & ~_MODE:
                    out.append((rec, role, ev))
        return woken, out

    @staticmethod
    def _level(fd: int, mask: int) -> int:
        """What `fd` reports now for `mask` (level, not edge): one poll(2)."""
        p = select.poll()
        p.register(fd, mask & ~_MODE)   # POLL* and EPOLL* bits are the same
        got = p.poll(0)
        return got[0][1] if got else 0

    def kick(self) -> None:
        """Wake the loop from any thread."""
        os.eventfd_write(self.wake_fd, 1)

    # -- timers -------------------------------------------------------------

    def at(self, when_ns: int, rec: Any) -> None:
        """Hand `rec` back from `due()` once time.monotonic_ns() >= when_ns."""
        self._seq += 1
        heapq.heappush(self._timers, (when_ns, self._seq, rec))

    def next_timer(self) -> int | None:
        return self._timers[0][0] if self._timers else None

    def due(self, now_ns: int) -> list[Any]:
        out = []
        while self._timers and self._timers[0][0] <= now_ns:
            out.append(heapq.heappop(self._timers)[2])
        return out

    def close(self) -> None:
        self.ep.close()
        os.close(self.wake_fd)
