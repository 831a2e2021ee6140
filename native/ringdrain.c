// SPDX-License-Identifier: Apache-2.0
/* A BPF ring buffer of fixed-size records drained by a thread of its own, which never
 * takes Python's GIL: the agent's flow events leave the kernel's ring as soon as the
 * producers wake us, however busy the interpreter is (a follower being served, a large
 * query), and wait in a staging ring in our memory until the Python reader takes them
 * (src/membrane/native/ringdrain.py is the binding).
 *
 *   mb_drain_start  the thread, on an mmap'ed ring (data area mapped twice in a row, so a
 *                   record that wraps is contiguous) and an edge-triggered epoll fd woken
 *                   by the producers when their backlog crosses `rearm_bytes` (their
 *                   events_wakeup_bytes); it writes to `notify_fd` (an eventfd) after
 *                   staging records
 *   mb_drain_take   staged records out, oldest first, into the caller's buffer
 *   mb_drain_stop   ends the thread and frees
 *
 * The counters (records staged, taken, dropped because the staging ring was full, too
 * short; the priority the thread got) are in memory the caller gives and reads directly.
 * One producer (the thread) and one consumer (mb_drain_take) of the staging ring: HEAD is
 * written by the thread only, TAIL by the taker only, each published with a release store
 * and read with an acquire load.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HEADER 8

/* The counters, in memory the caller gives (u64[MB_DRAIN_COUNTERS]): it reads them without
 * a call. */
enum { MB_HEAD, MB_TAIL, MB_DROPPED, MB_SHORT, MB_PRIORITY, MB_DRAIN_COUNTERS };

struct mb_drain {
	const uint8_t *data;  /* the ring's data area */
	uint64_t mask;        /* ring size - 1 */
	uint64_t *consumer;   /* the consumer position (our page) */
	const uint64_t *producer;
	int epoll_fd;
	int notify_fd;
	int timeout_ms;       /* the longest a record waits below the producers' wakeup */
	uint64_t rearm_bytes; /* the producers' wakeup threshold (or less) */
	uint32_t record_size; /* bytes staged per record */
	uint8_t *staging;
	uint64_t capacity;    /* staged records; a power of two */
	/* HEAD: records ever staged; TAIL: ever taken; DROPPED: the staging ring had no room;
	 * SHORT: shorter than a row; PRIORITY: 2 real-time, 1 nice -20, 0 as created */
	uint64_t *counters;
	int stop;
	pthread_t thread;
};

/* Everything committed: staged, or counted. Returns 1 when it stopped at a record still
 * being written (the caller looks again soon: that record's wakeup may be gone). */
static int drain_once(struct mb_drain *d)
{
	uint64_t *c = d->counters;
	uint64_t staged = c[MB_HEAD];
	uint64_t cons = __atomic_load_n(d->consumer, __ATOMIC_RELAXED);
	uint64_t prod = __atomic_load_n(d->producer, __ATOMIC_ACQUIRE);
	uint64_t head = staged;
	uint64_t tail = __atomic_load_n(&c[MB_TAIL], __ATOMIC_ACQUIRE);
	uint64_t slots = d->capacity - 1;
	int busy = 0;

	while (cons < prod) {
		uint32_t len = __atomic_load_n((const uint32_t *)(d->data + (cons & d->mask)),
					       __ATOMIC_ACQUIRE);
		uint32_t size = len & ~(RB_BUSY | RB_DISCARD);

		if (len & RB_BUSY) {
			busy = 1;
			break;
		}
		if (!(len & RB_DISCARD)) {
			if (size < d->record_size) {
				__atomic_fetch_add(&c[MB_SHORT], 1, __ATOMIC_RELAXED);
			} else if (head - tail >= d->capacity &&
				   head - (tail = __atomic_load_n(&c[MB_TAIL], __ATOMIC_ACQUIRE)) >=
					   d->capacity) {
				__atomic_fetch_add(&c[MB_DROPPED], 1, __ATOMIC_RELAXED);
			} else {
				memcpy(d->staging + (head & slots) * d->record_size,
				       d->data + (cons & d->mask) + RB_HEADER, d->record_size);
				head++;
			}
		}
		cons += ((uint64_t)size + RB_HEADER + 7) & ~7ull;
	}
	__atomic_store_n(&c[MB_HEAD], head, __ATOMIC_RELEASE);
	/* the records are copied: their space goes back to the producers */
	__atomic_store_n(d->consumer, cons, __ATOMIC_RELEASE);
	if (head != staged) {
		uint64_t one = 1;

		if (write(d->notify_fd, &one, sizeof(one)) < 0) {
			/* EAGAIN: the counter is full of wakeups the reader has yet to read */
		}
	}
	return busy;
}

