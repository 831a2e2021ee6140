// SPDX-License-Identifier: GPL-2.0
/* `membrane trace accept` (tcpaccept): passive TCP opens as the accepting process sees them.
 *
 * The handshake completes in softirq, where no process is current, and the kretprobe on
 * inet_csk_accept that bcc uses is not available here. So the event is taken where the
 * process is current: the return of accept(2)/accept4(2). The returned fd is walked to its
 * socket with CO-RE (task->files->fdt->fd[fd]->private_data->sk) and the socket gives the
 * addresses. Filters apply to the accepting thread. Accepts that do not return through the
 * syscalls (io_uring) are not seen.
 */
#include "include/trace.h"
#include "abi/trace_tcp.h"
#include "lib/events.h"
#include "lib/task.h"
#include "lib/trace_filter.h"
#include "lib/tcp_sock.h"

EVENTS_RINGBUF();
ABI_EXPORT(tcp_open_event);

static __always_inline int report(long fd)
{
	struct tcp_open_event ev = {};
	struct sock *sk;

	if (fd < 0 || trace_skip())
		return 0;
	sk = sock_of_fd(fd);
	if (!sk || !is_inet_tcp(sk))
		return 0;
	fill_event_header(&ev.hdr, TRACE_EVENT_ACCEPT);
	fill_task(&ev.task);
	read_tcp_tuple(sk, &ev.tuple);
	emit_event(&ev, sizeof(ev));
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int exit_accept(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int exit_accept4(struct trace_event_raw_sys_exit *ctx)
{
	return report(ctx->ret);
}

char LICENSE[] SEC("license") = "GPL";
