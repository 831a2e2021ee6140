/* Shared by C and Python: the agent's Kubernetes services (ClusterIP, NodePort, externalIPs),
 * read by the socket LB (sock_lb.bpf.c) and the per-packet service path. Pinned under the
 * agent's bpf dir; written only by membrane.service.maps.
 *
 *   svc_frontends   hash: svc_frontend_key (address, port, protocol, family, scope) ->
 *                   svc_frontend: the backend set it balances over and its rev-NAT id.
 *                   ClusterIPs have an INTERNAL entry only; NodePort/externalIP frontends
 *                   have both scopes (EXTERNAL: traffic from outside the node, which
 *                   externalTrafficPolicy=Local narrows to the node's own backends).
 *   svc_sets        array [set id] -> svc_set: how a backend set picks (random or Maglev,
 *                   ClientIP affinity) and how many active backends it has (count).
 *   svc_slots       hash: (set id, slot 1..count) -> backend id. Only ACTIVE backends are
 *                   in slots; a change writes the new slots before raising count and
 *                   lowers count before dropping slots, so a reader never meets a hole.
 *   svc_backends    hash: backend id -> svc_backend (address, port, state). A backend that
 *                   is terminating or in maintenance stays here (established flows keep
 *                   it) but leaves every set's slots and Maglev table.
 *   svc_maglev      array of maps [set id] -> the set's Maglev table: svc_set.maglev_size
 *                   __u32 backend ids (0: none), replaced whole on a change (as lb.h).
 *   svc_revnat      array [rev-NAT id] -> svc_revnat: the frontend a translated flow
 *                   answers as (per-packet reverse NAT; flows' destination_service).
 *   svc_affinity    LRU hash: svc_affinity_key (client, set) -> svc_affinity (backend,
 *                   last use): sessionAffinity ClientIP. The socket LB's client is its
 *                   network namespace (cookie), the per-packet path's the source address.
 *   svc_sock        LRU hash: svc_sock_key (socket cookie, direction, address, port) ->
 *                   svc_sock_value. FWD: a socket's frontend -> the backend it was given
 *                   (unconnected UDP keeps its backend); REV: the backend -> the frontend
 *                   (recvmsg/getpeername show the service address).
 *   svc_xlate       LRU hash: svc_xlate_key (the client's netns cookie, backend address,
 *                   port, protocol) -> rev-NAT id: which frontend a pod's connections to a
 *                   backend went through (flows' destination_service). The endpoint
 *                   programs' per-packet translation writes it with netns
 *                   SVC_XLATE_EP_MARK << 32 | the client's endpoint id (a netns cookie
 *                   never has those bits: cookies count up from 1).
 *   svc_nat, svc_nat6  LRU hash: the endpoint programs' per-packet ClusterIP translation
 *                   (lib/service_nat.h) of a pod whose connect hook was bypassed, keyed by
 *                   a conntrack key (abi/endpoint.h) whose dir is enum svc_nat_dir:
 *                   FWD  the client's tuple to the frontend -> svc_nat: the backend (address,
 *                        port, id) every packet of the flow goes to;
 *                   REV  the client's tuple to that backend -> svc_nat: the frontend its
 *                        replies come from (address, port, rev-NAT id).
 * Addresses are in network byte order, IPv4 in the first 4 bytes of 16; ports in host
 * byte order. The Maglev slot of a flow is hash % maglev_size; the per-packet path hashes
 * the 5-tuple with lib/jhash.h as lb.h does (membrane.lb.flowhash is the reference).
 */
#ifndef MEMBRANE_ABI_SERVICE_H
#define MEMBRANE_ABI_SERVICE_H

#include "abi/export.h"

enum svc_limits {
	SVC_MAX_FRONTENDS = 65536,
	SVC_MAX_SETS = 65536,          /* set ids 1..65535 (0: none) */
	SVC_MAX_BACKENDS = 65536,      /* backend ids 1..65535 over all services */
	SVC_MAX_SLOTS = 262144,        /* active (set, slot) pairs over all sets */
	SVC_MAX_REVNAT = 65536,        /* rev-NAT ids 1..65535 */
	SVC_AFFINITY_SIZE = 65536,
	SVC_SOCK_SIZE = 262144,
	SVC_XLATE_SIZE = 65536,
	SVC_NAT_SIZE = 131072,         /* two entries per translated flow */
	SVC_XLATE_EP_MARK = 2147483647, /* svc_xlate_key.netns >> 32 of an endpoint's record */
	SVC_MAGLEV_DEFAULT_SIZE = 16381, /* prime, Cilium's --bpf-lb-maglev-table-size */
	SVC_HASH_SEED = 1398163011,      /* 0x53564343, "SVCC" */
};
ABI_EXPORT_ENUM(svc_limits);

