/* TCP sockets for the trace tools, read with CO-RE (no kernel headers).
 *
 *   read_tcp_tuple(sk, &tuple)      addresses and ports of a socket (struct tcp_tuple)
 *   sock_of_fd(fd)                  the struct sock behind a file descriptor of the current
 *                                   task, or NULL
 *   is_inet_tcp(sk)                 an AF_INET/AF_INET6 TCP socket (not MPTCP, not unix)
 *
 * The local port is read from inet_sport, not skc_num: on the way to TCP_CLOSE the kernel
 * releases the port (skc_num = 0) before the state change we trace, inet_sport stays.
 */
#ifndef MEMBRANE_LIB_TCP_SOCK_H
#define MEMBRANE_LIB_TCP_SOCK_H

#define TRACE_AF_INET 2
#define TRACE_AF_INET6 10

static __always_inline void read_tcp_tuple(const struct sock *sk, struct tcp_tuple *t)
{
	const struct inet_sock *inet = (const struct inet_sock *)sk;

	__builtin_memset(t, 0, sizeof(*t));
	t->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	t->sport = bpf_ntohs(BPF_CORE_READ(inet, inet_sport));
	t->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (t->family == TRACE_AF_INET6) {
		BPF_CORE_READ_INTO(&t->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&t->daddr, sk, __sk_common.skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__u32 *)t->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)t->daddr, sk, __sk_common.skc_daddr);
	}
}

static __always_inline bool is_inet_tcp(const struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	return (family == TRACE_AF_INET || family == TRACE_AF_INET6) &&
	       BPF_CORE_READ(sk, sk_protocol) == IPPROTO_TCP;
}

/* task->files->fdt->fd[fd]->private_data is the struct socket of a socket file. Only
 * call it for an fd known to be a socket (one accept() just returned). */
static __always_inline struct sock *sock_of_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *file = NULL;
	struct socket *sock;

	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	return sock ? BPF_CORE_READ(sock, sk) : NULL;
}

#endif
