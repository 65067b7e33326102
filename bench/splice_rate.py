"""Splice setup rate through the Python API, for one backend.

    python bench/splice_rate.py BACKEND N [CAP_SECONDS]

Creates N proxy-like pairs of connected loopback TCP connections (2N
connections, 4N sockets; N is lowered to fit RLIMIT_NOFILE, counting the
worker backend's pipes). Then on one `Splicer(backend=BACKEND)`, in this
order, on the same pairs:

    splice      splice(a_i, b_i) for every pair          (N calls; 0 -> N live)
    unsplice    unsplice(a_i) for every pair             (N calls; N -> 0 live)
    cycle       splice(a_i, b_i) + unsplice(a_i) again   (N cycles, re-splicing
                former sources; 0 -> 1 -> 0 live)
    both_ways   splice(a_i, b_i) + splice(b_i, a_i)      (N pairs: what a proxy
                does per connection; 0 -> 2N live; left for close(), timed)

Ended splices stay in the engine's tables for 60 s (for stats() and
splicectl), so the later phases run with up to 2N recent records around.

No byte flows: this is the cost of the calls themselves. A phase stops
early after CAP_SECONDS (default 60); the next phase then works on the
pairs the previous one reached, and "n" in each phase says how many calls
were timed. Prints one JSON line; `cpu_us` is the process's CPU time
per call, every thread included, and `switches` its voluntary context
switches in the phase. The engine's start-up time (BPF compile
and load on bpf) is reported separately.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loader"))
import sosplice  # noqa: E402


def pct(samples: list[int], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000.0 if s else 0.0


def process_cpu() -> tuple[float, int]:
    """CPU seconds of this process, every thread (the engine's controller
    or workers work for each call too, which the call's wall time hides),
    and its voluntary context switches (a thread waking another)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw


def main() -> None:
    backend, n = sys.argv[1], int(sys.argv[2])
    cap = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 200_000), max(hard, 200_000)))
    except (ValueError, OSError):   # root without CAP_SYS_RESOURCE (a container)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    requested = n
    # 4 sockets per pair; per live splice the engine holds a dup of both
    # sockets (and, on worker, a pipe); both_ways has 2 splices per pair
    n = min(n, (limit - 500) // (12 if backend == "worker" else 8))
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    addr = ls.getsockname()
    keep: list[socket.socket] = []

    def pairs() -> tuple[list[socket.socket], list[socket.socket]]:
        a: list[socket.socket] = []
        b: list[socket.socket] = []
        for _ in range(n):
            for side in (a, b):
                c = socket.create_connection(addr)
                s, _ = ls.accept()
                keep.append(c)
                side.append(s)
        return a, b
    a, b = pairs()
    out: dict = {"backend": backend, "n": n, "requested": requested, "fd_limit": limit}
    clock = time.perf_counter_ns
    t = time.monotonic()
    eng = sosplice.Splicer(backend=backend)
    out["engine_start_s"] = time.monotonic() - t
    try:
        def phase(name: str, fn, k: int) -> int:
            lat: list[int] = []
            cpu0 = process_cpu()
            t0 = time.monotonic()
            end = t0 + cap
            done = 0
            for i in range(k):
                t1 = clock()
                fn(i)
                lat.append(clock() - t1)
                done += 1
                if time.monotonic() > end:
                    break
            dt = time.monotonic() - t0
            cpu1 = process_cpu()
            cpu, switches = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            eng.reap()
            out[name] = {"per_s": done / dt, "n": done, "seconds": dt,
                         "cpu_us": cpu / done * 1e6 if done else 0.0, "switches": switches,
                         "p50_us": pct(lat, 50),
                         "p99_us": pct(lat, 99), "max_us": max(lat) / 1000.0 if lat else 0.0}
            return done

        k = phase("splice", lambda i: eng.splice(a[i], b[i]), n)
        k2 = phase("unsplice", lambda i: eng.unsplice(a[i]), k)
        # pairs not spliced now: unspliced ones, and the ones a capped
        # splice phase never reached
        free = list(range(k2)) + list(range(k, n))

        def cycle(i: int) -> None:
            eng.splice(a[i], b[i])
            eng.unsplice(a[i])
        phase("cycle", lambda j: cycle(free[j]), k2)

        def both(i: int) -> None:
            eng.splice(a[i], b[i])
            eng.splice(b[i], a[i])
        phase("both_ways", lambda j: both(free[j]), len(free))
        t = time.monotonic()
    finally:
        eng.close()
    out["engine_close_s"] = time.monotonic() - t
    for s in keep + a + b:
        s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
