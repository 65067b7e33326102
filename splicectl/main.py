"""splicectl: run and watch in-kernel TCP splices (sosplice)."""
from __future__ import annotations

import argparse
import logging
import math
import sys

from . import proxy as _proxy  # stdlib and sosplice (not bcc): cheap for ls/top too

EPILOG = """\
examples:
  splicectl demo
      spliced vs userspace relay on loopback, every byte hash-checked
  splicectl proxy 127.0.0.1:8080 127.0.0.1:9000 127.0.0.1:9001
      proxy port 8080 to two upstreams, round robin
  splicectl proxy [::]:8443 [::1]:443 --idle 300 --max-conns 1000 --metrics 127.0.0.1:9100
  splicectl proxy --config /etc/splicectl/proxy.toml
      every listener of the file; SIGHUP reloads it
  splicectl ls                 every splice on this host, one table
  splicectl ls --json          the same as a JSON list
  splicectl top 0.5 --sort rate    refresh every 0.5 s, busiest first; q quits
"""


PROXY_DESCRIPTION = """\
Accept on LISTEN, connect to an UPSTREAM (round robin), relay the first
bytes and splice both ways in the kernel once the connection shows bulk
(--splice-after). Or, with --config FILE, do that for every [[listen]]
table of a TOML file, in one process with one engine (or --workers N
processes, each with its own):

  backend = "auto"              # optional, as --backend
  backlog_cap = "4M"            # optional, as --backlog-cap
  metrics = "127.0.0.1:9100"    # optional, as --metrics
  grace = 5                     # optional, as --grace
  connect_timeout = 3           # optional, as --connect-timeout
  splice_after = 0.5            # optional, as --splice-after
  workers = 2                   # optional, as --workers

  [[listen]]
  bind = "0.0.0.0:8080"                        # required, as LISTEN
  upstreams = ["10.0.0.1:80", "10.0.0.2:80"]   # required, as UPSTREAM...
  idle = 300                    # optional, as --idle
  max_conns = 1000              # optional, as --max-conns
  send_proxy = "v2"             # optional: PROXY protocol header, v1 or v2

A bad file is refused with one line (FILE:LINE: KEY: ...) before any port
is bound. SIGHUP reads the file again: new listeners start, removed ones
stop accepting, live connections go on untouched; a bad file keeps the
running configuration (logged as an error). backend, backlog_cap,
metrics and workers change on restart only.

send_proxy writes HAProxy's PROXY protocol header (v1 text, v2 binary)
with the client's address to the upstream before the first byte.

The first line printed says where the proxy listens and which backend it
runs on, and why if auto could not have bpf.

How a connection ends: a FIN from either side is passed on as a FIN, and
the other direction goes on. Anything else resets both sides, never a
FIN, so that no peer takes a cut stream for a whole one: a reset or a
failed send on either side, --idle, the end of --grace, a refused splice.

Durations (S) are seconds, from 0.001 to 2000000.
"""


VIEW_DESCRIPTION = {
    "ls": "List the connections that sosplice engines on this host splice, one row\n"
          "per connection (its two directions side by side), live ones first.\n",
    "top": "Show the connections that sosplice engines on this host splice, one\n"
           "row per connection, again every INTERVAL seconds, with the aggregate\n"
           "throughput of the last minute as a sparkline.\n",
}

VIEW_EPILOG = """\
header:
  live and ended connections, the process (or how many), bytes moved and
  the share moved in the kernel, the throughput now, the time.

columns (80 wide at most; addresses are cut on the left before any
number is, and IPv4 clients of a dual-stack [::] listener show as IPv4):
  PID     the process that splices (shown in the header when only one)
  A, B    the two peers: A is the source of the connection's first splice
          (for splicectl proxy the client), B the other (the upstream)
  A→B     bytes moved from A to B; A←B from B to A (blank: a one-way
          splice). K, M, G: powers of 1024
  KERN    share of the bytes moved in the kernel, without a copy through
          the process (bpf backend: the rest went through its copy path)
  RATE    bytes per second both ways, between the last two readings
  IDLE    time since the last byte either way (s, m: minutes, h: hours;
          - once the connection has ended)
  LIMIT   the splices' max= bytes / idle= seconds (only when one is set)
  STATE   one word when both directions agree, else A→B/A←B

states:
  active      bytes flow; active* means they wait for the drain (bpf:
              the copy path; worker: a full drain)
  flush R     ended for reason R, still handing over the bytes it holds
  EOF         ended cleanly (the source sent its FIN)
  ECONNRESET  the source was reset; EPIPE: the drain failed; ETIMEDOUT:
              idle= ran out; EFBIG: max= reached
  ~           after RATE: an average since the start (no two readings yet)

files:
  /run/sosplice/<pid>-<n>.json  each engine's snapshot, rewritten every
              0.2 s while a viewer keeps touching /run/sosplice/watch
              (so an engine spends nothing on it when no one looks)

environment:
  SOSPLICE_RUN_DIR  the directory instead of /run/sosplice
  COLUMNS           the width, if narrower than 80 (rich reads it)
"""

