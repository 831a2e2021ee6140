/* Shared by C and Python: the per-packet service path (nodeport.bpf.c) on the node's
 * external devices: NodePort and externalIP frontends (abi/service.h, scope EXTERNAL)
 * reached from outside the node, translated per packet.
 *
 *   np_flows    LRU hash: the client's tuple as it arrives (client -> frontend) ->
 *               np_flow: the backend chosen for it and how it is reached, so every packet
 *               of a flow goes where its first went.
 *   np_rev      LRU hash: a reply's tuple as it reaches the program -> np_rev_nat: the
 *               addresses and ports it leaves with (source: the frontend; destination:
 *               the client). Local backends' replies are keyed (backend, client) and
 *               rewritten on the external device's egress; SNAT replies are keyed
 *               (backend, node, backend port, NAT port) and rewritten on its ingress.
 *   np_devices  hash ifindex -> 1: the devices the program serves. A backend whose route
 *               leaves through one of them is on another host (SNAT or DSR); any other
 *               backend is local (a pod), reached by the stack after DNAT alone.
 *   np_stats    per-CPU array [enum np_stat] of packet counters.
 *   np6_flows, np6_rev   the same for IPv6 (np6_tuple, np6_flow, np6_rev_nat): maps of
 *               their own, so the IPv4 maps keep their layout across an upgrade.
 * Addresses in network byte order, ports in host byte order.
 */
#ifndef MEMBRANE_ABI_NODEPORT_H
#define MEMBRANE_ABI_NODEPORT_H

#include "abi/export.h"

enum np_mode {
	NP_MODE_SNAT = 0,  /* remote backends see the node as the client (Cilium's default) */
	NP_MODE_DSR = 1,   /* IPv4-in-IPv4 to remote backends, which answer the client directly */
};
ABI_EXPORT_ENUM(np_mode);

enum np_kind {
	NP_KIND_LOCAL = 0,  /* a pod of this node: DNAT, reverse DNAT of its replies */
	NP_KIND_SNAT = 1,   /* another host: DNAT + SNAT to the node, replies come back here */
	NP_KIND_DSR = 2,    /* another host: encapsulated, replies bypass the node */
};
ABI_EXPORT_ENUM(np_kind);

enum np_stat {
	NP_STAT_NEW_FLOW = 0,      /* a flow's first packet to a frontend: a backend chosen */
	NP_STAT_TO_LOCAL = 1,      /* packets DNATed to a local backend */
	NP_STAT_TO_SNAT = 2,       /* packets DNATed and SNATed to a remote backend */
	NP_STAT_TO_DSR = 3,        /* packets encapsulated to a remote backend */
	NP_STAT_REPLY_LOCAL = 4,   /* local backends' replies rewritten (egress) */
	NP_STAT_REPLY_SNAT = 5,    /* remote backends' replies rewritten (ingress) */
	NP_STAT_NO_BACKEND = 6,    /* dropped: the frontend has no backend (or none local) */
	NP_STAT_NO_ROUTE = 7,      /* dropped: no route to the backend or no NAT port free */
	NP_STAT_ERROR = 8,         /* dropped: the packet could not be rewritten */
	NP_STAT_MSS_CLAMPED = 9,   /* DSR SYNs whose MSS option was lowered to fit the tunnel */
	NP_STAT_ICMP_ERROR = 10,   /* ICMP/ICMPv6 errors about a translated flow, rewritten
				    * (outer addresses and the quoted header) */
	NP_STAT_EXTHDR = 11,       /* dropped: IPv6 to a frontend with an extension header
				    * other than hop-by-hop or destination options (routing,
				    * fragment, AH: the translation would break them) */
	NP_STAT_MAX = 12,
};
ABI_EXPORT_ENUM(np_stat);

enum np_limits {
	NP_FLOWS_SIZE = 262144,
	NP_SNAT_PORT_MIN = 32768,   /* SNAT source ports: 32768..65535 */
	NP_SNAT_PORT_TRIES = 8,
	NP_OUTER_TTL = 64,
	NP_DSR_OVERHEAD = 60,       /* outer IPv4 + inner IPv4 + TCP headers, no options */
	NP_DSR_OVERHEAD6 = 100,     /* outer IPv6 + inner IPv6 + TCP headers */
};
ABI_EXPORT_ENUM(np_limits);

struct np_tuple {
	__be32 saddr;
	__be32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
};

struct np_flow {
	__be32 backend_addr;
	__u16 backend_port;
	__u8 kind;          /* enum np_kind */
	__u8 pad;
	__u32 backend;      /* svc_backends id: a flow whose backend is gone picks again */
	__u32 revnat;       /* svc_revnat id of the frontend */
	__u16 nat_port;     /* NP_KIND_SNAT: the node's source port for this flow */
	__u16 mss;          /* NP_KIND_DSR: the largest MSS a SYN may announce (the device's
			     * MTU less the outer and inner IPv4 headers and TCP's) */
	__u32 ifindex;      /* NP_KIND_SNAT/DSR: the device towards the backend's host */
};

struct np_rev_nat {
	__be32 saddr;
	__be32 daddr;
	__u16 sport;
	__u16 dport;
};

/* IPv6 twins of the three above (addresses of 16 bytes). */
struct np6_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
};

struct np6_flow {
	__u8 backend_addr[16];
	__u16 backend_port;
	__u8 kind;          /* enum np_kind */
	__u8 pad;
	__u32 backend;
	__u32 revnat;
	__u16 nat_port;
	__u16 mss;          /* NP_KIND_DSR: the device's MTU less NP_DSR_OVERHEAD6 */
	__u32 ifindex;
};

struct np6_rev_nat {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
};

#endif