enum svc_scope {
	SVC_SCOPE_EXTERNAL = 0,  /* from outside the node (NodePort, externalIPs) */
	SVC_SCOPE_INTERNAL = 1,  /* from the node and its pods (socket LB) */
};
ABI_EXPORT_ENUM(svc_scope);

/* svc_frontend.flags: what kind of frontend, and how its set was chosen. */
enum svc_frontend_flag {
	SVC_FE_CLUSTER_IP = 1,
	SVC_FE_NODE_PORT = 2,
	SVC_FE_EXTERNAL_IP = 4,
	SVC_FE_LOCAL = 8,         /* a traffic policy Local narrowed the set to this node */
};
ABI_EXPORT_ENUM(svc_frontend_flag);

/* svc_set.flags */
enum svc_set_flag {
	SVC_SET_MAGLEV = 1,    /* pick by the Maglev table, else uniformly at random */
	SVC_SET_AFFINITY = 2,     /* sessionAffinity ClientIP for affinity_timeout s */
};
ABI_EXPORT_ENUM(svc_set_flag);

enum svc_backend_state {
	SVC_BACKEND_ACTIVE = 0,
	SVC_BACKEND_TERMINATING = 1,
	SVC_BACKEND_MAINTENANCE = 2,
};
ABI_EXPORT_ENUM(svc_backend_state);

enum svc_sock_dir {
	SVC_SOCK_FWD = 0,
	SVC_SOCK_REV = 1,
};
ABI_EXPORT_ENUM(svc_sock_dir);

struct svc_frontend_key {
	__u8 addr[16];
	__u16 port;
	__u8 protocol;   /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP */
	__u8 family;     /* 4 or 6 */
	__u8 scope;      /* enum svc_scope */
	__u8 pad[3];
};

struct svc_frontend {
	__u32 set;       /* svc_sets index: the backends it balances over */
	__u32 revnat;    /* svc_revnat index: this frontend's address and port */
	__u32 flags;     /* enum svc_frontend_flag */
};

struct svc_set {
	__u32 count;            /* active backends: slots 1..count */
	__u32 flags;            /* enum svc_set_flag */
	__u32 affinity_timeout; /* seconds */
	__u32 maglev_size;      /* entries of the set's Maglev table (prime) */
};

struct svc_slot_key {
	__u32 set;
	__u32 slot;
};

struct svc_backend {
	__u8 addr[16];
	__u16 port;
	__u8 protocol;
	__u8 family;
	__u8 state;      /* enum svc_backend_state */
	__u8 pad[3];
};

struct svc_revnat {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 pad;
};

struct svc_affinity_key {
	__u8 client[16]; /* source address, or the netns cookie in the first 8 bytes */
	__u32 set;
	__u8 netns;      /* 1: client is a netns cookie (socket LB) */
	__u8 pad[3];
};

struct svc_affinity {
	__u64 last_used_ns;  /* bpf_ktime_get_ns() */
	__u32 backend;
	__u32 pad;
};

struct svc_sock_key {
	__u64 cookie;    /* bpf_get_socket_cookie() */
	__u8 addr[16];   /* FWD: the frontend; REV: the backend */
	__u16 port;
	__u8 family;
	__u8 dir;        /* enum svc_sock_dir */
	__u32 pad;
};

struct svc_sock_value {
	__u8 addr[16];   /* FWD: the backend; REV: the frontend */
	__u16 port;
	__u8 family;
	__u8 pad;
	__u32 id;        /* FWD: the backend id; REV: the rev-NAT id */
};

/* svc_nat keys (struct ct_key / ct6_key) carry one of these as dir: never a packet's. */
enum svc_nat_dir {
	SVC_NAT_FWD = 2,
	SVC_NAT_REV = 3,
};
ABI_EXPORT_ENUM(svc_nat_dir);

struct svc_nat {
	__u8 addr[16];   /* FWD: the backend; REV: the frontend */
	__u16 port;
	__u8 pad[2];
	__u32 backend;   /* svc_backends id: a FWD entry whose backend is gone picks anew */
	__u32 revnat;    /* svc_revnat id of the frontend */
};

struct svc_xlate_key {
	__u64 netns;     /* bpf_get_netns_cookie() of the connecting socket */
	__u8 addr[16];   /* the backend */
	__u16 port;
	__u8 protocol;
	__u8 family;
	__u32 pad;
};

#endif
