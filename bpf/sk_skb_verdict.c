/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The data path: one verdict per skb that arrives on a spliced source.
 *
 * Redirect the skb to the drain while three things hold, pass it otherwise:
 *   - the source has a splice_ctl entry (it is spliced);
 *   - every byte passed earlier has been copied by the controller
 *     (passed == copied), so a redirected skb can never overtake one that
 *     waits in the source's queue: this is what keeps bytes in order
 *     across the fast (redirect) and slow (controller copy) paths;
 *   - the redirect stays within credit, which the controller sets to
 *     min(byte limit, bytes the drain has taken + backlog cap): the exact
 *     limit and the memory bound both come from this one comparison.
 * Passed bytes stay in the source's receive queue, charged to its receive
 * buffer, so a stalled drain slows the source's peer through TCP flow
 * control (KERNEL-NOTES 5, 6).
 *
 * Verdicts on one socket run one at a time (under the socket lock, from
 * its data_ready path), so the counters of a splice have one writer.
 */
#include <uapi/linux/bpf.h>
#include "sosplice.h"

static __always_inline void notify(__u64 source, __u64 moved)
{
	struct splice_event ev = { .source = source, .moved = moved };

	events.ringbuf_output(&ev, sizeof(ev), 0);
}

int sk_skb_verdict(struct __sk_buff *skb)
{
	struct splice_stats *st;
	struct splice_ctl *c;
	__u64 cookie, len, moved;

	/* A pure FIN arrives as a zero-length skb, and no program may let it
	 * reach a psock backlog: redirected, it makes the drain's backlog fail
	 * with EPIPE and drop everything after it (KERNEL-NOTES 12); passed
	 * while this socket's own backlog is not empty (it is also the drain
	 * of the other direction), it is queued behind that backlog and does
	 * the same to it. Dropping it loses nothing: TCP has already taken the
	 * FIN (RCV_SHUTDOWN), and recv() still returns EOF. Measured on 6.18:
	 * tests/test_transfer.py::test_eof_one_way_while_other_way_busy. */
	len = skb->len;
	if (len == 0)
		return SK_DROP;

	cookie = bpf_get_socket_cookie(skb);
	c = ctl.lookup(&cookie);
	if (!c)
		return SK_PASS;
	st = stats.lookup(&cookie);
	if (!st)
		return SK_PASS;

	moved = st->moved;
	if (st->passed != c->copied || moved + len > c->credit) {
		st->passed += len;
		return SK_PASS;
	}

	st->moved = moved + len;
	st->last_ns = bpf_ktime_get_ns();
	if (moved < c->notify_at && moved + len >= c->notify_at)
		notify(cookie, moved + len);
	/* flags 0: egress, i.e. sent out of the drain. A drain that is not in
	 * `drains` makes this SK_DROP, which is why the controller inserts the
	 * drain before the ctl entry and deletes it only after. */
	return drains.sk_redirect_hash(skb, &c->drain, 0);
}
