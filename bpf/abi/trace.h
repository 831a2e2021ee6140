/* Shared by C and Python: events of the `membrane trace` tools. */
#ifndef MEMBRANE_ABI_TRACE_H
#define MEMBRANE_ABI_TRACE_H

#include "abi/events.h"

#define TRACE_TASK_COMM_LEN 16
#define TRACE_PATH_LEN 256

enum trace_event_type {
	TRACE_EVENT_OPEN = 1,
	TRACE_EVENT_EXEC = 2,
	TRACE_EVENT_EXIT = 3,
	TRACE_EVENT_CONNECT = 4,
	TRACE_EVENT_ACCEPT = 5,
	TRACE_EVENT_TCPLIFE = 6,
};
ABI_EXPORT_ENUM(trace_event_type);

/* What every process-context event carries. */
struct trace_task {
	__u32 pid;       /* tgid */
	__u32 tid;
	__u32 uid;
	__u32 pad;
	char comm[TRACE_TASK_COMM_LEN];
};

struct open_event {
	struct event_header hdr;
	struct trace_task task;
	__s64 ret;       /* fd, or -errno */
	__s64 flags;     /* open(2) flags */
	__u32 syscall;   /* 0 openat, 1 openat2 */
	__u32 pad;
	char path[TRACE_PATH_LEN];
};

#endif
