// SPDX-License-Identifier: GPL-2.0
/* `membrane trace tcplife`: one event per closed TCP connection with its duration and the
 * bytes it moved, from sock:inet_sock_set_state.
 *
 * A socket is tracked (`lives`) from its first opening state (SYN_SENT: we connect;
 * SYN_RECV: a child of a listener; ESTABLISHED: the handshake began before the trace)
 * and reported at CLOSE.
 *
 * Bytes: struct tcp_sock's bytes_acked and bytes_received (RFC 4898) count sequence
 * space, which includes the SYN and FIN flags. The event carries data bytes, so they are
 * taken out: our SYN was acked if we connected and anything was acked (a child of a
 * listener starts with its SYN-ACK already acked); our FIN was acked if we sent one (we
 * went through FIN_WAIT1 or LAST_ACK) and snd_una reached write_seq (which counts it);
 * the peer's FIN was received if SOCK_DONE is set (tcp_fin() sets it, and tcp_done()
 * has not yet run when the CLOSE tracepoint fires).
 *
 * The process is learnt where one is current: CLOSE -> SYN_SENT runs in the connecting
 * thread; a passive connection gets its process when accept(2)/accept4(2) returns it (the
 * fd is walked to the socket, as `trace accept` does); failing both (accepted before the
 * trace began), the process that starts the close (-> FIN_WAIT1 or -> LAST_ACK, both only
 * from close()/shutdown()). Where a process is learnt, the filters apply: a socket of a
 * filtered-out process is forgotten. A socket no process touched is reported with pid 0,
 * unless filters are set.
 */
#include "include/trace.h"
#include "abi/trace_tcp.h"
#include "lib/events.h"
#include "lib/task.h"
#include "lib/trace_filter.h"
#include "lib/tcp_sock.h"

EVENTS_RINGBUF();
ABI_EXPORT(tcp_life_event);

struct life {
	__u64 start_ns;
	struct trace_task task;
	__u32 open_state;
	__u8 owned;     /* task is known */
	__u8 fin_sent;  /* went through FIN_WAIT1 or LAST_ACK */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);  /* struct sock * */
	__type(value, struct life);
} lives SEC(".maps");

static __always_inline bool filters_set(void)
{
	return filter_pid || filter_uid != (__u32)-1 || filter_comm_set;
}

/* The current process touches `sk`: it owns the socket unless one already does. */
static __always_inline void own(__u64 sk, bool fin_sent)
{
	struct life *life = bpf_map_lookup_elem(&lives, &sk);

	if (!life)
		return;
	if (fin_sent)
		life->fin_sent = 1;
	if (life->owned)
		return;
	if (trace_skip()) {
		bpf_map_delete_elem(&lives, &sk);
		return;
	}
	fill_task(&life->task);
	life->owned = 1;
}

/* Data bytes each way (see the top of this file). */
static __always_inline void count_bytes(const struct sock *sk, const struct life *life,
					struct tcp_life_event *ev)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	__u64 acked = BPF_CORE_READ(tp, bytes_acked);
	__u64 received = BPF_CORE_READ(tp, bytes_received);
	__u64 flags = BPF_CORE_READ(sk, __sk_common.skc_flags);

	if (life->open_state == TCP_SYN_SENT && acked)
		acked--;
	if (life->fin_sent && acked && BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq))
		acked--;
	if (flags & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE)) && received)
		received--;
	ev->tx_bytes = acked;
	ev->rx_bytes = received;
}

static __always_inline void start(__u64 sk, __u32 state)
{
	struct life life = { .start_ns = bpf_ktime_get_ns(), .open_state = state };

	if (state == TCP_SYN_SENT) {  /* the connecting thread */
		if (trace_skip())
			return;
		fill_task(&life.task);
		life.owned = 1;
	}
	if (bpf_map_update_elem(&lives, &sk, &life, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&lives, &sk))
		count_lost_event(&events_lost);  /* full: this connection goes unreported */
}

static __always_inline int report(__u64 sk)
{
	struct life *tracked = bpf_map_lookup_elem(&lives, &sk);
	struct tcp_life_event ev;
	struct life life;
	__u64 now = bpf_ktime_get_ns();

	if (!tracked)
		return 0;
	life = *tracked;
	if (bpf_map_delete_elem(&lives, &sk))
		return 0;
	if (!life.owned && filters_set())
		return 0;
	fill_event_header(&ev.hdr, TRACE_EVENT_TCPLIFE);
	ev.task = life.task;
	read_tcp_tuple((const struct sock *)sk, &ev.tuple);
	ev.duration_ns = now - life.start_ns;
	count_bytes((const struct sock *)sk, &life, &ev);
	ev.open_state = life.open_state;
	ev.pad = 0;
	emit_event(&ev, sizeof(ev));
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int on_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 sk = (__u64)ctx->skaddr;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	switch (ctx->newstate) {
	case TCP_SYN_SENT:
	case TCP_SYN_RECV:
	case TCP_ESTABLISHED:
		start(sk, ctx->newstate);
		break;
	case TCP_FIN_WAIT1:
	case TCP_LAST_ACK:
		own(sk, true);
		break;
	case TCP_CLOSE:
		report(sk);
		break;
	}
	return 0;
}

static __always_inline int accepted(long fd)
{
	struct sock *sk;

	if (fd < 0)
		return 0;
	sk = sock_of_fd(fd);
	if (sk)
		own((__u64)sk, false);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int exit_accept(struct trace_event_raw_sys_exit *ctx)
{
	return accepted(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int exit_accept4(struct trace_event_raw_sys_exit *ctx)
{
	return accepted(ctx->ret);
}

char LICENSE[] SEC("license") = "GPL";
