/* Shared by C and Python: the kernel drop monitor (bpf/drop_monitor.bpf.c), which reports
 * packets the kernel frees with a drop reason (skb:kfree_skb) outside our datapath, for the
 * endpoints the agent watches. */
#ifndef MEMBRANE_ABI_DROP_MONITOR_H
#define MEMBRANE_ABI_DROP_MONITOR_H

#include "abi/events.h"

enum drop_monitor_abi {
	DROP_EVENT_KERNEL = 1,      /* event_header.type */
	DROP_HEADERS_MAX = 96,      /* bytes of the packet kept from its network header: the
	                             * longest IPv4 header (60) with a TCP header (20), or IPv6
	                             * (40) with TCP, fit */
	DROP_IGNORED_MAX = 4,       /* entries of ignored_reasons */
	DROP_IFNAME_LEN = 16,       /* IFNAMSIZ */
};
ABI_EXPORT_ENUM(drop_monitor_abi);

/* What the agent watches: a whole namespace (ifindex 0: a pod's), or a device in one
 * (ifindex > 0: the node side of a pod's veth, in the node's namespace). A namespace with
 * watched devices also has its own entry, with ep_id 0 ("look at the device"), so a
 * namespace nobody watches costs one lookup. Namespaces are named by inode number
 * (/run/netns/NAME's st_ino, the kernel's net->ns.inum). */
struct drop_watch_key {
	__u32 netns_ino;
	__u32 ifindex;
};

struct drop_watch {
	__u32 ep_id;     /* the endpoint whose traffic that is; 0: see the device's entry */
	__u32 pad;
};

/* Per-CPU counts (map drop_stats). */
struct drop_stats {
	__u64 watched;     /* drops of watched traffic */
	__u64 suppressed;  /* of those, not sent: over the per-CPU rate */
	__u64 window_ns;   /* start of the current rate window */
	__u32 window_sent; /* events sent in it */
	__u32 pad;
};

struct kernel_drop_event {
	struct event_header hdr;
	__u64 location;      /* the kernel address that freed the packet */
	__u32 reason;        /* enum skb_drop_reason of the running kernel */
	__u32 ep_id;
	__u32 netns_ino;     /* where it was dropped */
	__u32 ifindex;       /* skb->dev (0 without a device: the socket's namespace) */
	__u32 len;           /* skb->len */
	__u16 protocol;      /* skb->protocol (ETH_P_IP, ETH_P_IPV6), host byte order */
	__u16 headers_len;   /* bytes of headers[] read */
	char ifname[DROP_IFNAME_LEN];
	__u8 headers[DROP_HEADERS_MAX];  /* from the network header on */
};

#endif
