/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Tells a reset from a FIN on a spliced source.
 *
 * Both end the stream with RCV_SHUTDOWN, and the controller sees the same
 * EPOLLRDHUP for either. The error a reset leaves in sk_err is no help:
 * the first send on the socket consumes it, and when the socket is also
 * the drain of the other direction, that send is the kernel's own psock
 * backlog worker. So the reset is recorded here, as it arrives, in the
 * splice's stats slot; the controller ends the splice with that error
 * once it has moved every byte that came before it.
 *
 * A raw tracepoint, not a tracepoint: attaching it needs no tracefs.
 */
#include <net/sock.h>
#include <net/tcp_states.h>
#include "sosplice.h"

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
	if (!c || !st || c->source != cookie)
		return 0;
	/* A reset after the peer's FIN (CLOSE_WAIT) cuts nothing of the
	 * stream: it came whole; tcp_reset() ignores one in CLOSE. (Not a
	 * switch: clang may make it a jump table, which the verifier refuses.) */
	bpf_probe_read_kernel(&state, sizeof(state), (void *)&sk->__sk_common.skc_state);
	if (state != TCP_CLOSE_WAIT && state != TCP_CLOSE)
		st->reset = ECONNRESET;
	return 0;
}