/* Ahead of every ordinary thread of the machine, so that a busy CPU (the flood's senders,
 * a follower's client) never delays the drain: real-time if we may (its work is bounded by
 * the producers' rate, ~0.1 us a record), else the highest ordinary priority. */
static int raise_priority(void)
{
	struct sched_param param = {.sched_priority = 1};

	if (!pthread_setschedparam(pthread_self(), SCHED_FIFO, &param))
		return 2;
	if (!setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), -20))
		return 1;
	return 0;
}

static void *run(void *arg)
{
	struct mb_drain *d = arg;
	struct epoll_event event;
	int busy = 0;

	__atomic_store_n(&d->counters[MB_PRIORITY], (uint64_t)raise_priority(), __ATOMIC_RELEASE);

	while (!__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
		busy = drain_once(d);
		/* The producers wake us when their backlog crosses the threshold from below: if
		 * what came during the drain is already past it, no wakeup will come for it. */
		if (!busy && __atomic_load_n(d->producer, __ATOMIC_ACQUIRE) -
					     __atomic_load_n(d->consumer, __ATOMIC_RELAXED) >=
				     d->rearm_bytes)
			continue;
		epoll_wait(d->epoll_fd, &event, 1, busy ? 1 : d->timeout_ms);
	}
	return NULL;
}

void *mb_drain_start(const uint8_t *data, uint64_t mask, uint64_t *consumer,
		     const uint64_t *producer, int epoll_fd, int notify_fd, int timeout_ms,
		     uint64_t rearm_bytes, uint32_t record_size, uint64_t capacity,
		     uint64_t *counters)
{
	struct mb_drain *d;
	int err;

	if (!record_size || !capacity || capacity & (capacity - 1)) {
		errno = EINVAL;
		return NULL;
	}
	d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->staging = malloc(capacity * record_size);
	if (!d->staging) {
		free(d);
		return NULL;
	}
	d->data = data;
	d->mask = mask;
	d->consumer = consumer;
	d->producer = producer;
	d->epoll_fd = epoll_fd;
	d->notify_fd = notify_fd;
	d->timeout_ms = timeout_ms;
	d->rearm_bytes = rearm_bytes;
	d->record_size = record_size;
	d->capacity = capacity;
	d->counters = counters;
	err = pthread_create(&d->thread, NULL, run, d);
	if (err) {
		free(d->staging);
		free(d);
		errno = err;
		return NULL;
	}
	return d;
}

uint64_t mb_drain_take(struct mb_drain *d, uint8_t *out, uint64_t max)
{
	uint64_t *c = d->counters;
	uint64_t tail = c[MB_TAIL];
	uint64_t head = __atomic_load_n(&c[MB_HEAD], __ATOMIC_ACQUIRE);
	uint64_t n = head - tail < max ? head - tail : max;
	uint64_t slots = d->capacity - 1;
	uint64_t first = tail & slots;
	uint64_t run = n < d->capacity - first ? n : d->capacity - first;

	memcpy(out, d->staging + first * d->record_size, run * d->record_size);
	memcpy(out + run * d->record_size, d->staging, (n - run) * d->record_size);
	__atomic_store_n(&c[MB_TAIL], tail + n, __ATOMIC_RELEASE);
	return n;
}

void mb_drain_stop(struct mb_drain *d)
{
	__atomic_store_n(&d->stop, 1, __ATOMIC_RELEASE);
	pthread_join(d->thread, NULL); /* the caller made its epoll fd ready (or timeout_ms) */
	free(d->staging);
	free(d);
}
