"""Single-threaded epoll echo server for the setup-rate and memory benchmarks.

    python bench/conn_echo.py PORT

Unlike bench/echo_server.py (one thread per connection, used for latency)
this one holds tens of thousands of connections cheaply: one epoll loop,
non-blocking sockets, recv(64 KiB) / send back, close on EOF or error.
Raises its own RLIMIT_NOFILE and listens with a backlog of 4096. Prints
"READY <port>" once listening; exits on SIGTERM/SIGINT.
"""
from __future__ import annotations

import resource
import select
import signal
import socket
import sys


def raise_nofile(want: int = 200_000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for lim in ((want, max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            return
        except (ValueError, OSError):
            continue


def main() -> None:
    port = int(sys.argv[1])
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    ls.setblocking(False)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    lfd = ls.fileno()
    print(f"READY {port}", flush=True)

    def drop(fd: int) -> None:
        s = conns.pop(fd, None)
        if s is not None:
            try:
                ep.unregister(fd)
            except OSError:
                pass
            s.close()

    try:
        while True:
            for fd, ev in ep.poll(1.0, 512):
                if fd == lfd:
                    for _ in range(256):
                        try:
                            c, _ = ls.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:   # EMFILE etc.: leave it in the backlog
                            break
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conns[c.fileno()] = c
                        ep.register(c.fileno(), select.EPOLLIN)
                    continue
                s = conns.get(fd)
                if s is None:
                    continue
                try:
                    d = s.recv(65536)
                    if not d:
                        drop(fd)
                        continue
                    # small messages: the send buffer always has room; a
                    # short send would only drop echo bytes, never hang
                    s.send(d)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    drop(fd)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
