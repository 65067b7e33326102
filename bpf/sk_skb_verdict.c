/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The data path: one verdict per skb that arrives on a spliced source.
 *
 * Redirect the skb to the drain while three things hold, pass it otherwise:
 *   - the source has a slot whose splice_ctl names it (it is spliced);
 *   - every byte passed earlier has been copied by the controller
 *     (passed == copied), so a redirected skb can never overtake one that
 *     waits in the source's queue: this is what keeps bytes in order
 *     across the fast (redirect) and slow (controller copy) paths;
 *   - the redirect stays within credit, which the controller sets to
 *     min(byte limit, bytes the drain has taken + backlog cap): the exact
 *     limit and the memory bound both come from this one comparison.
 * Passed bytes stay in the source's receive queue, charged to its receive
 * buffer, so a stalled drain slows the source's peer through TCP flow
 * control (docs/kernel-notes.md K5, K6).
 *
 * Verdicts on one socket run one at a time (under the socket lock, from
 * its data_ready path), so the counters of a splice have one writer.
 */
#include <uapi/linux/bpf.h>
#include "sosplice_maps.h"

static __always_inline void notify(__u64 source, __u64 moved)
{
	struct splice_event ev = { .source = source, .moved = moved };

	events.ringbuf_output(&ev, sizeof(ev), 0);
}

/* Fields the controller rewrites while we run: read each once, in the
 * order the controller's stores make safe (see below). */
#define READ_ONCE_U64(x) (*(volatile __u64 *)&(x))

int sk_skb_verdict(struct __sk_buff *skb)
{
	struct splice_stats *st;
	struct splice_ctl *c;
	__u64 cookie, len, moved, copied, credit, drain;
	__u32 *slot;

	/* A pure FIN arrives as a zero-length skb, and no program may let it
	 * reach a psock backlog: redirected, it makes the drain's backlog fail
	 * with EPIPE and drop everything after it (docs/kernel-notes.md K12); passed
	 * while this socket's own backlog is not empty (it is also the drain
	 * of the other direction), it is queued behind that backlog and does
	 * the same to it. Dropping it loses nothing: TCP has already taken the
	 * FIN (RCV_SHUTDOWN), and recv() still returns EOF. Measured on 6.18:
	 * tests/test_transfer.py::test_eof_one_way_while_other_way_busy. */
	len = skb->len;
	if (len == 0)
		return SK_DROP;

	cookie = bpf_get_socket_cookie(skb);
	slot = slots.lookup(&cookie);
	if (!slot)
		return SK_PASS;
	c = ctl.lookup(slot);
	st = stats.lookup(slot);
	if (!c || !st)
		return SK_PASS;
	/* The slot may have been given to another splice since `slots` was
	 * read (this source's splice ended meanwhile): its owner is checked
	 * first, and a slot that is not ours, or no longer anyone's, passes.
	 *
	 * Stats-reset ordering (relied on here and in tcp_reset.c; kept by
	 * _claim_slot in loader/sosplice/_sockmap.py): the controller zeroes
	 * this slot's stats, then writes the ctl fields (a holding entry:
	 * credit 0, copied never reached), then the owner `c->source`, and
	 * only then inserts the source into `slots`. Its stores reach us in
	 * that order (plain 8-byte stores, x86-64 keeps them in order), and
	 * the owner is the first field we read. So once the owner is ours,
	 * the stats we add to start from zero for this splice, not from the
	 * previous owner's counts, and the ctl fields are this splice's:
	 * every mix of old and new values before that passes uncounted. Were
	 * the owner written before the reset, this splice's first bytes could
	 * be counted into the previous owner's `passed` and `moved` and then
	 * wiped by the reset, and the controller's accounting (passed ==
	 * copied, moved against credit and the byte limit) would be off. */
	if (READ_ONCE_U64(c->source) != cookie)
		return SK_PASS;
	/* The controller stores credit before copied; reading copied first
	 * means a credit at least as new as it, so a copied that lets us
	 * redirect never comes with a credit from before the bytes it counts
	 * were taken (that would overshoot an exact limit). */
	copied = READ_ONCE_U64(c->copied);
	credit = READ_ONCE_U64(c->credit);
	drain = READ_ONCE_U64(c->drain);

	/* Volatile too: a plain load may be hoisted above the owner check,
	 * and would then read the previous owner's counts (see above). */
	moved = READ_ONCE_U64(st->moved);
	if (READ_ONCE_U64(st->passed) != copied || moved + len > credit) {
		st->passed += len;
		return SK_PASS;
	}

	st->moved = moved + len;
	st->last_ns = bpf_ktime_get_ns();
	if (moved < c->notify_at && moved + len >= c->notify_at)
		notify(cookie, moved + len);
	/* flags 0: egress, i.e. sent out of the drain. A drain that is not in
	 * `drains` makes this SK_DROP, which is why the controller inserts the
	 * drain before it gives the slot its owner and deletes it only after
	 * taking the owner away. */
	return drains.sk_redirect_hash(skb, &drain, 0);
}
