"""Short-connection client for the setup-rate benchmark.

    python bench/conn_client.py PORT SECONDS THREADS [SIZE]

Each thread loops for SECONDS: connect to 127.0.0.1:PORT, send SIZE bytes
(default 100), read SIZE bytes back, close. Prints one JSON line:
{"n": completed connections, "errors": failures, "elapsed": s,
"samples_us": [connect-to-close time of each connection, us]}.
Run several of these processes in parallel: on CPython the threads of one
process share the GIL.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time


def main() -> None:
    port, seconds, nthreads = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    msg = os.urandom(size)
    addr = ("127.0.0.1", port)
    lock = threading.Lock()
    total = {"n": 0, "errors": 0, "err": {}}
    samples: list[int] = []
    t0 = time.monotonic()
    end = t0 + seconds
    clock = time.perf_counter_ns

    def run() -> None:
        n = errs = 0
        mine: list[int] = []
        errkinds: dict[str, int] = {}
        while time.monotonic() < end:
            t = clock()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.settimeout(5)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.connect(addr)
                s.sendall(msg)
                got = 0
                while got < size:
                    d = s.recv(size - got)
                    if not d:
                        raise ConnectionError("closed before the answer")
                    got += len(d)
            except OSError as e:
                errs += 1
                k = type(e).__name__ + (f"({e.errno})" if e.errno else "")
                errkinds[k] = errkinds.get(k, 0) + 1
                s.close()
                time.sleep(0.01)
                continue
            s.close()
            mine.append((clock() - t) // 1000)
            n += 1
        with lock:
            total["n"] += n
            total["errors"] += errs
            for k, v in errkinds.items():
                total["err"][k] = total["err"].get(k, 0) + v
            samples.extend(mine)

    ts = [threading.Thread(target=run) for _ in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    print(json.dumps({"n": total["n"], "errors": total["errors"], "error_kinds": total["err"],
                      "elapsed": elapsed, "samples_us": samples}))


if __name__ == "__main__":
    main()
