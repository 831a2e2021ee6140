/* Shared by C and Python: events of the `membrane trace` tools. */
#ifndef MEMBRANE_ABI_TRACE_H
#define MEMBRANE_ABI_TRACE_H

#include "abi/events.h"

#define TRACE_TASK_COMM_LEN 16
#define TRACE_PATH_LEN 256
#define OPEN_PATH_MAX 4096  /* PATH_MAX: open paths are sent whole, as long as they are */

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

/* A variable-length record: the fixed part, then path_len bytes of path (its NUL
 * included; 0 when it could not be read). Only those bytes go into the ring, so a
 * 30-byte path costs a 112-byte record, not a 4 KiB one. */
struct open_event {
	struct event_header hdr;
	struct trace_task task;
	__s64 ret;       /* fd, or -errno */
	__s64 flags;     /* open(2) flags */
	__u32 syscall;   /* 0 openat, 1 openat2, 2 open */
	__u32 path_len;
	char path[OPEN_PATH_MAX];
};

#endif
