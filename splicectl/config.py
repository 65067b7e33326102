"""`splicectl proxy --config FILE`: the TOML file, read and checked.

    backend = "auto"            # optional: bpf, worker or auto
    backlog_cap = "4M"          # optional: bytes (an int, or "64K".."256M")
    metrics = "127.0.0.1:9100"  # optional: Prometheus metrics over HTTP
    grace = 5                   # optional: seconds, on SIGTERM/SIGINT
    connect_timeout = 3         # optional: seconds, per upstream connect
    splice_after = 0.5          # optional: seconds relayed before splicing (0: at once)
    workers = 2                 # optional: processes (default 1; --workers)

    [[listen]]
    bind = "0.0.0.0:8080"                            # required
    upstreams = ["10.0.0.1:80", "10.0.0.2:80"]       # required, round robin
    idle = 300                  # optional: seconds without a byte either way
    max_conns = 1000            # optional: 0 = no limit
    send_proxy = "v2"           # optional: PROXY protocol header, "v1" or "v2"

`load()` returns a checked `proxy.Config` or raises `ConfigError`, whose
text is one line that names the file, the line and the key:
"proxy.toml:7: listen[1].upstreams: bad port in '10.0.0.1:x' ...". Every
value is checked, and every host name resolved, here: a file that loads
starts (or reloads) unless a port is taken or an upstream is down.
"""
from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from .proxy import (CHECKS, SPLICE_AFTER, Config, ListenConfig, UsageError, fmt_addr, parse_addr,
                    resolve)

TOP_KEYS = ("backend", "backlog_cap", "metrics", "grace", "connect_timeout", "splice_after",
            "workers", "listen")
LISTEN_KEYS = ("bind", "upstreams", "idle", "max_conns", "send_proxy")


class ConfigError(UsageError):
    """A bad file: one line, "FILE:LINE: KEY: what is wrong"."""


def parse_size(text: str) -> int:
    """'4M', '64K', '1G', '65536' -> bytes; UsageError if it is none."""
    t = text.strip().upper().removesuffix("B")
    mult = 1
    for suf, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suf):
            t, mult = t[:-1], m
            break
    try:
        v = float(t) * mult
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UsageError(f"{text!r} is not a byte count (e.g. 4M)")
    return int(v)


class _Lines:
    """Where a key is written, for the error line (tomllib gives no
    positions for values it parsed). A plain scan of the text: the
    header of the n-th [[listen]] table, then the key's line in it. A
    key it cannot place (an inline table, a dotted key) gets the line of
    its table, or 1."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (first line, end line) of the top level and of each [[listen]], 1-based.
        self.top = (1, len(self.lines) + 1)
        self.listen: list[tuple[int, int]] = []
        self.tables: dict[str, int] = {}      # a table's name -> its first header line
        starts: list[tuple[str, int]] = []
        for i, line in enumerate(self.lines, 1):
            m = self._HEADER.match(line)
            if m:
                starts.append((m.group(1).strip("\"'"), i))
                self.tables.setdefault(starts[-1][0], i)
        if starts:
            self.top = (1, starts[0][1])
        for k, (name, i) in enumerate(starts):
            end = starts[k + 1][1] if k + 1 < len(starts) else len(self.lines) + 1
            if name == "listen":
                self.listen.append((i, end))

    def of(self, key: str, table: int | None = None) -> int:
        """The line of `key` at the top level or in the table-th [[listen]]."""
        if table is None:
            start, end = self.top
        elif table < len(self.listen):
            start, end = self.listen[table]
        else:
            return 1
        pat = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for i in range(start, end):
            if pat.match(self.lines[i - 1]):
                return i
        return self.tables.get(key, start) if table is None else start


def load(path: str | Path) -> Config:
    """The file's Config, every value checked, or one ConfigError line.

    Raises ConfigError for a file that cannot be read, is not TOML, or
    has a missing, unknown or bad key.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{path}: cannot read: {why}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says where: "Invalid value (at line 3, column 8)", or
        # "(at end of document)"; the key is the one that line assigns.
        msg = str(e)
        m = re.search(r" \(at line (\d+), column (\d+)\)$", msg)
        lines = text.splitlines() or [""]
        line, where = (int(m.group(1)), f"{m.group(1)}:{m.group(2)}") if m else \
            (len(lines), str(len(lines)))
        key = re.match(r"\s*([\w.\"'-]+)\s*=", lines[min(line, len(lines)) - 1])
        raise ConfigError(f"{path}:{where}: {key.group(1) + ': ' if key else ''}not TOML: "
                          f"{re.sub(r' [(]at (line|end).*', '', msg)}") from None
    return from_dict(doc, _Lines(text), str(path))


