/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The maps the BPF programs share, in bcc's map macros (so only bcc
 * compiles this header). _bpf.py compiles the programs as one text with
 * -I at this directory and -DSOSPLICE_MAX_SOCKETS; the loader opens the
 * maps by these names. Their value types are the struct ABI of
 * sosplice_abi.h.
 */
#ifndef SOSPLICE_MAPS_H
#define SOSPLICE_MAPS_H

#include "sosplice_abi.h"

#ifndef SOSPLICE_MAX_SOCKETS
#define SOSPLICE_MAX_SOCKETS 65536
#endif

/* Sources carry the verdict program; drains are only redirect targets and
 * carry none, so a drain's own incoming bytes take TCP's normal path and it
 * can leave its map without losing anything (docs/kernel-notes.md K7, K13). */
BPF_SOCKHASH(sources, __u64, SOSPLICE_MAX_SOCKETS);
BPF_SOCKHASH(drains, __u64, SOSPLICE_MAX_SOCKETS);
/* Source cookie -> slot. Only inserted and deleted, never replaced, so the
 * element of a live splice never changes under the verdict. */
BPF_HASH(slots, __u64, __u32, SOSPLICE_MAX_SOCKETS);
BPF_F_TABLE("array", __u32, struct splice_ctl, ctl, SOSPLICE_MAX_SOCKETS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct splice_stats, stats, SOSPLICE_MAX_SOCKETS, BPF_F_MMAPABLE);
BPF_RINGBUF_OUTPUT(events, 16);

#endif /* SOSPLICE_MAPS_H */
