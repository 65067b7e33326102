"""`splicectl ls` and `splicectl top`: every splice on this host.

Each sosplice engine writes a JSON snapshot of its splices to
$SOSPLICE_RUN_DIR (default /run/sosplice)/<pid>-<id>.json every 0.2 s while
a viewer keeps touching $SOSPLICE_RUN_DIR/watch (`ask()`), so engines spend
nothing on it when nobody looks. `read_snapshot()` gathers them into one immutable `Snapshot`; `render()` is
a pure function of a snapshot, so `ls`, `top` and `demo` draw the same
table.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

RUN_DIR = os.environ.get("SOSPLICE_RUN_DIR", "/run/sosplice")


@dataclass(frozen=True)
class Row:
    pid: int
    proc: str
    source_local: str
    source_peer: str
    drain_local: str
    drain_peer: str
    source_cookie: int
    drain_cookie: int
    bytes: int
    kernel_bytes: int      # of bytes, moved without a copy through the process
    max: int
    idle: float | None
    state: str
    error: int | None
    reason: str
    throttled: bool
    age: float
    idle_for: float
    rate: float            # bytes/s: between two readings, else the average
    rate_measured: bool    # True: from two readings
    backend: str = ""      # the engine's backend: "bpf" or "worker"
    listener: str = ""     # splicectl proxy: the listener's HOST:PORT (the splice's label)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    time: float                     # wall clock of the reading
    rows: tuple[Row, ...]
    engines: int                    # engines (files) read
    stamps: tuple[tuple[tuple[int, int], float, int], ...] = ()  # ((pid, cookie), file time, bytes)


def fmt_addr(sa: Any) -> str:
    if not sa:
        return "-"
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def reason_name(err: int | None) -> str:
    if err is None:
        return ""
    if err == 0:
        return "EOF"
    return errno.errorcode.get(err, str(err))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_name(pid: int, cmdline: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    if comm.startswith("python") and cmdline:
        # "python -m splicectl proxy ..." says more than "python3"
        parts = cmdline.split()
        for i, p in enumerate(parts[1:], 1):
            if p == "-m" and i + 1 < len(parts):
                return " ".join(parts[i + 1:i + 3])
            if not p.startswith("-"):
                return " ".join([os.path.basename(p)] + parts[i + 1:i + 2])
    return comm or (cmdline.split()[0] if cmdline else "?")


def rows_from_doc(doc: dict, now: float, prev: dict, ftime: float) -> list[tuple[Row, tuple]]:
    pid = int(doc.get("pid", 0))
    proc = _proc_name(pid, doc.get("cmdline", ""))
    out = []
    for s in doc.get("splices", []):
        src = s.get("source") or [None, None]
        dst = s.get("drain") or [None, None]
        b = int(s.get("bytes", 0))
        age = float(s.get("age", 0.0))
        k = (pid, int(s.get("source_cookie", 0)))
        rate, measured = (b / age if age > 0 else 0.0), False
        if k in prev:
            pt, pb = prev[k]
            if ftime > pt:
                rate, measured = max(0.0, (b - pb) / (ftime - pt)), True
        if s.get("state") == "done":
            rate, measured = 0.0, True
        err = s.get("error")
        row = Row(
            pid=pid, proc=proc,
            source_local=fmt_addr(src[0]), source_peer=fmt_addr(src[1]),
            drain_local=fmt_addr(dst[0]), drain_peer=fmt_addr(dst[1]),
            source_cookie=k[1], drain_cookie=int(s.get("drain_cookie", 0)),
            bytes=b, kernel_bytes=int(s.get("kernel_bytes", 0) or 0), max=int(s.get("max", 0) or 0), idle=s.get("idle"),
            state=str(s.get("state", "?")), error=err, reason=reason_name(err),
            throttled=bool(s.get("throttled", False)), age=age,
            idle_for=float(s.get("idle_for", 0.0)), rate=rate, rate_measured=measured,
            backend=str(doc.get("backend", "")), listener=str(s.get("label") or ""),
        )
        out.append((row, (k, ftime, b)))
    return out


def snapshot_from_docs(docs: Iterable[dict], prev: Snapshot | None = None) -> Snapshot:
    now = time.time()
    pmap = {k: (t, b) for k, t, b in (prev.stamps if prev else ())}
    rows, stamps, n = [], [], 0
    for doc in docs:
        n += 1
        for row, stamp in rows_from_doc(doc, now, pmap, float(doc.get("time", now))):
            rows.append(row)
            k = stamp[0]
            # Same file as last time (not rewritten yet): keep the last rate.
            if k in pmap and pmap[k][0] == stamp[1] and prev is not None:
                old = next((r for r in prev.rows if (r.pid, r.source_cookie) == k), None)
                if old is not None and old.rate_measured:
                    rows[-1] = replace(row, rate=old.rate, rate_measured=True)
                stamps.append((k, *pmap[k]))
            else:
                stamps.append(stamp)
    return Snapshot(time=now, rows=tuple(rows), engines=n, stamps=tuple(stamps))


def ask(run_dir: str = RUN_DIR) -> float:
    """Ask every engine to publish for the next few seconds; return when.

    Best effort: without write access to `run_dir` the engines publish
    only while someone else asks.
    """
    now = time.time()
    try:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "watch")
        with open(path, "a"):
            pass
        os.utime(path, (now, now))
    except OSError:
        pass
    return now


def read_fresh_docs(run_dir: str = RUN_DIR, pids: Iterable[int] = (),
                    wait: float = 1.0) -> list[dict]:
    """`ask()`, then the snapshots once every engine with splices has
    answered (or after `wait` seconds, with what there is)."""
    asked = ask(run_dir)
    # An engine that has never published has no file to wait for: give
    # every engine one publishing period (0.2 s) to answer.
    first = time.monotonic() + 0.3
    deadline = time.monotonic() + wait
    while True:
        time.sleep(0.05)
        docs = read_docs(run_dir, pids)
        stale = [d for d in docs if d.get("splices") and d.get("time", 0) < asked]
        now = time.monotonic()
        if now >= first and not stale or now >= deadline:
            return docs


def read_docs(run_dir: str = RUN_DIR, pids: Iterable[int] = ()) -> list[dict]:
    """The live engines' snapshots; only those of `pids` if any are given."""
    pids = set(pids)
    docs = []
    for path in glob.glob(os.path.join(run_dir, "*.json.tmp")):
        pid = os.path.basename(path).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(path)  # a killed process's unfinished write
    for path in sorted(glob.glob(os.path.join(run_dir, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue  # being replaced, or removed: the next reading has it
        pid = doc.get("pid")
        if isinstance(pid, int) and not _alive(pid):
            _remove(path)  # left by a process that was killed
            _remove(path + ".tmp")
            continue
        if not isinstance(pid, int) or pids and pid not in pids:
            continue
        docs.append(doc)
    return docs


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_snapshot(prev: Snapshot | None = None, run_dir: str = RUN_DIR,
                  pids: Iterable[int] = ()) -> Snapshot:
    return snapshot_from_docs(read_docs(run_dir, pids), prev)


# -- formatting ----------------------------------------------------------------

def kernel_share(kernel: int, total: int) -> str:
    """"97%": the share of `total` moved without a copy through the process
    (floored, so 100% means every byte); "" when nothing moved."""
    return f"{kernel * 100 // total}%" if total > 0 else ""


def human_bytes(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def human_secs(s: float) -> str:
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def limit_text(r: Row) -> str:
    parts = []
    if r.max:
        parts.append(human_bytes(r.max))
    if r.idle:
        parts.append(human_secs(r.idle))
    return "/".join(parts) or "-"


def state_text(r: Row) -> Text:
    if r.state == "active":
        return Text("active" + ("*" if r.throttled else ""), style="green")
    if r.state == "dissolving":
        return Text(f"flush {r.reason}", style="yellow")
    style = "dim" if r.error == 0 else "red"
    return Text(r.reason or r.state, style=style)


SORT_KEYS = {
    "bytes": lambda r: (-r.bytes, r.pid, r.source_cookie),
    "rate": lambda r: (-r.rate, -r.bytes, r.pid, r.source_cookie),
    "age": lambda r: (-r.age, r.pid, r.source_cookie),
}


def render(snap: Snapshot, sort: str = "bytes", wide: bool = False, title: str | None = None,
           max_ended: int = 10) -> Group:
    """A pure function of the snapshot: the header line and the table.

    Live splices first, then at most `max_ended` dissolved ones (-1: all)."""
    rows = sorted(snap.rows, key=SORT_KEYS[sort])
    live = [r for r in rows if r.state != "done"]
    ended = [r for r in rows if r.state == "done"]
    total_rate = sum(r.rate for r in live)
    moved, kern = sum(r.bytes for r in rows), sum(r.kernel_bytes for r in rows)
    head = Text.assemble(
        (title + "  " if title else "", "bold"),
        f"{len(live)} live, {len(rows) - len(live)} ended splices in {snap.engines} engine(s)  ",
        f"moved {human_bytes(moved)}B" + (f" ({kernel_share(kern, moved)} in kernel)  " if moved else "  "),
        f"now {human_bytes(total_rate)}B/s  ",
        (time.strftime("%H:%M:%S", time.localtime(snap.time)), "dim"),
    )
    by_listener = listener_totals(rows)
    if by_listener is not None:
        head = Text.assemble(head, "\n", by_listener)
    t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold", expand=False)
    t.add_column("PID", justify="right", no_wrap=True)
    if wide:
        t.add_column("PROCESS", no_wrap=True, overflow="ellipsis", max_width=24)
        t.add_column("SOURCE (local<-peer)", no_wrap=True)
        t.add_column("DRAIN (local->peer)", no_wrap=True)
    else:
        t.add_column("FROM", no_wrap=True, overflow="ellipsis", min_width=9)
        t.add_column("TO", no_wrap=True, overflow="ellipsis", min_width=9)
    t.add_column("BYTES", justify="right", no_wrap=True)
    t.add_column("KERN", justify="right", no_wrap=True)
    t.add_column("RATE" if not wide else "RATE/s", justify="right", no_wrap=True)
    t.add_column("IDLE", justify="right", no_wrap=True)
    t.add_column("LIMIT", justify="right", no_wrap=True)
    t.add_column("STATE", no_wrap=True, overflow="ellipsis")
    if wide:
        t.add_column("AGE", justify="right", no_wrap=True)
        t.add_column("COOKIES", no_wrap=True)
    hidden = 0 if max_ended < 0 else max(0, len(ended) - max_ended)
    for r in live + (ended if max_ended < 0 else ended[:max_ended]):
        rate = human_bytes(r.rate) + ("" if r.rate_measured else "~")
        cells: list[Any] = [str(r.pid)]
        if wide:
            cells += [f"{r.proc} ({r.backend})", f"{r.source_local}<-{r.source_peer}",
                      f"{r.drain_local}->{r.drain_peer}"]
        else:
            cells += [r.source_peer, r.drain_peer]
        cells += [human_bytes(r.bytes), kernel_share(r.kernel_bytes, r.bytes) or "-", rate, human_secs(r.idle_for), limit_text(r), state_text(r)]
        if wide:
            cells += [human_secs(r.age), f"{r.source_cookie:#x}->{r.drain_cookie:#x}"]
        t.add_row(*cells)
    if not rows:
        return Group(head, Text("no splices", style="dim"))
    foot = Text(("" if not hidden else f"+{hidden} ended not shown (--all)\n")
                + ("FROM/TO: source/drain peer; KERN: share moved in the kernel; ~ = average rate; "
                   "* = copy path" if not wide else ""),
                style="dim")
    return Group(head, t, foot)


def listener_totals(rows: Iterable[Row]) -> Text | None:
    """"listeners: 127.0.0.1:8080 4 live 1.5MB, [::]:8443 0 live 10.0MB":
    live splices (two per connection) and bytes moved per proxy listener;
    None when no splice has a listener."""
    live: dict[str, int] = {}
    moved: dict[str, int] = {}
    for r in rows:
        if r.listener:
            live[r.listener] = live.get(r.listener, 0) + (r.state != "done")
            moved[r.listener] = moved.get(r.listener, 0) + r.bytes
    if not live:
        return None
    parts = [f"{name} {live[name]} live {human_bytes(moved[name])}B" for name in sorted(live)]
    return Text("listeners: " + ", ".join(parts), style="dim")


def _console(wide: bool) -> Console:
    c = Console(highlight=False, soft_wrap=False)
    return Console(highlight=False, width=max(c.width, 160) if wide else min(c.width, 80))


# -- commands ------------------------------------------------------------------

def ls(args) -> int:
    snap = snapshot_from_docs(read_fresh_docs(pids=args.pid))
    if getattr(args, "json", False):
        rows = sorted(snap.rows, key=SORT_KEYS[args.sort])
        json.dump([r.as_json() for r in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    _console(args.wide).print(render(snap, args.sort, args.wide, max_ended=-1 if args.all else 10))
    return 0


class _Keys:
    """Single keys from stdin in cbreak mode, restored on exit."""

    def __init__(self) -> None:
        self.fd = None
        self.saved = None
        try:
            if sys.stdin.isatty():
                import termios
                import tty
                self.fd = sys.stdin.fileno()
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except Exception:
            self.fd = None

    def wait(self, timeout: float) -> str | None:
        """Sleep up to `timeout`; return a key pressed meanwhile."""
        if self.fd is None:
            time.sleep(timeout)
            return None
        import select
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            return os.read(self.fd, 1).decode(errors="replace")
        return None

    def close(self) -> None:
        if self.fd is not None and self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def top(args) -> int:
    from rich.live import Live

    console = _console(args.wide)
    sort = args.sort
    keys = _Keys()
    snap = snapshot_from_docs(read_fresh_docs(pids=args.pid))
    n = 0
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                title = f"splicectl top  sort={sort}  (q quits, b/r/a sorts)"
                live.update(render(snap, sort, args.wide, title, -1 if args.all else 10), refresh=True)
                n += 1
                if args.count and n >= args.count:
                    break
                deadline = time.monotonic() + args.interval
                quit_ = False
                while (left := deadline - time.monotonic()) > 0:
                    k = keys.wait(left)
                    if k in ("q", "Q"):
                        quit_ = True
                        break
                    if k in ("b", "r", "a"):
                        sort = {"b": "bytes", "r": "rate", "a": "age"}[k]
                        live.update(render(snap, sort, args.wide,
                                           f"splicectl top  sort={sort}  (q quits, b/r/a sorts)",
                                           -1 if args.all else 10), refresh=True)
                if quit_:
                    break
                ask()
                snap = read_snapshot(snap, pids=args.pid)
    except KeyboardInterrupt:
        pass
    finally:
        keys.close()
    return 0
