// SPDX-License-Identifier: GPL-2.0
/* Compiles, but the verifier must reject it: it reads a packet byte without a bounds
 * check. The loader test expects the verifier's complaint in the LoadError. */
#include "include/common.h"

SEC("xdp")
int unchecked_read(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;

	return data[20] == 0x45 ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
