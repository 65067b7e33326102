"""Loading the BPF side: compile bpf/*.c with bcc, attach, expose the maps.

Stages, each with its own failure message (libbpf-bootstrap's loader):
check the kernel and privilege, compile and verify, attach the verdict to
the `sources` map, open the maps. `Programs.close()` undoes them in reverse.
"""
from __future__ import annotations

import ctypes as ct
import errno
import mmap
import os
import platform
import re
from pathlib import Path

from ._maps import SpliceCtl, SpliceStats

# Two egress-backlog bugs that lose or duplicate bytes were fixed in 6.16
# (docs/kernel-notes.md K16). Splicing on an older kernel can corrupt a stream
# silently, so we refuse.
MIN_KERNEL = (6, 16)

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# Compiled as one object: they share the maps of sosplice_maps.h.
SOURCES = ("sk_skb_verdict.c", "tcp_reset.c")

BPF_ANY = 0
BPF_NOEXIST = 1


def bpf_dir() -> Path:
    """Where the BPF C sources live: $SOSPLICE_BPF_DIR, else the installed
    package's bpf/ (package data), else the checkout's top-level bpf/."""
    env = os.environ.get("SOSPLICE_BPF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    installed, checkout = here / "bpf", here.parent.parent / "bpf"
    return installed if (installed / SOURCES[0]).is_file() else checkout


def _fail(kind: type[OSError], code: int, message: str, brief: str) -> OSError:
    """An OSError whose `brief` says the cause in a few words, for
    `load_failure()`: the message tells what to do, the brief fits a
    banner ("EPERM, needs CAP_BPF")."""
    e = kind(code, message)
    e.brief = brief  # type: ignore[attr-defined]
    return e


def load_failure(e: BaseException) -> str:
    """Why the bpf backend could not load, in one short phrase:
    "EPERM, needs CAP_BPF", "ENOEXEC, compile failed: ...". Any exception
    (bcc raises bare Exception) gives something readable."""
    code = getattr(e, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    brief = getattr(e, "brief", None)
    if brief is None:
        text = getattr(e, "strerror", None) or str(e) or type(e).__name__
        brief = text.removeprefix("sosplice: ").splitlines()[0][:80]
    return f"{name}, {brief}" if name else brief


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    if not m:
        raise OSError(errno.ENOSYS, f"sosplice: cannot parse kernel release {release!r}")
    return int(m.group(1)), int(m.group(2))


def check_kernel(release: str | None = None) -> None:
    """Refuse kernels whose sockmap can corrupt a stream."""
    have = kernel_version(release)
    if have < MIN_KERNEL:
        raise _fail(
            OSError, errno.ENOSYS,
            f"sosplice: kernel {have[0]}.{have[1]} is older than "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]}; its sockmap redirect can lose or "
            "duplicate bytes. Upgrade the kernel (6.16 or a stable kernel with "
            "the sockmap backlog fixes).",
            f"kernel {have[0]}.{have[1]} < {MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
        )


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_caps(caps: int | None = None) -> list[str]:
    """The capabilities loading the programs needs and the process lacks.

    CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (kernels before
    5.8 knew only it); CAP_NET_ADMIN is needed either way (sockmap).
    """
    caps = _effective_caps() if caps is None else caps
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    need = [] if has(CAP_SYS_ADMIN) else [n for c, n in ((CAP_BPF, "CAP_BPF"),
                                                         (CAP_PERFMON, "CAP_PERFMON")) if not has(c)]
    return need + ([] if has(CAP_NET_ADMIN) else ["CAP_NET_ADMIN"])


def check_privilege() -> None:
    missing = missing_caps()
    if missing:
        raise _fail(
            PermissionError, errno.EPERM,
            "sosplice: loading the BPF programs needs CAP_BPF and CAP_PERFMON (or "
            "CAP_SYS_ADMIN) and CAP_NET_ADMIN; run as root or grant them, e.g. "
            "`setcap cap_bpf,cap_perfmon,cap_net_admin+ep` on the interpreter; or use the "
            "worker backend, which needs neither (backend=\"worker\" or "
            "SOSPLICE_BACKEND=worker)",
            "needs " + ", ".join(missing),
        )


