/* Shared by C and Python: events and map keys of the TCP trace tools (connect, accept,
 * tcplife, tcp-count). */
#ifndef MEMBRANE_ABI_TRACE_TCP_H
#define MEMBRANE_ABI_TRACE_TCP_H

#include "abi/trace.h"

/* A connection as its socket sees it. IPv4 addresses fill the first 4 bytes of the
 * arrays; an AF_INET6 socket talking to an IPv4 peer has v4-mapped addresses. Ports are
 * in host byte order. */
struct tcp_tuple {
	__u8 saddr[16];  /* local */
	__u8 daddr[16];  /* remote */
	__u16 sport;
	__u16 dport;
	__u16 family;    /* AF_INET (2) or AF_INET6 (10) */
	__u16 pad;
};

/* connect (type TRACE_EVENT_CONNECT) and accept (TRACE_EVENT_ACCEPT): who opened which
 * connection. */
struct tcp_open_event {
	struct event_header hdr;
	struct trace_task task;
	struct tcp_tuple tuple;
};

/* tcplife (TRACE_EVENT_TCPLIFE): one per closed connection. */
struct tcp_life_event {
	struct event_header hdr;
	struct trace_task task;  /* the connecting, accepting or closing process; pid 0 when
	                          * no process touched the socket while we traced */
	struct tcp_tuple tuple;
	__u64 duration_ns;       /* from SYN_SENT/SYN_RECV (or the first state seen) to CLOSE */
	__u64 tx_bytes;          /* data sent and acknowledged by the peer */
	__u64 rx_bytes;          /* data received */
	__u32 open_state;        /* TCP_SYN_SENT (2): we connected; TCP_SYN_RECV (3): we
	                          * accepted; TCP_ESTABLISHED (1): opened before the trace */
	__u32 pad;
};

/* tcp-count: connections per key. `slot` alternates every interval (see
 * src/membrane/trace/tools/tcp_count.py), so user space reads one interval's counts while
 * the kernel fills the other's. */
struct tcp_count_key {
	struct tcp_tuple tuple;  /* destination only (saddr, sport zero) unless by tuple */
	__u32 slot;
	__u32 pad;
};

#endif
