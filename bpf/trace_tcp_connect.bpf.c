// SPDX-License-Identifier: GPL-2.0
/* `membrane trace connect` (tcpconnect) and `membrane trace tcp-count` (connections
 * counted in the kernel): active TCP opens, IPv4 and IPv6.
 *
 * kprobes on tcp_v4_connect are not available here, so the open is seen on the
 * sock:inet_sock_set_state tracepoint. CLOSE -> SYN_SENT runs in the connecting thread
 * (right pid and comm, so the filters apply there), but before the kernel picks the
 * source port. The socket is therefore remembered (`pending`) and reported once the port
 * is known, at whichever comes first:
 *   - the connecting thread's return from connect(2) (sys_exit_connect): at once for a
 *     non-blocking connect, after the handshake for a blocking one;
 *   - the socket leaving SYN_SENT (ESTABLISHED or CLOSE): covers opens that do not return
 *     through connect(2) (io_uring, TCP Fast Open sendmsg).
 * Deleting the `pending` entry is the claim: only the path whose delete succeeds reports,
 * so each open is reported exactly once even when both race on two CPUs.
 *
 * count_mode: count opens per key in `counts` instead of emitting events.
 */
#include "include/trace.h"
#include "abi/trace_tcp.h"
#include "lib/events.h"
#include "lib/task.h"
#include "lib/trace_filter.h"
#include "lib/tcp_sock.h"

const volatile bool count_mode = false;
const volatile bool count_by_tuple = false;

EVENTS_RINGBUF();
ABI_EXPORT(tcp_open_event);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);                /* struct sock * */
	__type(value, struct trace_task);  /* who connects */
} pending SEC(".maps");

/* LRU: a thread that opened without connect(2) leaves its entry behind. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);                /* thread id */
	__type(value, __u64);              /* its socket in SYN_SENT */
} pending_tid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tcp_count_key);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} count_slot SEC(".maps");

static __always_inline void count(const struct tcp_tuple *t)
{
	struct tcp_count_key key;
	__u32 zero = 0, *slot = bpf_map_lookup_elem(&count_slot, &zero);
	__u64 one = 1, *n;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memcpy(key.tuple.daddr, t->daddr, sizeof(key.tuple.daddr));
	key.tuple.dport = t->dport;
	key.tuple.family = t->family;
	if (count_by_tuple) {
		__builtin_memcpy(key.tuple.saddr, t->saddr, sizeof(key.tuple.saddr));
		key.tuple.sport = t->sport;
	}
	key.slot = slot ? *slot : 0;
	n = bpf_map_lookup_elem(&counts, &key);
	if (!n) {
		if (!bpf_map_update_elem(&counts, &key, &one, BPF_NOEXIST))
			return;
		n = bpf_map_lookup_elem(&counts, &key);  /* another CPU inserted it first */
	}
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		count_lost_event(&events_lost);  /* map full: a connection not counted */
}

static __always_inline int report(__u64 sk)
{
	struct trace_task *pending_task = bpf_map_lookup_elem(&pending, &sk);
	struct tcp_open_event ev;

	if (!pending_task)
		return 0;
	ev.task = *pending_task;
	if (bpf_map_delete_elem(&pending, &sk))
		return 0;  /* the other path claimed it */
	read_tcp_tuple((const struct sock *)sk, &ev.tuple);
	if (count_mode) {
		count(&ev.tuple);
		return 0;
	}
	fill_event_header(&ev.hdr, TRACE_EVENT_CONNECT);
	emit_event(&ev, sizeof(ev));
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int on_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 sk = (__u64)ctx->skaddr;
	struct trace_task task = {};
	__u32 tid;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (ctx->oldstate == TCP_SYN_SENT)
		return report(sk);
	if (ctx->oldstate != TCP_CLOSE || ctx->newstate != TCP_SYN_SENT || trace_skip())
		return 0;
	fill_task(&task);
	if (bpf_map_update_elem(&pending, &sk, &task, BPF_ANY)) {
		count_lost_event(&events_lost);
		return 0;
	}
	tid = task.tid;
	bpf_map_update_elem(&pending_tid, &tid, &sk, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_connect")
int exit_connect(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *pending_sk = bpf_map_lookup_elem(&pending_tid, &tid);
	__u64 sk;

	if (!pending_sk)
		return 0;
	sk = *pending_sk;
	bpf_map_delete_elem(&pending_tid, &tid);
	return report(sk);
}

char LICENSE[] SEC("license") = "GPL";