class Programs:
    """The compiled verdict program and its maps, attached and ready."""

    def __init__(self, max_sockets: int = 65536) -> None:
        check_kernel()
        check_privilege()
        try:
            from bcc import BPF, BPFAttachType, libbcc
        except ImportError as e:
            raise _fail(
                OSError, errno.ENOENT,
                "sosplice: bcc is not importable; install Debian's python3-bpfcc "
                "and use a virtualenv made with --system-site-packages "
                "(`make setup` does both)",
                "bcc not importable (python3-bpfcc)",
            ) from e
        self._lib = libbcc.lib
        where = bpf_dir()
        missing = [n for n in SOURCES if not (where / n).is_file()]
        if missing:
            raise _fail(
                OSError, errno.ENOENT,
                f"sosplice: the BPF sources {', '.join(missing)} are not in {where}; "
                "reinstall the package (they are its package data) or point "
                "SOSPLICE_BPF_DIR at them",
                f"no BPF sources in {where}",
            )
        try:
            # One text, not #includes: bcc rewrites map calls
            # (`slots.lookup(...)`) only in its main file. It attaches the
            # reset probe (a raw tracepoint) itself.
            self.bpf = BPF(
                text=b"\n".join((where / name).read_bytes() for name in SOURCES),
                cflags=[f"-I{where}", f"-DSOSPLICE_MAX_SOCKETS={int(max_sockets)}"],
            )
            fn = self.bpf.load_func(b"sk_skb_verdict", BPF.SK_SKB)
        except Exception as e:  # bcc raises bare Exception on compile/verify errors
            raise _fail(
                OSError, errno.ENOEXEC,
                f"sosplice: compiling or verifying {', '.join(SOURCES)} in {where} failed: {e}. "
                "Is `make setup` done (kernel headers for bcc)?",
                "compile or verify failed (kernel headers for bcc?)",
            ) from e
        self.sources_fd = self._map_fd(b"sources")
        self.drains_fd = self._map_fd(b"drains")
        try:
            BPF.attach_func(fn, self.sources_fd, BPFAttachType.SK_SKB_VERDICT)
        except Exception as e:
            self.bpf.cleanup()
            raise _fail(OSError, errno.EOPNOTSUPP, f"sosplice: attaching the verdict failed: {e}",
                        "attaching the verdict failed") from e
        self._fn = fn
        self.slots_fd = self._map_fd(b"slots")
        # The two per-slot arrays, mapped into this process: the controller
        # writes ctl fields and reads the verdict's stats with plain loads
        # and stores, no syscall, and never replaces a value the verdict
        # may be reading (docs/design.md).
        self._mmaps = [self._mmap(b"ctl", ct.sizeof(SpliceCtl) * max_sockets),
                       self._mmap(b"stats", ct.sizeof(SpliceStats) * max_sockets)]
        self.ctl = (SpliceCtl * max_sockets).from_buffer(self._mmaps[0])
        self.stats = (SpliceStats * max_sockets).from_buffer(self._mmaps[1])
        self.events_fd = self._map_fd(b"events")
        # One ring buffer callback for the life of the programs; the engine
        # that owns them now sets `on_event` (see _sockmap.adopt_programs).
        self.max_sockets = max_sockets
        self.on_event = None
        self.bpf[b"events"].open_ring_buffer(self._dispatch)

    def _dispatch(self, ctx: object, data: object, size: int) -> None:
        if self.on_event is not None:
            self.on_event(ctx, data, size)

    def _map_fd(self, name: bytes) -> int:
        return self._lib.bpf_table_fd(self.bpf.module, name)

    def _mmap(self, name: bytes, size: int) -> mmap.mmap:
        size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        return mmap.mmap(self._map_fd(name), size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)


    # bcc's Table refuses sockhash maps (docs/kernel-notes.md, bcc), so these go through
    # libbcc directly on the map fd. Every such map is keyed by a socket
    # cookie and holds a u32: an fd for the two sockhashes, a slot in `slots`.
    def insert(self, map_fd: int, cookie: int, value: int) -> None:
        key = ct.c_uint64(cookie)
        val = ct.c_uint32(value)
        if self._lib.bpf_update_elem(map_fd, ct.byref(key), ct.byref(val), BPF_NOEXIST) < 0:
            err = ct.get_errno()
            raise OSError(err, os.strerror(err))

    def delete(self, map_fd: int, cookie: int) -> None:
        key = ct.c_uint64(cookie)
        self._lib.bpf_delete_elem(map_fd, ct.byref(key))

    def keys(self, map_fd: int) -> set[int]:
        keys: set[int] = set()
        key = ct.c_uint64(0)
        nxt = ct.c_uint64(0)
        prev = None
        while self._lib.bpf_get_next_key(map_fd, prev, ct.byref(nxt)) == 0:
            keys.add(nxt.value)
            key.value = nxt.value
            prev = ct.byref(key)
        return keys

    def close(self) -> None:
        from bcc import BPF, BPFAttachType

        try:
            BPF.detach_func(self._fn, self.sources_fd, BPFAttachType.SK_SKB_VERDICT)
        except Exception:
            pass
        del self.ctl, self.stats
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:  # a caller still holds a row; the GC unmaps it
                pass
        self.bpf.cleanup()
