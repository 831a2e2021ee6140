/* Maps and helpers shared by the `membrane filter` programs (see abi/filter.h).
 *
 *   count_rule(id, len)       per-rule packets/bytes
 *   count_stat(stat, len)     per-program totals (passed, dropped, unparsed)
 *   report_drop(&p, ...)      drop event to the shared ring buffer (if emit_events)
 */
#ifndef MEMBRANE_LIB_FILTER_H
#define MEMBRANE_LIB_FILTER_H

#include "abi/filter.h"
#include "lib/events.h"
#include "lib/parse.h"

const volatile bool emit_events = true;
const volatile __u32 instance = 0;

EVENTS_RINGBUF();
ABI_EXPORT(filter_event);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct filter_meta);
} filter_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FILTER_MAX_RULES);
	__type(key, __u32);
	__type(value, struct filter_counter);
} rule_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FILTER_STAT_MAX);
	__type(key, __u32);
	__type(value, struct filter_counter);
} filter_stats SEC(".maps");

static __always_inline void add_counter(void *map, __u32 index, __u64 len)
{
	struct filter_counter *c = bpf_map_lookup_elem(map, &index);

	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

#define count_rule(id, len) add_counter(&rule_stats, (id), (len))
#define count_stat(stat, len) add_counter(&filter_stats, (stat), (len))

static __always_inline void report_drop(const struct pkt *p, __u32 ifindex, __u8 hook,
					__u32 rule_id, __u32 len)
{
	struct filter_event ev = {};

	if (!emit_events)
		return;
	fill_event_header(&ev.hdr, FILTER_EVENT_DROP);
	ev.instance = instance;
	ev.ifindex = ifindex;
	ev.rule_id = rule_id;
	ev.pkt_len = len;
	ev.hook = hook;
	ev.family = p->family;
	ev.protocol = p->protocol;
	ev.sport = p->sport;
	ev.dport = p->dport;
	__builtin_memcpy(ev.src, p->src, 16);
	__builtin_memcpy(ev.dst, p->dst, 16);
	emit_event(&ev, sizeof(ev));
}

#endif
