"""`splicectl ls` and `splicectl top`: every splice on this host.

Each sosplice engine publishes a snapshot of its splices while a viewer
keeps asking (`sosplice.snapshot`: the files, their schema, watch and
read), so engines spend nothing on it when nobody looks.
`read_snapshot()` gathers them into one immutable `Snapshot`; `render()`
is a pure function of a snapshot, so `ls`, `top` and `demo` draw the same
table.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from sosplice import SpliceInfo, reason_name, snapshot


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

    @classmethod
    def of(cls, i: SpliceInfo, proc: str, rate: float, rate_measured: bool) -> Row:
        """The row of one splice: its addresses as text, its reason named."""
        return cls(
            pid=i.pid, proc=proc,
            source_local=fmt_addr(i.source[0]), source_peer=fmt_addr(i.source[1]),
            drain_local=fmt_addr(i.drain[0]), drain_peer=fmt_addr(i.drain[1]),
            source_cookie=i.source_cookie, drain_cookie=i.drain_cookie,
            bytes=i.bytes, kernel_bytes=i.kernel_bytes, max=i.max, idle=i.idle,
            state=i.state, error=i.error, reason=reason_name(i.error),
            throttled=i.throttled, age=i.age, idle_for=i.idle_for,
            rate=rate, rate_measured=rate_measured, backend=i.backend, listener=i.label,
        )

    def as_json(self) -> dict[str, Any]:
        """One object of `ls --json`."""
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


def rows_from_doc(doc: snapshot.EngineSnapshot, prev: dict) -> list[tuple[Row, tuple]]:
    """The rows of one engine's snapshot, with their rates: between this
    reading and `prev`'s ((pid, cookie) -> (file time, bytes)), else the
    average since the start; and each row's stamp for the next reading."""
    proc = _proc_name(doc.pid, doc.cmdline)
    out = []
    for i in doc.splices:
        k = (i.pid, i.source_cookie)
        rate, measured = (i.bytes / i.age if i.age > 0 else 0.0), False
        if k in prev:
            pt, pb = prev[k]
            if doc.time > pt:
                rate, measured = max(0.0, (i.bytes - pb) / (doc.time - pt)), True
        if i.state == "done":
            rate, measured = 0.0, True
        out.append((Row.of(i, proc, rate, measured), (k, doc.time, i.bytes)))
    return out


def snapshot_from_docs(docs: Iterable[snapshot.EngineSnapshot],
                       prev: Snapshot | None = None) -> Snapshot:
    now = time.time()
    pmap = {k: (t, b) for k, t, b in (prev.stamps if prev else ())}
    rows, stamps, n = [], [], 0
    for doc in docs:
        n += 1
        for row, stamp in rows_from_doc(doc, pmap):
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


def read_snapshot(prev: Snapshot | None = None, pids: Iterable[int] = ()) -> Snapshot:
    return snapshot_from_docs(snapshot.read(pids), prev)


# -- connections: the two splices of one socket pair -----------------------------

