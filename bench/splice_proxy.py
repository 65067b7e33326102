"""A minimal sosplice TCP proxy for the benchmarks.

    python bench/splice_proxy.py LISTEN_PORT UPSTREAM_PORT [UPSTREAM_HOST]

One thread, one `selectors` loop, one `sosplice.Splicer`: accept, connect
to the upstream, splice both ways, and learn of each direction's end
through `Splicer.fileno()` / `reap()`. A direction that dissolves with 0
(EOF) shuts down the write side of its drain; when both directions are done
both sockets are closed. Any other error closes the connection.

Raises its own RLIMIT_NOFILE (a spliced connection holds two sockets, plus
a pipe per direction on the worker backend) and listens with a backlog of
4096, so it can hold the memory benchmark's 10,000 idle connections.

Prints "READY <port>" on stdout once it listens. SIGTERM/SIGINT close the
engine cleanly (so the BPF program is detached and its snapshot removed).
"""
from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loader"))
import sosplice  # noqa: E402


class Stop(Exception):
    pass


def _stop(*_: object) -> None:
    raise Stop


def main() -> int:
    listen_port = int(sys.argv[1])
    up_port = int(sys.argv[2])
    up_host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    want = 200_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:   # root may raise the hard limit too; else go as high as allowed
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    # The engine first, then the listener: building a bpf engine compiles
    # its programs (seconds under load), and bench/run.py starts its clients
    # as soon as the port listens. Listening first made the first clients
    # wait out the compile and time out, on bpf only.
    try:
        eng = sosplice.Splicer()
    except Stop:
        return 0
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen_port))
    ls.listen(4096)
    ls.setblocking(False)

    # splice handle -> (its connection, drain of this direction). A
    # connection is its own dict, never looked up by fd number: the
    # client's fd number is reused by the next accept as soon as a
    # connection is closed, and the other direction's end, reaped later,
    # would then shut down or close that new connection.
    where: dict[object, tuple[dict, socket.socket]] = {}
    conns: dict[int, dict] = {}
    sel = selectors.DefaultSelector()
    try:
        with eng:
            sel.register(ls, selectors.EVENT_READ, "accept")
            sel.register(eng.fileno(), selectors.EVENT_READ, "reap")
            print(f"READY {listen_port}", flush=True)

            def close_conn(key: int) -> None:
                c = conns.pop(key, None)
                if c is None:
                    return
                for s in (c["client"], c["up"]):
                    try:
                        s.close()
                    except OSError:
                        pass

            while True:
                for k, _ in sel.select():
                    if k.data == "accept":
                        while True:
                            try:
                                cs, _addr = ls.accept()
                            except BlockingIOError:
                                break
                            except OSError as e:   # EMFILE: leave it queued
                                print(f"accept failed: {e}", file=sys.stderr, flush=True)
                                break
                            cs.setblocking(True)
                            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                            try:
                                up.connect((up_host, up_port))
                            except OSError:
                                cs.close()
                                up.close()
                                continue
                            for s in (cs, up):
                                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            key = id(cs)
                            c = conns[key] = {"client": cs, "up": up, "done": 0}
                            try:
                                a = eng.splice(cs, up)
                                b = eng.splice(up, cs)
                            except OSError as e:
                                print(f"splice failed: {e}", file=sys.stderr, flush=True)
                                close_conn(key)
                                continue
                            where[a] = (c, up)
                            where[b] = (c, cs)
                    else:
                        for sp in eng.reap():
                            c, drain = where.pop(sp, (None, None))
                            if c is None or conns.get(id(c["client"])) is not c:
                                continue  # not ours, or its connection is closed
                            key = id(c["client"])
                            if sp.error == 0:
                                try:
                                    drain.shutdown(socket.SHUT_WR)
                                except OSError:
                                    pass
                                c["done"] += 1
                                if c["done"] == 2:
                                    close_conn(key)
                            else:
                                close_conn(key)
    except Stop:
        pass
    finally:
        for key in list(conns):
            c = conns.pop(key)
            for s in (c["client"], c["up"]):
                try:
                    s.close()
                except OSError:
                    pass
        ls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
