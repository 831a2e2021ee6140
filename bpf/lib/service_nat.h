/* Per-packet ClusterIP translation for the endpoint programs: a pod's packet to a service
 * frontend that no socket LB hook translated (a process outside --cgroup-root, a raw
 * socket, a packet generator), as Cilium's from-container does. Maps and layouts in
 * abi/service.h (svc_nat, svc_nat6, svc_xlate).
 *
 *   if (svc_in_cidr4(daddr) / svc_in_cidr6(daddr))    the service CIDRs, load-time
 *           constants: all that a packet to anything else pays (off when the mask is 0)
 *   __u32 id = svc_nat_pick(fe, saddr, daddr, sport, dport, proto);   a backend as the
 *           socket LB picks one (lib/service.h: random or Maglev on the flow's hash,
 *           ClientIP affinity keyed by the source address), never the client itself
 *           (see svc_nat_not_client); 0: none
 *   l4_nat_rewrite(skb, SVC_NAT_ETH_HLEN, ...)   the source or destination address and
 *           port, IP and L4 checksums fixed (lib/l4_nat.h, shared with NodePort)
 *   svc_nat_note(ep_id, be, revnat)     svc_xlate: flows name the Service
 *
 * The endpoint program keys both svc_nat entries of a flow like its conntrack (a
 * struct ct_key / ct6_key whose dir is SVC_NAT_FWD or SVC_NAT_REV).
 */
#ifndef MEMBRANE_LIB_SERVICE_NAT_H
#define MEMBRANE_LIB_SERVICE_NAT_H

#include "abi/endpoint.h"
#include "abi/service.h"
#include "lib/jhash.h"
#include "lib/l4_nat.h"
#include "lib/service.h"

/* The service CIDRs (network order). A zero mask with an all-ones network matches
 * nothing: the default, so an object loaded without them translates nothing. */
const volatile __u32 svc_net4 = 0xffffffff;
const volatile __u32 svc_mask4 = 0;
const volatile __u32 svc_net6[4] = { 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff };
const volatile __u32 svc_mask6[4] = {};

#define SVC_NAT_ETH_HLEN 14 /* the endpoint programs see untagged Ethernet */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_NAT_SIZE);
	__type(key, struct ct_key);
	__type(value, struct svc_nat);
} svc_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_NAT_SIZE);
	__type(key, struct ct6_key);
	__type(value, struct svc_nat);
} svc_nat6 SEC(".maps");

static __always_inline int svc_in_cidr4(__u32 daddr)
{
	return (daddr & svc_mask4) == svc_net4;
}

static __always_inline int svc_in_cidr6(const __u32 *daddr)
{
	return !(((daddr[0] & svc_mask6[0]) ^ svc_net6[0]) | ((daddr[1] & svc_mask6[1]) ^ svc_net6[1]) |
		 ((daddr[2] & svc_mask6[2]) ^ svc_net6[2]) | ((daddr[3] & svc_mask6[3]) ^ svc_net6[3]));
}

/* Hairpin: a pod whose pick is itself would get its own packet back from its own address,
 * which its stack drops as a martian (Cilium SNATs such a flow to a loopback address;
 * we do not yet). So the flow goes to another backend, deterministically (the same pick
 * and slots give the same answer): the next slot's, else the first slot's, else the last
 * slot's. A set's slots hold its backends in order, a weighted one's consecutively
 * (service/plan.py: slots), so the first and the last slot are two different backends
 * whenever the pod is not the set's only one; then there is none (0, dropped as
 * SERVICE_BACKEND_NOT_FOUND). */
static __always_inline int svc_nat_is_client(const struct svc_backend *be, const __u32 *client)
{
	const __u32 *a = (const __u32 *)be->addr;

	return a[0] == client[0] && a[1] == client[1] && a[2] == client[2] && a[3] == client[3];
}

static __always_inline __u32 svc_nat_not_client(const struct svc_set *set, __u32 set_id,
						 __u32 id, __u32 hash, const __u32 *client)
{
	struct svc_slot_key sk = { .set = set_id };
	struct svc_backend *be = svc_backend(id);
	__u32 i, *other;

	if (!be || !svc_nat_is_client(be, client))
		return id;
	if (!set->count)
		return 0;
	for (i = 0; i < 3; i++) {
		sk.slot = i == 0 ? (hash + 1) % set->count + 1 : i == 1 ? 1 : set->count;
		other = bpf_map_lookup_elem(&svc_slots, &sk);
		if (!other || !*other)
			continue;
		be = svc_backend(*other);
		if (be && !svc_nat_is_client(be, client))
			return *other;
	}
	return 0;
}

static __always_inline __u32 svc_nat_pick(const struct svc_frontend *fe, const __u32 *saddr,
					  const __u32 *daddr, __u16 sport, __u16 dport, __u8 proto)
{
	struct svc_affinity_key akey = { .set = fe->set };
	struct svc_set *set = svc_set_of(fe->set);
	__u32 words[10] = {};
	__u32 id, hash = 0; /* an affinity pick has none: svc_nat_not_client walks from slot 1 */

	if (!set)
		return 0;
	if (set->flags & SVC_SET_AFFINITY) {
		__builtin_memcpy(akey.client, saddr, 16);
		id = svc_affinity_get(&akey, set);
		if (id)
			goto chosen;
	}
	if (set->flags & SVC_SET_MAGLEV) {
		/* The flow's hash as nodeport's and the LB's (addresses 16 bytes each). */
		__builtin_memcpy(words, saddr, 16);
		__builtin_memcpy(words + 4, daddr, 16);
		words[8] = (__u32)sport | ((__u32)dport << 16);
		words[9] = proto;
		hash = jhash2_10(words, SVC_HASH_SEED);
	} else {
		hash = bpf_get_prandom_u32();
	}
	id = svc_pick(set, fe->set, hash);
	if (!id)
		return 0;
chosen:
	id = svc_nat_not_client(set, fe->set, id, hash, saddr);
	if (id && (set->flags & SVC_SET_AFFINITY))
		svc_affinity_put(&akey, id);
	return id;
}

/* Which frontend the endpoint's connections to the backend went through, for the flows
 * (abi/service.h: svc_xlate). Written only when it changes. */
static __always_inline void svc_nat_note(__u16 ep, const struct svc_backend *be, __u32 revnat)
{
	struct svc_xlate_key k = { .netns = (__u64)SVC_XLATE_EP_MARK << 32 | ep,
				   .port = be->port, .protocol = be->protocol,
				   .family = be->family };
	__u32 *known;

	__builtin_memcpy(k.addr, be->addr, 16);
	known = bpf_map_lookup_elem(&svc_xlate, &k);
	if (!known || *known != revnat)
		bpf_map_update_elem(&svc_xlate, &k, &revnat, BPF_ANY);
}

#endif
