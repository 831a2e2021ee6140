/* Events to user space through one ring buffer per subsystem.
 *
 *   EVENTS_RINGBUF();               declares maps `events` (ringbuf) and `events_lost`
 *   emit_event(&ev, sizeof(ev));    copies ev into the ring; counts a loss when full
 *
 * Wakeups are batched: the consumer is woken only when the backlog crosses
 * events_wakeup_bytes (a load-time constant); it also polls with a short timeout, so a
 * quiet stream is still delivered promptly. Waking on every event costs a syscall each.
 */
#ifndef MEMBRANE_LIB_EVENTS_H
#define MEMBRANE_LIB_EVENTS_H

const volatile __u32 events_wakeup_bytes = 16384;
/* Whether events carry their time (hdr.ts_ns; 0 without). A tool that prints no time
 * turns it off: bpf_ktime_get_ns() is ~120 ns per event on a VM (bench/RESULTS.md). */
const volatile bool events_timestamps = true;

#define EVENTS_RINGBUF()                                                   \
	struct {                                                           \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                        \
		__uint(max_entries, 1 << 20);                              \
	} events SEC(".maps");                                             \
	struct {                                                           \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);                   \
		__uint(max_entries, 1);                                    \
		__type(key, __u32);                                        \
		__type(value, __u64);                                      \
	} events_lost SEC(".maps")

static __always_inline void count_lost_event(void *lost_map)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(lost_map, &zero);

	if (lost)
		*lost += 1;
}

#define emit_event(data, size)                                                      \
	({                                                                          \
		__u64 __avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);     \
		__u64 __flags = __avail < events_wakeup_bytes &&                    \
				__avail + (size) + 8 >= events_wakeup_bytes ?       \
				BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;             \
		long __err = bpf_ringbuf_output(&events, (data), (size), __flags);  \
		if (__err)                                                          \
			count_lost_event(&events_lost);                             \
		__err;                                                              \
	})

static __always_inline void fill_event_header(struct event_header *h, __u16 type)
{
	h->ts_ns = events_timestamps ? bpf_ktime_get_ns() : 0;
	h->version = MEMBRANE_EVENT_VERSION;
	h->type = type;
	h->cpu = bpf_get_smp_processor_id();
}

#endif
