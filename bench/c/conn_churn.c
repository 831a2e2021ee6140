/* Many short TCP connections, for measuring how many new connections a path admits per
 * second: the C twin of membrane/testing/connection_churn.py (same protocol, same output),
 * cheap enough that the path, not the client, bounds the rate. Each connection: a
 * non-blocking connect, 64 bytes once writable, their echo, close; a new one takes its
 * place, so INFLIGHT are always under way. Prints "ready", runs SECONDS after a line
 * "go SECONDS" on stdin, then one JSON object: connections, failures by errno name,
 * seconds, and each handshake's connect()-to-writable time in microseconds.
 *
 *     conn_churn 198.18.0.5 7000 16
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 64
#define STUCK_NS 1000000000LL /* a connection not done after 1 s is a timeout */
#define MAX_FDS 65536
#define MAX_KINDS 16

struct conn {
	long long started;
	int got; /* -1: connecting; else bytes of the echo read */
};

static struct conn conns[MAX_FDS];
static int open_fd[MAX_FDS];
static int epfd, inflight_now;
static struct sockaddr_in to;
static long long done;
static const char *kinds[MAX_KINDS];
static long long kind_count[MAX_KINDS];
static unsigned *lat;
static size_t nlat, caplat;

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void count(const char *kind)
{
	for (int i = 0; i < MAX_KINDS; i++) {
		if (!kinds[i])
			kinds[i] = kind;
		if (strcmp(kinds[i], kind) == 0) {
			kind_count[i]++;
			return;
		}
	}
}

static const char *errname(int err)
{
	switch (err) {
	case ECONNREFUSED: return "ECONNREFUSED";
	case ECONNRESET: return "ECONNRESET";
	case ETIMEDOUT: return "ETIMEDOUT";
	case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
	case ENETUNREACH: return "ENETUNREACH";
	case EHOSTUNREACH: return "EHOSTUNREACH";
	case EPERM: return "EPERM";
	case EMFILE: return "EMFILE";
	default: return "other";
	}
}

static void start(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (fd < 0 || fd >= MAX_FDS) {
		count(errname(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	long long t = now_ns(); /* before connect(): a connect hook's cost counts */
	if (connect(fd, (struct sockaddr *)&to, sizeof(to)) && errno != EINPROGRESS) {
		count(errname(errno));
		close(fd);
		return;
	}
	conns[fd].started = t;
	conns[fd].got = -1;
	open_fd[fd] = 1;
	inflight_now++;
	struct epoll_event ev = { .events = EPOLLOUT, .data.fd = fd };
	epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void end(int fd, const char *failure)
{
	open_fd[fd] = 0;
	inflight_now--;
	close(fd); /* also leaves the epoll set */
	if (failure)
		count(failure);
	else
		done++;
	start();
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s IP PORT INFLIGHT\n", argv[0]);
		return 2;
	}
	to.sin_family = AF_INET;
	to.sin_port = htons(atoi(argv[2]));
	if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
		fprintf(stderr, "%s is not an IPv4 address\n", argv[1]);
		return 2;
	}
	int inflight = atoi(argv[3]);
	printf("ready\n");
	fflush(stdout);
	double seconds;
	if (scanf("go %lf", &seconds) != 1) {
		fprintf(stderr, "expected `go SECONDS`\n");
		return 2;
	}
	epfd = epoll_create1(0);
	char payload[PAYLOAD], buf[PAYLOAD];
	memset(payload, 'm', sizeof(payload));
	for (int i = 0; i < inflight; i++)
		start();
	long long began = now_ns(), deadline = began + (long long)(seconds * 1e9);
	long long next_sweep = began + STUCK_NS, now;
	struct epoll_event events[256];
	while ((now = now_ns()) < deadline) {
		int wait_ms = (int)((deadline - now) / 1000000);
		int n = epoll_wait(epfd, events, 256, wait_ms < 100 ? wait_ms : 100);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (!open_fd[fd])
				continue;
			struct conn *c = &conns[fd];
			if (c->got < 0) {
				int err = 0;
				socklen_t len = sizeof(err);
				getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
				if (err) {
					end(fd, errname(err));
					continue;
				}
				if (nlat == caplat) {
					caplat = caplat ? caplat * 2 : 65536;
					lat = realloc(lat, caplat * sizeof(*lat));
				}
				lat[nlat++] = (unsigned)((now_ns() - c->started) / 1000);
				if (send(fd, payload, PAYLOAD, MSG_NOSIGNAL) != PAYLOAD) {
					end(fd, errname(errno));
					continue;
				}
				c->got = 0;
				struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
				epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
				continue;
			}
			ssize_t r = recv(fd, buf, PAYLOAD - c->got, 0);
			if (r < 0) {
				if (errno != EAGAIN)
					end(fd, errname(errno));
				continue;
			}
			if (r == 0) {
				end(fd, "closed");
				continue;
			}
			c->got += r;
			if (c->got >= PAYLOAD)
				end(fd, NULL);
		}
		if (now >= next_sweep) {
			for (int fd = 0; fd < MAX_FDS; fd++)
				if (open_fd[fd] && now - conns[fd].started > STUCK_NS)
					end(fd, "timeout");
			next_sweep = now + STUCK_NS;
		}
	}
	double elapsed = (now_ns() - began) / 1e9;
	printf("{\"pid\": %d, \"connections\": %lld, \"seconds\": %.6f, \"failed\": {", getpid(),
	       done, elapsed);
	for (int i = 0; i < MAX_KINDS && kinds[i]; i++)
		printf("%s\"%s\": %lld", i ? ", " : "", kinds[i], kind_count[i]);
	printf("}, \"connect_us\": [");
	for (size_t i = 0; i < nlat; i++)
		printf(i ? ",%u" : "%u", lat[i]);
	printf("]}\n");
	return 0;
}
