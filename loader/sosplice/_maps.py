"""ctypes mirrors of bpf/sosplice_abi.h (tests/test_internals.py checks every
field's offset and size against the header)."""
from __future__ import annotations

import ctypes as ct


class SpliceCtl(ct.Structure):
    _fields_ = [
        ("source", ct.c_uint64),
        ("drain", ct.c_uint64),
        ("credit", ct.c_uint64),
        ("copied", ct.c_uint64),
        ("notify_at", ct.c_uint64),
        ("pad", ct.c_uint64 * 3),
    ]


class SpliceStats(ct.Structure):
    _fields_ = [
        ("moved", ct.c_uint64),
        ("passed", ct.c_uint64),
        ("last_ns", ct.c_uint64),
        ("error", ct.c_uint64),
    ]


class SpliceEvent(ct.Structure):
    _fields_ = [("source", ct.c_uint64), ("moved", ct.c_uint64)]


U64 = 1 << 64
