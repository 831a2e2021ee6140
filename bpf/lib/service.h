/* Services: the maps of abi/service.h and the lookups every service path shares (the socket
 * LB in sock_lb.bpf.c, the per-packet NodePort/externalIP path).
 *
 *   struct svc_frontend *fe = svc_lookup(&key);          frontend (address, port, scope)
 *   __u32 id = svc_pick(set, fe->set, hash);             a backend of the set: by the
 *                   Maglev table (hash: the flow's jhash) or uniformly (hash: random)
 *   __u32 id = svc_affinity_get(&akey, set);             the client's backend, if fresh
 *   svc_affinity_put(&akey, id);
 *   struct svc_backend *be = svc_backend(id);            NULL: gone
 *
 * Only ACTIVE backends are ever picked: terminating and maintenance ones are in no slot and
 * no Maglev table, and an affinity naming one is ignored.
 */
#ifndef MEMBRANE_LIB_SERVICE_H
#define MEMBRANE_LIB_SERVICE_H

#include "abi/service.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SVC_MAX_FRONTENDS);
	__type(key, struct svc_frontend_key);
	__type(value, struct svc_frontend);
} svc_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SVC_MAX_SETS);
	__type(key, __u32);
	__type(value, struct svc_set);
} svc_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SVC_MAX_SLOTS);
	__type(key, struct svc_slot_key);
	__type(value, __u32);
} svc_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SVC_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct svc_backend);
} svc_backends SEC(".maps");

/* A set's Maglev table; inner maps differ in size (BPF_F_INNER_MAP) and are filled
 * through their memory before they are published (BPF_F_MMAPABLE), as lb_xdp's. */
struct svc_maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SVC_MAGLEV_DEFAULT_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, SVC_MAX_SETS);
	__type(key, __u32);
	__array(values, struct svc_maglev_table);
} svc_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SVC_MAX_REVNAT);
	__type(key, __u32);
	__type(value, struct svc_revnat);
} svc_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_AFFINITY_SIZE);
	__type(key, struct svc_affinity_key);
	__type(value, struct svc_affinity);
} svc_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_SOCK_SIZE);
	__type(key, struct svc_sock_key);
	__type(value, struct svc_sock_value);
} svc_sock SEC(".maps");

/* Written by the socket LB and the endpoint programs' per-packet translation. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_XLATE_SIZE);
	__type(key, struct svc_xlate_key);
	__type(value, __u32);
} svc_xlate SEC(".maps");

static __always_inline struct svc_frontend *svc_lookup(const struct svc_frontend_key *key)
{
	return bpf_map_lookup_elem(&svc_frontends, key);
}

static __always_inline struct svc_set *svc_set_of(__u32 set_id)
{
	return bpf_map_lookup_elem(&svc_sets, &set_id);
}

static __always_inline struct svc_backend *svc_backend(__u32 id)
{
	return bpf_map_lookup_elem(&svc_backends, &id);
}

/* Whether two 16-byte service addresses (abi/service.h: IPv4 in the first 4 bytes) are equal.
 * Both are 4-byte aligned (the head of a map value, or a __u32 array): said so, or clang
 * reads a __u8 array byte by byte (~100 instructions instead of 16). */
static __always_inline bool svc_addr_equal(const __u8 *a, const __u8 *b)
{
	const __u32 *x = __builtin_assume_aligned(a, 4), *y = __builtin_assume_aligned(b, 4);

	return !((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]));
}

/* An ACTIVE backend of the set, or 0 (no active backend). `hash` picks: the flow's hash
 * for Maglev sets, any random number for the others. A Maglev set whose table is not
 * published yet falls back to its slots. */
static __always_inline __u32 svc_pick(const struct svc_set *set, __u32 set_id, __u32 hash)
{
	struct svc_slot_key sk = { .set = set_id };
	__u32 *id;

	if (!set->count)
		return 0;
	if ((set->flags & SVC_SET_MAGLEV) && set->maglev_size) {
		void *table = bpf_map_lookup_elem(&svc_maglev, &set_id);

		if (table) {
			__u32 slot = hash % set->maglev_size;

			id = bpf_map_lookup_elem(table, &slot);
			if (id && *id)
				return *id;
		}
	}
	sk.slot = hash % set->count + 1;
	id = bpf_map_lookup_elem(&svc_slots, &sk);
	return id ? *id : 0;
}

/* The backend the client was last given by this set, if that was within the set's
 * affinity timeout and the backend is still active; else 0. */
static __always_inline __u32 svc_affinity_get(const struct svc_affinity_key *key,
					      const struct svc_set *set)
{
	struct svc_affinity *a = bpf_map_lookup_elem(&svc_affinity, key);
	struct svc_backend *be;

	if (!a)
		return 0;
	if (bpf_ktime_get_ns() - a->last_used_ns > (__u64)set->affinity_timeout * 1000000000ULL)
		return 0;
	be = svc_backend(a->backend);
	if (!be || be->state != SVC_BACKEND_ACTIVE)
		return 0;
	return a->backend;
}

static __always_inline void svc_affinity_put(const struct svc_affinity_key *key, __u32 backend)
{
	struct svc_affinity a = { .last_used_ns = bpf_ktime_get_ns(), .backend = backend };

	bpf_map_update_elem(&svc_affinity, key, &a, BPF_ANY);
}

#endif
