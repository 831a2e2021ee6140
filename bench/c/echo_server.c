/* A TCP echo server in C for connection-rate benchmarks: one listener per process on PORT
 * with SO_REUSEPORT (the kernel spreads connections over PROCESSES), epoll, everything
 * read written back, a connection closed when its peer closes. Prints "ready" once every
 * process listens; runs until killed (the process group ends with it).
 *
 *     echo_server 7000 2
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int listener(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4096)) {
		perror("listen");
		exit(1);
	}
	return fd;
}

static void serve(int lfd)
{
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd }, events[256];
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	char buf[4096];
	for (;;) {
		int n = epoll_wait(ep, events, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd == lfd) {
				int c;
				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					struct epoll_event cev = { .events = EPOLLIN, .data.fd = c };
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));
			if (r > 0) {
				if (write(fd, buf, r) != r)
					close(fd);
			} else if (r == 0 || errno != EAGAIN) {
				close(fd);
			}
		}
	}
}

static pid_t children[64];
static int nchildren;

static void stop(int sig)
{
	(void)sig;
	for (int i = 0; i < nchildren; i++)
		kill(children[i], SIGKILL);
	while (wait(NULL) > 0) /* reaped here: no zombie left to an init that may not reap */
		;
	_exit(0);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s PORT PROCESSES\n", argv[0]);
		return 2;
	}
	int port = atoi(argv[1]), processes = atoi(argv[2]);
	int fds[64];
	for (int i = 0; i < processes && i < 64; i++)
		fds[i] = listener(port); /* all bound before "ready" */
	signal(SIGTERM, stop);
	signal(SIGINT, stop);
	for (int i = 0; i < processes && i < 64; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL); /* end with the parent, even on SIGKILL */
			serve(fds[i]);
		}
		children[nchildren++] = pid;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
