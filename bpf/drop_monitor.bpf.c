// SPDX-License-Identifier: GPL-2.0
/* The kernel drop monitor: packets of the node's endpoints that the kernel drops outside
 * our datapath (no socket, netfilter, no route, receive queue full, ...), with the kernel's
 * drop reason, from the skb:kfree_skb tracepoint (tp_btf: the skb is read with CO-RE).
 *
 * Which frees are drops: kfree_skb carries `reason` since Linux 5.17 (the agent checks the
 * tracepoint's BTF prototype before loading this). Since 6.3 a packet consumed normally is
 * traced by skb:consume_skb, never here; before that SKB_CONSUMED did not exist and
 * consume_skb() had its own tracepoint too. What still reaches kfree_skb without being a
 * drop is SKB_DROP_REASON_NOT_SPECIFIED: a plain kfree_skb() call, which many paths make
 * for packets that were not lost (queue purges, clones, a socket's teardown). So every
 * reason below `first_drop_reason` (NOT_SPECIFIED + 1, read from the kernel's BTF: the
 * numbers differ between kernels) is left out. So are `ignored_reasons`: TC_INGRESS,
 * TC_EGRESS and XDP are our own programs' drops, which their own events already report.
 *
 * Cost: everything not dropped for a reason we report returns after one compare; a drop
 * of unwatched traffic costs the loads of its device and namespace and one hash lookup
 * (bench/kernel_drops.py). Each CPU sends at most `max_events_per_window` events per
 * `window_ns` (500 a second); the rest are counted (drop_stats.suppressed), so a drop
 * storm can neither flood the ring nor take much of the agent's CPU (each event becomes a
 * flow at ~60 us).
 */
#include "include/trace.h"
#include "abi/drop_monitor.h"
#include "lib/events.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

const volatile __u32 first_drop_reason = 3;
const volatile __u32 ignored_reasons[DROP_IGNORED_MAX] = {};
const volatile __u64 window_ns = 100000000;     /* 100 ms */
const volatile __u32 max_events_per_window = 50;

EVENTS_RINGBUF();
ABI_EXPORT(kernel_drop_event);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct drop_watch_key);
	__type(value, struct drop_watch);
} drop_watched SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct drop_stats);
} drop_stats SEC(".maps");

static __always_inline bool reported_reason(__u32 reason)
{
	if (reason < first_drop_reason)
		return false;
#pragma unroll
	for (int i = 0; i < DROP_IGNORED_MAX; i++)
		if (ignored_reasons[i] && reason == ignored_reasons[i])
			return false;
	return true;
}

/* The endpoint whose traffic this is. A namespace's own entry answers first (one lookup for
 * every namespace we do not watch): a pod's names its endpoint; the node's (ep_id 0) says
 * that some of its devices are watched, and the device's entry answers. */
static __always_inline struct drop_watch *watched(__u32 netns_ino, __u32 ifindex)
{
	struct drop_watch_key key = {.netns_ino = netns_ino};
	struct drop_watch *w = bpf_map_lookup_elem(&drop_watched, &key);

	if (!w || w->ep_id || !ifindex)
		return w && w->ep_id ? w : NULL;
	key.ifindex = ifindex;
	return bpf_map_lookup_elem(&drop_watched, &key);
}

/* Whether this CPU may send one more event now (counts it, or counts it suppressed). */
static __always_inline bool within_rate(void)
{
	__u32 zero = 0;
	struct drop_stats *s = bpf_map_lookup_elem(&drop_stats, &zero);
	__u64 now;

	if (!s)
		return false;
	s->watched++;
	now = bpf_ktime_get_ns();  /* tracing programs may not use the coarse clock */
	if (now - s->window_ns >= window_ns) {
		s->window_ns = now;
		s->window_sent = 0;
	}
	if (s->window_sent >= max_events_per_window) {
		s->suppressed++;
		return false;
	}
	s->window_sent++;
	return true;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(kernel_drop, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	struct kernel_drop_event ev = {};
	struct net_device *dev;
	struct drop_watch *w;
	__u32 netns_ino = 0, ifindex = 0, tail;
	__u16 protocol, network;
	unsigned char *head;

	if (!reported_reason(reason))
		return 0;
	/* tp_btf: the skb is a trusted pointer, read with plain (CO-RE relocated) loads
	 * instead of a helper call per field. */
	protocol = bpf_ntohs(skb->protocol);
	if (protocol != ETH_P_IP && protocol != ETH_P_IPV6)
		return 0;
	dev = skb->dev;
	if (dev) {
		ifindex = dev->ifindex;
		netns_ino = dev->nd_net.net->ns.inum;
	} else {  /* not on a device yet (e.g. netfilter's OUTPUT): its socket's namespace */
		struct sock *sk = skb->sk;

		if (!sk)
			return 0;
		netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	}
	w = watched(netns_ino, ifindex);
	if (!w || !within_rate())
		return 0;

	fill_event_header(&ev.hdr, DROP_EVENT_KERNEL);
	ev.location = (__u64)location;
	ev.reason = reason;
	ev.ep_id = w->ep_id;
	ev.netns_ino = netns_ino;
	ev.ifindex = ifindex;
	ev.len = BPF_CORE_READ(skb, len);
	ev.protocol = protocol;
	if (dev)
		BPF_CORE_READ_STR_INTO(&ev.ifname, dev, name);
	/* Offsets from head (NET_SKBUFF_DATA_USES_OFFSET, every 64-bit kernel). The headers of
	 * a packet being dropped are in its linear part, which ends at tail. A fixed-size read
	 * (what the verifier checks simply) stays inside the allocation: skb_shared_info
	 * follows the data, so the bytes past tail are not sent (headers_len). */
	head = BPF_CORE_READ(skb, head);
	network = BPF_CORE_READ(skb, network_header);
	tail = BPF_CORE_READ(skb, tail);
	if (tail > network && !bpf_probe_read_kernel(ev.headers, sizeof(ev.headers), head + network))
		ev.headers_len = tail - network < DROP_HEADERS_MAX ? tail - network : DROP_HEADERS_MAX;
	emit_event(&ev, sizeof(ev));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
