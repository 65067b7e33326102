/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared between the kernel side (sk_skb_verdict.c) and the Python loader,
 * which mirrors these structs with ctypes (loader/sosplice/_maps.py; a test
 * compares the sizes). Every field is 64-bit so no padding can differ.
 *
 * Who writes what (the same legend as the Python splice record):
 *   [C] the controller, from userspace, by replacing the whole map value;
 *   [K] the verdict program, in the kernel, in place.
 * A value is written by exactly one side: userspace replacing a hash value
 * while BPF updates a field in place would lose one of the two writes.
 */
#ifndef SOSPLICE_H
#define SOSPLICE_H

#ifndef SOSPLICE_MAX_SOCKETS
#define SOSPLICE_MAX_SOCKETS 65536
#endif

/* Per splice, keyed by the source's socket cookie. Its presence is what
 * makes a source spliced: no entry, no redirect. */
struct splice_ctl {
	__u64 drain;		/* [C] drain's socket cookie, key into `drains` */
	__u64 credit;		/* [C] redirect while moved + len <= credit */
	__u64 copied;		/* [C] redirect only while passed == copied */
	__u64 notify_at;	/* [C] ring an event when moved crosses this */
};

/* Per splice, keyed by the source's socket cookie. */
struct splice_stats {
	__u64 moved;		/* [K] bytes redirected to the drain */
	__u64 passed;		/* [K] bytes left on the source for the controller */
	__u64 last_ns;		/* [K] bpf_ktime_get_ns() of the last redirect */
	__u64 pad;
};

/* What the verdict tells the controller through the `events` ring. */
struct splice_event {
	__u64 source;		/* source's socket cookie */
	__u64 moved;
};

/* Sources carry the verdict program; drains are only redirect targets and
 * carry none, so a drain's own incoming bytes take TCP's normal path and it
 * can leave its map without losing anything (KERNEL-NOTES 7 and 13). */
BPF_SOCKHASH(sources, __u64, SOSPLICE_MAX_SOCKETS);
BPF_SOCKHASH(drains, __u64, SOSPLICE_MAX_SOCKETS);
BPF_HASH(ctl, __u64, struct splice_ctl, SOSPLICE_MAX_SOCKETS);
BPF_HASH(stats, __u64, struct splice_stats, SOSPLICE_MAX_SOCKETS);
BPF_RINGBUF_OUTPUT(events, 16);

#endif /* SOSPLICE_H */
