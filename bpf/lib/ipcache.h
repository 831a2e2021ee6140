/* ipcache: the identity of a peer address.
 *
 *   __u32 id = ipcache_identity(addr, &addr_id);     IPv4, network byte order
 *   __u32 id = ipcache6_identity(addr, &addr_id);    IPv6, __u32[4] in network byte order
 *
 * `addr_id` gets the address's own identity (a pod address inside an ipBlock), or 0.
 * Longest-prefix match in the node's `ipcache` / `ipcache6` maps (see abi/endpoint.h).
 * The agent keeps 0.0.0.0/0 and ::/0 -> the family's world identity in them; a miss means
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

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache6_key);
	__type(value, struct ipcache_value);
} ipcache6 SEC(".maps");

static __always_inline __u32 ipcache_identity(__u32 addr, __u32 *addr_identity)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = bpf_map_lookup_elem(&ipcache, &key);

	*addr_identity = v ? v->addr_identity : 0;
	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline __u32 ipcache6_identity(const __u32 *addr, __u32 *addr_identity)
{
	struct ipcache6_key key = { .prefixlen = 128 };
	struct ipcache_value *v;

	__builtin_memcpy(key.addr, addr, 16);
	v = bpf_map_lookup_elem(&ipcache6, &key);
	*addr_identity = v ? v->addr_identity : 0;
	return v ? v->identity : IDENTITY_WORLD_IPV6;
}

#endif