TOP_KEYS = """
keys (in a terminal):
  b  sort by bytes     r  sort by rate     a  sort by age
  q  quit (as Ctrl-C)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (try --help)\n")
        raise SystemExit(2)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def _checked(check):
    """argparse type from one of proxy's checks: its UsageError becomes
    argparse's one-line error, which names the option."""
    def parse(text: str):
        try:
            return check(text)
        except _proxy.UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _setting(key: str, parse):
    """argparse type: `parse` the text, then proxy.CHECKS[key] (the same
    check as the config file's)."""
    def check(text: str):
        return _proxy.CHECKS[key](parse(text))
    return _checked(check)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _proxy.UsageError(f"{text!r} is not a number of seconds") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _proxy.UsageError(f"{text!r} is not a whole number") from None


def _size(text: str) -> int:
    from .config import parse_size
    return parse_size(text)


def _addr(*, listen: bool):
    """argparse type: HOST:PORT (proxy.parse_addr) as (host, port)."""
    return _checked(lambda text: _proxy.parse_addr(text, listen=listen))


class _Version(argparse.Action):
    """--version: prints sosplice's version and exits."""

    def __init__(self, option_strings, dest, **kw) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import sosplice
        print(f"splicectl {sosplice.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="splicectl", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    px = sub.add_parser("proxy", help="TCP proxy that splices in the kernel",
                        description=PROXY_DESCRIPTION,
                        epilog="example: splicectl proxy 127.0.0.1:8080 127.0.0.1:9000 [::1]:9001",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    px.add_argument("listen", metavar="LISTEN", type=_addr(listen=True), nargs="?",
                    help="address to accept on, e.g. 127.0.0.1:8080 or [::1]:8080")
    px.add_argument("upstream", metavar="UPSTREAM", nargs="*", type=_addr(listen=False),
                    help="upstream address(es)")
    px.add_argument("--config", metavar="FILE", default=None,
                    help="a TOML file of [[listen]] tables (above) instead of LISTEN, "
                         "UPSTREAM and the options that set what it sets")
    px.add_argument("--check", action="store_true",
                    help="with --config: check the file (values, host names), say so and exit")
    px.add_argument("--connect-timeout", type=_setting("connect_timeout", _float),
                    default=None, metavar="S",
                    help="upstream connect timeout in seconds (default 3)")
    px.add_argument("--idle", type=_setting("idle", _float),
                    default=None, metavar="S",
                    help="reset a connection in which neither direction has moved a byte "
                         "for S seconds (as socat -T, HAProxy's timeout tunnel); it fires "
                         "S to 1.25*S after the last byte. One quiet direction never ends "
                         "it (default: no timeout)")
    px.add_argument("--max-conns", type=_setting("max_conns", _int),
                    default=None, metavar="N",
                    help="stop accepting beyond N live connections (0 = no limit); the fd "
                         "limit is raised to fit N, up to its hard limit")
    px.add_argument("--backlog-cap", type=_setting("backlog_cap", _size),
                    default=None, metavar="BYTES",
                    help="kernel bytes held per splice beyond socket buffers, 64K to 256M "
                         "(default 4M)")
    px.add_argument("--metrics", metavar="HOST:PORT", default=None, type=_addr(listen=True),
                    help="serve Prometheus metrics over HTTP here (docs/observing.md lists "
                         "them)")
    px.add_argument("--splice-after", type=_setting("splice_after", _float),
                    default=None, metavar="S",
                    help="relay a connection in the proxy (recv and send, as HAProxy's "
                         "splice-auto) until it shows bulk (a full 64 KiB read, a drain "
                         "that does not take a send whole, 256 KiB in all) or has been "
                         "relayed for S seconds with both directions open, then splice "
                         "it; one whose one direction ended first is relayed to its end "
                         "(default 0.5; 0: splice at once)")
    px.add_argument("--grace", type=_setting("grace", _float),
                    default=None, metavar="S",
                    help="on SIGINT/SIGTERM stop accepting and let connections finish for S "
                         "seconds, then reset those still open (default 5; 0: at once)")
    px.add_argument("--workers", type=_setting("workers", _int), default=None, metavar="N",
                    help="run N processes, each with its own loop and engine, sharing the "
                         "listening addresses (SO_REUSEPORT), as HAProxy runs a thread per "
                         "CPU; --max-conns is shared among them (default 1)")
    px.add_argument("--no-check", action="store_true",
                    help="do not check that every upstream is reachable at start")
    px.add_argument("--backend", choices=_proxy.BACKENDS, default=None,
                    help="bpf (eBPF sockmap, needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN), worker "
                         "(splice(2) threads, any user) or auto (bpf if it loads, else worker); "
                         "default $SOSPLICE_BACKEND or auto")
    px.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"],
                    help="info (the default) writes one line per connection when it ends "
                         "(addresses, bytes each way, in-kernel share, duration, why each "
                         "direction ended; docs/observing.md); warning keeps only problems")

    dm = sub.add_parser("demo", help="spliced proxy vs userspace relay, hash-checked")
    dm.add_argument("--seconds", type=_positive_float, default=5.0, help="spliced run length (default 5)")
    dm.add_argument("--conns", type=int, default=8, help="concurrent connections (default 8)")
    dm.add_argument("--no-live", action="store_true", help="do not show the live table")

    for name, hlp in (("ls", "list the connections spliced on this host"),
                      ("top", "live view of the connections spliced on this host")):
        v = sub.add_parser(name, help=hlp, description=VIEW_DESCRIPTION[name],
                           epilog=VIEW_EPILOG + (TOP_KEYS if name == "top" else ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "top":
            v.add_argument("interval", nargs="?", type=_positive_float, default=1.0,
                           help="seconds between refreshes (default 1)")
            v.add_argument("count", nargs="?", type=_checked(lambda t: _proxy.check_count(_int(t))),
                           default=0,
                           help="refresh this many times, then exit (default 0: until q)")
            v.add_argument("-b", "--batch", action="store_true",
                           help="print one frame after another, each ending with a newline, "
                                "for pipes and logs (as top -b); the default when stdout is "
                                "not a terminal")
        else:
            v.add_argument("--json", action="store_true",
                           help="print a JSON list, one object per splice (per direction), "
                                "with exact numbers")
        v.add_argument("--sort", choices=["bytes", "rate", "age"], default="bytes",
                       help="order of the rows: most bytes (both ways), highest rate or "
                            "oldest first (default bytes)")
        v.add_argument("--wide", action="store_true",
                       help="more columns, wider than 80: PID and PROCESS always, local "
                            "addresses, LIMIT, AGE, COOKIES")
        v.add_argument("--all", action="store_true",
                       help="every ended connection the engines still report, not only 10")
        v.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                       help="only the splices of this process (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 2
    try:
        if args.cmd == "proxy":
            from . import proxy
            logging.basicConfig(level=args.log_level.upper(),
                                format="%(asctime)s splicectl %(levelname)s %(message)s")
            try:
                return proxy.run_cli(args)
            except (proxy.UsageError, ValueError) as e:
                sys.stderr.write(f"splicectl proxy: {e}\n")
                return 2
        if args.cmd == "demo":
            from . import demo
            return demo.run(args)
        from . import view
        if args.cmd == "ls":
            return view.ls(args)
        return view.top(args)
    except KeyboardInterrupt:
        return 130
    except PermissionError as e:
        sys.stderr.write(f"splicectl {args.cmd}: {e.strerror or e} (run as root, grant "
                         "CAP_BPF+CAP_NET_ADMIN, or use --backend worker)\n")
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
