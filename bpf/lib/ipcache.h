/* ipcache: the identity of a peer address.
 *
 *   __u32 id = ipcache_identity(addr);   addr in network byte order
 *
 * Longest-prefix match in the node's `ipcache` map (struct ipcache_key -> ipcache_value,
 * see abi/endpoint.h). The agent keeps 0.0.0.0/0 -> IDENTITY_WORLD in it; a miss means
 * world too, so an empty or half-written map never yields an identity a policy trusts.
 */
#ifndef MEMBRANE_LIB_IPCACHE_H
#define MEMBRANE_LIB_IPCACHE_H

#include "abi/endpoint.h"

#define IPCACHE_MAX_ENTRIES 65536

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
} ipcache SEC(".maps");

static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = bpf_map_lookup_elem(&ipcache, &key);

	return v ? v->identity : IDENTITY_WORLD;
}

#endif
