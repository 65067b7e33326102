/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Tells a reset from a FIN on a spliced source.
 *
 * Both end the stream with RCV_SHUTDOWN, and the controller sees the same
 * EPOLLRDHUP for either. The error a reset leaves in sk_err is no help:
 * the first send on the socket consumes it, and when the socket is also
 * the drain of the other direction, that send is the kernel's own psock
 * backlog worker. So the reset is recorded here, as it arrives, in the
 * splice's stats slot; the controller ends the splice with it once it has
 * moved every byte that came before.
 *
 * A raw tracepoint: a kprobe or fentry on tcp_done_with_error() would see
 * timeouts too, but neither attaches on every kernel we run on (no tracefs,
 * no ftrace), and a raw tracepoint needs neither. It reads only fields of
 * struct sock_common, whose layout has held for years: bcc may compile
 * against headers older than the running kernel (scripts/setup.sh), and
 * a deeper field of struct sock would be read at the wrong offset.
 */
#include <net/sock.h>
#include <net/tcp_states.h>
#include "sosplice_maps.h"

RAW_TRACEPOINT_PROBE(tcp_receive_reset)
{
	struct sock *sk = (struct sock *)ctx->args[0];
	struct splice_stats *st;
	struct splice_ctl *c;
	__u64 cookie = 0;
	__u8 state = 0;
	__u32 *slot;

	/* The cookie was made when the socket was spliced (SO_COOKIE), so
	 * reading it here never races its creation. */
	bpf_probe_read_kernel(&cookie, sizeof(cookie), &sk->__sk_common.skc_cookie);
	slot = slots.lookup(&cookie);
	if (!slot)
		return 0;
	c = ctl.lookup(slot);
	st = stats.lookup(slot);
	/* The owner first: _claim_slot (loader/sosplice/_sockmap.py) zeroes
	 * the stats before it names the owner (the stats-reset ordering, see
	 * sk_skb_verdict.c), so an error recorded once the owner is ours is
	 * never wiped by that reset. */
	if (!c || !st || c->source != cookie)
		return 0;
	/* This runs before tcp_reset() acts. A reset after the peer's FIN
	 * (CLOSE_WAIT) cuts nothing of the stream: it came whole; one in CLOSE
	 * is ignored by tcp_reset(). (Not a switch: clang may make it a jump
	 * table, which the verifier refuses.) */
	bpf_probe_read_kernel(&state, sizeof(state), (void *)&sk->__sk_common.skc_state);
	if (state != TCP_CLOSE_WAIT && state != TCP_CLOSE)
		st->error = ECONNRESET;
	return 0;
}
