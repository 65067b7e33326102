/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The struct ABI shared by the kernel side and the Python loader, which
 * mirrors these structs with ctypes (loader/sosplice/_maps.py; a test,
 * tests/test_internals.py, compiles this header and compares every
 * field's offset and size). Every field is 64-bit so no padding can
 * differ. Plain C: no bcc macros, so any compiler can include it. The maps
 * that hold these structs are in sosplice_maps.h.
 *
 * Who writes what (the same legend as the Python splice record):
 *   [C] the controller, from userspace, in place through an mmap;
 *   [K] the verdict program, in the kernel, in place.
 * A field is written by exactly one side, so neither needs a lock.
 */
#ifndef SOSPLICE_ABI_H
#define SOSPLICE_ABI_H

#include <linux/types.h>

/* Per splice, in slot `slot` of the `ctl` array. The controller writes the
 * fields in place through an mmap of the array, one 8-byte store each, and
 * never moves the value: the verdict reads it through a pointer, and a
 * hash map value replaced from user space is a new element whose old one
 * is handed to the next update at once, with another key's value in it
 * (docs/design.md, "Why the ctl value lives in an array"). */
struct splice_ctl {
	__u64 source;		/* [C] the source cookie this slot serves; 0: none (pass) */
	__u64 drain;		/* [C] drain's socket cookie, key into `drains` */
	__u64 credit;		/* [C] redirect while moved + len <= credit */
	__u64 copied;		/* [C] redirect only while passed == copied */
	__u64 notify_at;	/* [C] ring an event when moved crosses this */
	__u64 pad[3];		/* one cache line: apart from the verdict's stats */
};

/* Per splice, in the same slot of the `stats` array; written in place by
 * the verdict, read through the same kind of mmap by the controller. */
struct splice_stats {
	__u64 moved;		/* [K] bytes redirected to the drain */
	__u64 passed;		/* [K] bytes left on the source for the controller */
	__u64 last_ns;		/* [K] bpf_ktime_get_ns() of the last redirect */
	__u64 error;		/* [K] tcp_reset.c: ECONNRESET if the source was reset */
};

/* What the verdict tells the controller through the `events` ring. */
struct splice_event {
	__u64 source;		/* source's socket cookie */
	__u64 moved;
};

#endif /* SOSPLICE_ABI_H */