def from_dict(doc: dict[str, Any], lines: _Lines, name: str) -> Config:
    """Check a parsed document; `lines` and `name` only place the errors."""

    def fail(key: str, table: int | None, what: str) -> ConfigError:
        label = key if table is None else f"listen[{table}].{key}"
        return ConfigError(f"{name}:{lines.of(key, table)}: {label}: {what}")

    def get(d: dict, key: str, table: int | None, check, default=None):
        if key not in d:
            return default
        try:
            return check(d[key])
        except UsageError as e:
            raise fail(key, table, str(e)) from None

    for key in doc:
        if key not in TOP_KEYS:
            raise fail(key, None, f"unknown key; the top level takes {', '.join(TOP_KEYS)}")
    tables = doc.get("listen")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{name}:{lines.of('listen')}: listen: the file needs at least one "
                          "[[listen]] table (with bind and upstreams)")
    listeners: list[ListenConfig] = []
    seen: dict[tuple[str, int], int] = {}
    for n, t in enumerate(tables):
        for key in t:
            if key not in LISTEN_KEYS:
                raise fail(key, n, f"unknown key; [[listen]] takes {', '.join(LISTEN_KEYS)}")
        for key in ("bind", "upstreams"):
            if key not in t:
                raise fail(key, n, "missing: every [[listen]] needs bind and upstreams")
        bind = get(t, "bind", n, _address(listen=True))
        if bind in seen:
            raise fail("bind", n, f"{fmt_addr(bind)} is bound by listen[{seen[bind]}] already")
        seen[bind] = n
        upstreams = get(t, "upstreams", n, _upstreams)
        listeners.append(ListenConfig(
            bind=bind, upstreams=upstreams,
            idle=get(t, "idle", n, _seconds("idle")),
            max_conns=get(t, "max_conns", n, _count, 0),
            send_proxy=get(t, "send_proxy", n, _string("send_proxy")),
        ))
    return Config(
        listeners=tuple(listeners),
        backend=get(doc, "backend", None, _string("backend")),
        backlog_cap=get(doc, "backlog_cap", None, _backlog_cap),
        metrics=get(doc, "metrics", None, _address(listen=True)),
        grace=get(doc, "grace", None, _seconds("grace"), 5.0),
        connect_timeout=get(doc, "connect_timeout", None, _seconds("connect_timeout"), 3.0),
        splice_after=get(doc, "splice_after", None, _seconds("splice_after"), SPLICE_AFTER),
        workers=get(doc, "workers", None, _workers, 1),
    )


# -- one parser per kind of value: the TOML type, then the value's check,
#    proxy.CHECKS (the same as the command line's). Each raises UsageError
#    with the end of a sentence that the key starts.

def _typed(value: Any, kinds: tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UsageError(f"must be {what}, not {type(value).__name__} {value!r}")
    return value


def _address(*, listen: bool):
    def check(value: Any) -> tuple[str, int]:
        host, port = parse_addr(_typed(value, (str,), 'a "HOST:PORT" string'), listen=listen)
        resolve(host, port, "address")
        return host, port
    return check


def _upstreams(value: Any) -> tuple[tuple[str, int], ...]:
    _typed(value, (list,), 'a list of "HOST:PORT" strings')
    if not value:
        raise UsageError("must list at least one upstream")
    return tuple(_address(listen=False)(v) for v in value)


def _seconds(key: str):
    def check(value: Any) -> float:
        v = _typed(value, (int, float), "a number of seconds")
        if isinstance(v, int) and abs(v) > 1 << 53:   # float() of a huge int overflows
            v = math.copysign(math.inf, v)
        return float(CHECKS[key](v))
    return check


def _count(value: Any) -> int:
    return CHECKS["max_conns"](_typed(value, (int,), "a whole number"))


def _workers(value: Any) -> int:
    return CHECKS["workers"](_typed(value, (int,), "a whole number"))


def _backlog_cap(value: Any) -> int:
    v = _typed(value, (int, str), 'a byte count (65536, or "4M")')
    return CHECKS["backlog_cap"](parse_size(v) if isinstance(v, str) else v)


def _string(key: str):
    """One of the setting's names (backend, send_proxy): a wrong type is
    told as the choice it is not."""
    return lambda value: CHECKS[key](value)