@dataclass(frozen=True)
class Pair:
    """One line of the table: the two splices of one connection, or a
    splice alone (`b` None).

    `a` carries peer A's bytes to peer B, `b` B's bytes to A. A is the
    source of the older splice of the two: the one whose source socket has
    the smaller cookie, as a socket gets its cookie when it is first
    spliced. For `splicectl proxy` A is the client and B the upstream.
    """
    a: Row
    b: Row | None = None

    @property
    def rows(self) -> tuple[Row, ...]:
        return (self.a,) if self.b is None else (self.a, self.b)

    @property
    def live(self) -> bool:
        return any(r.state != "done" for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def kernel_bytes(self) -> int:
        return sum(r.kernel_bytes for r in self.rows)

    @property
    def rate(self) -> float:
        return sum(r.rate for r in self.rows)

    @property
    def age(self) -> float:
        return max(r.age for r in self.rows)


def pair_rows(rows: Iterable[Row]) -> list[Pair]:
    """The rows as connections: splice X->Y goes with splice Y->X of the
    same process (by socket cookie); a row without one stays alone."""
    rows = list(rows)
    waiting: dict[tuple[int, int, int], list[Row]] = {}
    for r in rows:
        waiting.setdefault((r.pid, r.source_cookie, r.drain_cookie), []).append(r)
    out = []
    for r in rows:
        mine = waiting[(r.pid, r.source_cookie, r.drain_cookie)]
        if r not in mine:
            continue            # taken as another row's partner
        mine.remove(r)
        back = waiting.get((r.pid, r.drain_cookie, r.source_cookie))
        if r.source_cookie != r.drain_cookie and back:
            other = back.pop(0)
            a, b = (r, other) if r.source_cookie < r.drain_cookie else (other, r)
            out.append(Pair(a, b))
        else:
            out.append(Pair(r))
    return out


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


def short_bytes(n: float) -> str:
    """`n` in at most 4 characters, as `ls -h` does: 1023, 1.5K, 97K, 1.0M
    (powers of 1024)."""
    if n < 1024:
        return f"{n:.0f}"
    for unit in "KMGTPE":
        n /= 1024
        if n < 9.95:
            return f"{n:.1f}{unit}"
        if n < 999.5:
            return f"{n:.0f}{unit}"
    return f"{n:.0f}E"


def human_secs(s: float) -> str:
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def unmapped(addr: str) -> str:
    """"[::ffff:10.0.0.1]:80" (an IPv4 peer of a dual-stack socket) as
    "10.0.0.1:80"; any other address as it is."""
    if addr.startswith("[::ffff:") and "." in addr:
        host, sep, port = addr[8:].partition("]:")
        if sep:
            return f"{host}:{port}"
    return addr


def shrink(text: str, width: int) -> str:
    """`text` in `width` characters: cut on the left, where an address
    says least (its port and last digits are kept)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:] if width > 1 else "…"


def limit_text(r: Row) -> str:
    parts = []
    if r.max:
        parts.append(human_bytes(r.max))
    if r.idle:
        parts.append(human_secs(r.idle))
    return "/".join(parts) or "-"


def _state_word(r: Row) -> str:
    if r.state == "active":
        return "active" + ("*" if r.throttled else "")
    if r.state == "dissolving":
        return f"flush {r.reason}"
    return r.reason or r.state


def state_text(p: Pair) -> Text:
    """One word if both directions agree, else "A->B state/A<-B state"."""
    words = [_state_word(r) for r in p.rows]
    text = words[0] if len(set(words)) == 1 else "/".join(words)
    if any(r.state == "active" for r in p.rows):
        style = "green"
    elif any(r.state == "dissolving" for r in p.rows):
        style = "yellow"
    else:
        style = "dim" if all(r.error == 0 for r in p.rows) else "red"
    return Text(text, style=style)


SORT_KEYS = {
    "bytes": lambda p: (-p.bytes, p.a.pid, p.a.source_cookie),
    "rate": lambda p: (-p.rate, -p.bytes, p.a.pid, p.a.source_cookie),
    "age": lambda p: (-p.age, p.a.pid, p.a.source_cookie),
}

MIN_ADDR = 9            # an address column is never cut below "…1]:65535"
SPARK = "▁▂▃▄▅▆▇█"
SPARK_SPAN, SPARK_WIDTH = 60.0, 30   # seconds, characters: 2 s each


def total_rate(snap: Snapshot) -> float:
    """Bytes per second through every live splice of `snap`."""
    return sum(r.rate for r in snap.rows if r.state != "done")


def sparkline(history: Iterable[tuple[float, float]], now: float) -> str:
    """SPARK_WIDTH characters for the last SPARK_SPAN seconds of
    (time, bytes/s) readings, scaled to their peak: the highest reading in
    each slice; a slice with none takes the next reading's (a reading's
    rate covers the time since the one before); blank before the first."""
    slices: list[float | None] = [None] * SPARK_WIDTH
    for t, v in history:
        age = now - t
        if -1.0 < age < SPARK_SPAN:
            i = SPARK_WIDTH - 1 - min(SPARK_WIDTH - 1, max(0, int(age / SPARK_SPAN * SPARK_WIDTH)))
            slices[i] = max(slices[i] or 0.0, v)
    first = next((i for i, v in enumerate(slices) if v is not None), SPARK_WIDTH)
    nxt = None
    for i in range(SPARK_WIDTH - 1, first - 1, -1):
        if slices[i] is None:
            slices[i] = nxt
        nxt = slices[i]
    peak = max((v for v in slices if v is not None), default=0.0)
    out = []
    for v in slices:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARK[min(len(SPARK) - 1, int(v / peak * len(SPARK)))] if peak > 0 else SPARK[0])
    return "".join(out)


def _pack(segments: list[Text], width: int) -> Text:
    """The segments on as few lines of at most `width` as fit, two spaces
    apart; a segment is never split."""
    lines: list[Text] = []
    cur = Text()
    for seg in segments:
        if cur.plain and len(cur.plain) + 2 + len(seg.plain) > width:
            lines.append(cur)
            cur = Text()
        if cur.plain:
            cur.append("  ")
        cur.append_text(seg)
    lines.append(cur)
    return Text("\n").join(lines)


def render(snap: Snapshot, sort: str = "bytes", wide: bool = False, title: str | None = None,
           max_ended: int = 10, width: int = 80,
           history: Iterable[tuple[float, float]] | None = None, keys: str = "") -> Group:
    """A pure function of the snapshot: header lines, the table, a legend.

    One row per connection (`Pair`), live ones first, then at most
    `max_ended` ended ones (-1: all). At most `width` columns (not
    counting --wide): the addresses give way before any number does, and
    IPv4-mapped addresses are shown as IPv4. `history`, (time, bytes/s)
    readings, adds a sparkline of the last minute (top); `keys` is a
    reminder of the keys, put with the legend.
    """
    pairs = sorted(pair_rows(snap.rows), key=SORT_KEYS[sort])
    live = [p for p in pairs if p.live]
    ended = [p for p in pairs if not p.live]
    hidden = 0 if max_ended < 0 else max(0, len(ended) - max_ended)
    shown = live + (ended if max_ended < 0 else ended[:max_ended])
    pids = sorted({r.pid for r in snap.rows})
    one_pid = len(pids) == 1 and not wide

    rate = total_rate(snap)
    moved, kern = sum(r.bytes for r in snap.rows), sum(r.kernel_bytes for r in snap.rows)
    singles = sum(1 for p in pairs if p.b is None)
    clock = time.strftime("%H:%M:%S", time.localtime(snap.time))
    segs = [Text.assemble((title, "bold"), " ", (clock, "dim")) if title else Text(clock, style="dim")]
    segs.append(Text(f"{len(live)} live, {len(ended)} ended connections"
                     + (f" ({singles} one-way)" if singles else "")))
    if one_pid:
        r0 = snap.rows[0]
        segs.append(Text(f"pid {r0.pid} {r0.proc}" + (f" ({r0.backend})" if r0.backend else "")))
    else:
        segs.append(Text(f"{len(pids)} processes" if pids else f"{snap.engines} engines"))
    if moved:
        segs.append(Text(f"moved {human_bytes(moved)}B, {kernel_share(kern, moved)} in kernel"))
    now = Text(f"now {human_bytes(rate)}B/s")
    if history is None:
        segs.append(now)
    head = [_pack(segs, width)]
    by_listener = listener_totals(pairs)
    if by_listener:
        head.append(_pack(by_listener, width))
    if history is not None:
        hist = list(history)
        peak = max((v for t, v in hist if snap.time - t < SPARK_SPAN), default=0.0)
        head.append(Text.assemble(now, "  last 60 s ", (sparkline(hist, snap.time), "cyan"),
                                  f" peak {human_bytes(peak)}B/s"))
    legend = [Text(f"+{hidden} ended not shown (--all)")] if hidden else []
    legend += [Text("A, B: peers (proxy: client, upstream)"), Text("A→B A←B: bytes"),
               Text("KERN: in-kernel share"), Text("~ average"), Text("* bytes wait")]
    if keys:
        legend.append(Text(keys))
    foot = _pack(legend, width)
    foot.stylize("dim")
    if not snap.rows:
        return Group(*head, Text("no splices", style="dim"))

    # The columns as text first: their widths decide how much room is
    # left for the two address columns, which are cut to fit.
    addr_a = [unmapped(p.a.source_peer) for p in shown]
    addr_b = [unmapped(p.a.drain_peer) for p in shown]
    if wide:
        addr_a = [f"{unmapped(p.a.source_local)}<-{a}" for p, a in zip(shown, addr_a)]
        addr_b = [f"{unmapped(p.a.drain_local)}->{b}" for p, b in zip(shown, addr_b)]
    cols: list[tuple[str, str, list]] = []        # header, justify, cells
    if not one_pid:
        cols.append(("PID", "right", [str(p.a.pid) for p in shown]))
    if wide:
        cols.append(("PROCESS", "left", [f"{p.a.proc} ({p.a.backend})"[:24] for p in shown]))
    cols.append(("A (local<-peer)" if wide else "A", "left", addr_a))
    cols.append(("B (local->peer)" if wide else "B", "left", addr_b))
    cols.append(("A→B", "right", [short_bytes(p.a.bytes) for p in shown]))
    cols.append(("A←B", "right", [short_bytes(p.b.bytes) if p.b else "" for p in shown]))
    cols.append(("KERN", "right", [kernel_share(p.kernel_bytes, p.bytes) or "-" for p in shown]))
    cols.append(("RATE", "right", [short_bytes(p.rate) + ("" if all(r.rate_measured for r in p.rows)
                                                          else "~") for p in shown]))
    cols.append(("IDLE", "right", [human_secs(min(r.idle_for for r in p.rows)) if p.live else "-"
                                   for p in shown]))
    if wide or any(r.max or r.idle for p in shown for r in p.rows):
        cols.append(("LIMIT", "right", ["|".join(dict.fromkeys(limit_text(r) for r in p.rows))
                                        for p in shown]))
    cols.append(("STATE", "left", [state_text(p) for p in shown]))
    if wide:
        cols.append(("AGE", "right", [human_secs(p.age) for p in shown]))
        cols.append(("COOKIES", "left", [f"{p.a.source_cookie:#x}<>{p.a.drain_cookie:#x}"
                                         for p in shown]))

    def natural(header: str, cells: list) -> int:
        return max([len(header)] + [len(c.plain if isinstance(c, Text) else c) for c in cells])

    widths = [natural(h, c) for h, _, c in cols]
    ia = next(i for i, (h, _, _) in enumerate(cols) if h.startswith("A"))
    if not wide:
        room = width - (len(cols) - 1) - sum(w for i, w in enumerate(widths) if i not in (ia, ia + 1))
        na, nb = widths[ia], widths[ia + 1]
        if na + nb > room:
            wa = max(MIN_ADDR, min(na, max(room // 2, room - nb)))
            wb = max(MIN_ADDR, min(nb, room - wa))
            widths[ia], widths[ia + 1] = wa, wb
            for i, w in ((ia, wa), (ia + 1, wb)):
                cols[i] = (cols[i][0], cols[i][1], [shrink(c, w) for c in cols[i][2]])

    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold",
              expand=False, collapse_padding=True)
    for (header, justify, _), w in zip(cols, widths):
        t.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis",
                     min_width=w, max_width=w)
    for i in range(len(shown)):
        t.add_row(*(c[i] for _, _, c in cols))
    return Group(*head, t, foot)


def listener_totals(pairs: Iterable[Pair]) -> list[Text]:
    """["listeners: 127.0.0.1:8080 4 live 1.5MB", "[::]:8443 0 live 10.0MB"]:
    live connections and bytes moved per proxy listener, one header
    segment each; [] when no splice has a listener (its label)."""
    live: dict[str, int] = {}
    moved: dict[str, int] = {}
    for p in pairs:
        name = next((r.listener for r in p.rows if r.listener), "")
        if name:
            live[name] = live.get(name, 0) + p.live
            moved[name] = moved.get(name, 0) + p.bytes
    segs = [Text(f"{name} {live[name]} live {human_bytes(moved[name])}B", style="dim")
            for name in sorted(live)]
    if segs:
        segs[0] = Text("listeners: ", style="dim") + segs[0]
    return segs


def _console(wide: bool) -> Console:
    """80 columns at most (the terminal's width if narrower); with --wide
    as many as the table takes. Piped output has no colours."""
    c = Console(highlight=False, soft_wrap=False)
    return Console(highlight=False, width=max(c.width, 240) if wide else min(c.width, 80))


# -- commands ------------------------------------------------------------------

def ls(args) -> int:
    snap = snapshot_from_docs(snapshot.read_fresh(args.pid))
    if getattr(args, "json", False):
        rows = sorted(snap.rows, key=lambda r: SORT_KEYS[args.sort](Pair(r)))
        json.dump([r.as_json() for r in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    console = _console(args.wide)
    console.print(render(snap, args.sort, args.wide, max_ended=-1 if args.all else 10,
                         width=console.width))
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


TOP_KEYS = "keys: b r a sort by bytes, rate, age; q quits"


def top(args) -> int:
    """Redraw every `args.interval` seconds in place, or, with --batch or
    when stdout is not a terminal, print one frame after another, each
    ending with a newline (as top -b)."""
    batch = args.batch or not sys.stdout.isatty()
    console = _console(args.wide)
    sort = args.sort
    history: collections.deque[tuple[float, float]] = collections.deque()
    snap = snapshot_from_docs(snapshot.read_fresh(args.pid))

    def frame() -> Group:
        history.append((snap.time, total_rate(snap)))
        while history and snap.time - history[0][0] > SPARK_SPAN:
            history.popleft()
        return render(snap, sort, args.wide, f"splicectl top every {args.interval:g} s by {sort}",
                      -1 if args.all else 10, console.width, history,
                      "" if batch else TOP_KEYS)

    n = 0
    if batch:
        try:
            while True:
                console.print(frame())
                console.file.flush()
                n += 1
                if args.count and n >= args.count:
                    return 0
                time.sleep(args.interval)
                snapshot.watch()
                snap = read_snapshot(snap, pids=args.pid)
        except KeyboardInterrupt:
            return 0

    from rich.live import Live
    keys = _Keys()
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                live.update(frame(), refresh=True)
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
                        history.pop()      # the same reading, drawn again
                        live.update(frame(), refresh=True)
                if quit_:
                    break
                snapshot.watch()
                snap = read_snapshot(snap, pids=args.pid)
    except KeyboardInterrupt:
        pass
    finally:
        keys.close()
    return 0
