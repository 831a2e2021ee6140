/* Shared by C and Python: maps of `membrane lb` (lb_xdp.bpf.o), one set per device.
 *
 *   lb_vips       hash: lb_vip_key (VIP address, port, protocol) -> lb_vip
 *   lb_tables     array of maps [lb_vip.service] -> the service's Maglev table: an array
 *                 of lb_vip.table_size __u32 backend ids (0: no backend). A change builds
 *                 a whole new table and swaps it in with one update of this map, so a
 *                 lookup sees the old table or the new one, never a half-written one.
 *   lb_backends   array [backend id] -> lb_backend (service 0: the id is free);
 *                 BPF_F_MMAPABLE, so the control plane scans it without a syscall
 *   lb_nexthop    per-CPU array [backend id] -> lb_nexthop: the FIB's answer for the
 *                 backend (MACs, device, route MTU), asked again once it is older than
 *                 LB_NEXTHOP_TTL_NS (a FIB lookup costs ~1 us here, the cache ~20 ns);
 *                 zeroed by the control plane whenever an id is (re)assigned
 *   lb_conntrack  LRU hash: lb_flow_key -> lb_flow (the backend a flow was given, kept
 *                 while that backend stays in its service, whatever the table says)
 *   lb_backend_stats  per-CPU array [backend id] -> lb_counter (packets and bytes sent)
 *   lb_stats      per-CPU array [enum lb_stat] -> lb_counter
 *   lb_config     array[1] of lb_config: the outer source addresses, written at attach
 * Addresses are in network byte order, IPv4 in the first 4 bytes of 16; ports host order.
 * The flow hash is jhash2 over the first LB_HASH_WORDS words of lb_flow_key (the
 * Python reference: membrane.lb.flowhash); the Maglev slot is hash % table_size.
 */
#ifndef MEMBRANE_ABI_LB_H
#define MEMBRANE_ABI_LB_H

#include "abi/export.h"

enum lb_limits {
	LB_MAX_VIPS = 4096,        /* services (ids 1..4095) */
	LB_MAX_BACKENDS = 65536,   /* backend ids 1..65535 over all services */
	LB_CONNTRACK_SIZE = 262144,
	LB_DEFAULT_TABLE_SIZE = 16381,
	LB_HASH_WORDS = 10,
	LB_HASH_SEED = 1296843297, /* 0x4D4C4221, "MLB!" */
	LB_NEXTHOP_TTL_NS = 1000000000, /* 1 s: a changed neighbour MAC is seen within it */
};
ABI_EXPORT_ENUM(lb_limits);

enum lb_stat {
	LB_STAT_PASSED = 0,       /* not for a VIP: handed to the kernel unchanged */
	LB_STAT_FORWARDED = 1,    /* encapsulated and sent to a backend */
	LB_STAT_NO_BACKEND = 2,   /* for a VIP without backends: dropped */
	LB_STAT_UNPARSED = 3,     /* passed: headers cut short, VLAN-tagged or a fragment */
	LB_STAT_NO_ROUTE = 4,     /* no route to the backend: dropped */
	LB_STAT_NEIGH_PASS = 5,   /* backend's MAC unknown: encapsulated packet handed to the
				   * kernel, which resolves it and forwards (ip_forward on) */
	LB_STAT_CT_NEW = 6,       /* flows given a backend by the Maglev table */
	LB_STAT_TOO_BIG = 7,      /* encapsulated, it would exceed the route's MTU: dropped */
	LB_STAT_MAX = 8,
};
ABI_EXPORT_ENUM(lb_stat);

struct lb_vip_key {
	__u8 addr[16];
	__u16 port;
	__u8 protocol;
	__u8 family;     /* 4 or 6 */
};

struct lb_vip {
	__u32 service;      /* index into lb_tables, 1..LB_MAX_VIPS-1 */
	__u32 table_size;   /* M, prime */
};

struct lb_backend {
	__u8 addr[16];
	__u32 service;   /* the service it serves; 0: free id */
	__u16 weight;
	__u8 family;
	__u8 pad;
};

/* The first 40 bytes are the hashed words: src, dst, sport | dport << 16, protocol. */
struct lb_flow_key {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u32 protocol;
};

struct lb_nexthop {
	__u64 expires_ns;  /* bpf_ktime_get_coarse_ns() after which to ask the FIB again;
			    * 0: never asked */
	__u32 ifindex;     /* the device towards the backend */
	__u16 mtu;         /* of the route */
	__u8 dmac[6];
	__u8 smac[6];
	__u8 pad[2];
};

struct lb_flow {
	__u32 backend;
	__u32 service;
};

struct lb_counter {
	__u64 packets;
	__u64 bytes;
};

struct lb_config {
	__u8 src4[4];    /* outer source of IPv4-in-IPv4 */
	__u8 src6[16];   /* outer source of IPv6-in-IPv6 */
	__u32 ifindex;   /* at attach time (not read by the program) */
	__u8 xdp_mode;   /* 1 native, 2 generic (not read by the program) */
	__u8 pad[3];
};

#endif
