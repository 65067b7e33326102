"""Where the bytes go: bulk iperf3 through one in-process engine per backend.

    python bench/kernel_share.py [--seconds 5] [--backends bpf,worker]
                                 [--modes P1,P8,R1] [--rounds 1]

For each mode (iperf3 -P 1, -P 8, -P 1 -R) it measures, in one run:
direct iperf3 (no proxy), then each backend: an engine in this process
(accept, connect upstream, splice both ways, shut down the drain at EOF),
iperf3 through it, and afterwards the engine's own records summed over
every splice of the run: bytes, kernel_bytes (moved without a copy through
the process) and the process's CPU time. Prints one table; ratios are
against direct in the same round, since this machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loader"))
import sosplice  # noqa: E402

MODES = {"P1": ["-P", "1"], "P8": ["-P", "8"], "R1": ["-P", "1", "-R"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy(threading.Thread):
    """accept -> connect upstream -> splice both ways, until stopped."""

    def __init__(self, backend: str, upstream: int) -> None:
        super().__init__(daemon=True)
        self.eng = sosplice.Splicer(backend=backend)
        self.upstream = upstream
        self.ls = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.ls.setblocking(False)
        self.port = self.ls.getsockname()[1]
        self.stop_r, self.stop_w = os.pipe()
        self.conns: dict[object, tuple[list, socket.socket]] = {}

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.ls, selectors.EVENT_READ, "accept")
        sel.register(self.eng.fileno(), selectors.EVENT_READ, "reap")
        sel.register(self.stop_r, selectors.EVENT_READ, "stop")
        while True:
            for key, _ in sel.select():
                if key.data == "stop":
                    sel.close()
                    return
                if key.data == "accept":
                    while True:
                        try:
                            c, _ = self.ls.accept()
                        except BlockingIOError:
                            break
                        u = socket.create_connection(("127.0.0.1", self.upstream))
                        for s in (c, u):
                            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        pair = [c, u, 2]
                        self.conns[self.eng.splice(c, u)] = (pair, u)
                        self.conns[self.eng.splice(u, c)] = (pair, c)
                else:
                    for sp in self.eng.reap():
                        pair, drain = self.conns.pop(sp)
                        if sp.error == 0:
                            try:
                                drain.shutdown(socket.SHUT_WR)
                            except OSError:
                                pass
                        pair[2] -= 1
                        if pair[2] == 0 or sp.error:
                            pair[0].close()
                            pair[1].close()

    def finish(self) -> dict:
        os.write(self.stop_w, b"x")
        self.join()
        rows = self.eng.stats()
        self.eng.close()
        self.ls.close()
        return {"bytes": sum(r.bytes for r in rows),
                "kernel_bytes": sum(r.kernel_bytes for r in rows)}


def iperf(port: int, args: list[str], seconds: int) -> float:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                          "-J", *args], capture_output=True, text=True, timeout=seconds + 60)
    doc = json.loads(out.stdout)
    if "error" in doc:
        raise RuntimeError(doc["error"])
    return doc["end"]["sum_received"]["bits_per_second"] / 8e6


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--backends", default="bpf,worker")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    sport = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(sport)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    rows = []
    try:
        for rnd in range(a.rounds):
            for mode in a.modes.split(","):
                direct = iperf(sport, MODES[mode], a.seconds)
                rows.append((rnd, mode, "direct", direct, direct, None, None))
                for backend in a.backends.split(","):
                    px = Proxy(backend, sport)
                    px.start()
                    c0 = cpu()
                    mbs = iperf(px.port, MODES[mode], a.seconds)
                    time.sleep(0.5)  # the last splices end
                    used = cpu() - c0
                    got = px.finish()
                    share = got["kernel_bytes"] / got["bytes"] if got["bytes"] else 0.0
                    rows.append((rnd, mode, backend, mbs, direct, share,
                                 used / (got["bytes"] / 1e9) if got["bytes"] else 0.0))
                    print(f"round {rnd} {mode:3} {backend:6} {mbs:8.0f} MB/s  "
                          f"{mbs / direct:5.2f}x direct  in kernel {share:6.1%}  "
                          f"cpu {rows[-1][6]:.3f} s/GB", flush=True)
    finally:
        server.terminate()
        server.wait()
    print("\n| round | mode | path | MB/s | vs direct | in kernel | process CPU s/GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rnd, mode, path, mbs, direct, share, cpg in rows:
        print(f"| {rnd} | {mode} | {path} | {mbs:.0f} | {mbs / direct:.2f}x | "
              f"{'-' if share is None else f'{share:.1%}'} | {'-' if cpg is None else f'{cpg:.3f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
