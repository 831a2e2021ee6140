/* Shared by C and Python: events of `membrane trace exec` and `membrane trace exit`. */
#ifndef MEMBRANE_ABI_TRACE_PROC_H
#define MEMBRANE_ABI_TRACE_PROC_H

#include "abi/trace.h"

/* argv is copied at syscall entry into fixed slots: the first EXEC_MAX_ARGS arguments,
 * each cut to EXEC_ARG_LEN - 1 bytes. Fixed-size records keep bulk decoding possible. */
#define EXEC_MAX_ARGS 20
#define EXEC_ARG_LEN 128

enum exec_flags {
	EXEC_ARGS_MORE = 1,  /* argv had more than EXEC_MAX_ARGS arguments */
	EXEC_ARG_CUT = 2,    /* at least one argument was longer than EXEC_ARG_LEN - 1 */
	EXEC_ARG_FAULT = 4,  /* an argument could not be read (not resident, bad pointer) */
};
ABI_EXPORT_ENUM(exec_flags);

struct exec_event {
	struct event_header hdr;
	struct trace_task task;   /* after a successful exec: the new command name */
	__s64 ret;                /* 0, or -errno */
	__u32 ppid;               /* parent's tgid (task->real_parent) */
	__u32 argc;               /* arguments copied into argv */
	__u32 flags;              /* enum exec_flags */
	__u32 syscall;            /* 0 execve, 1 execveat */
	char path[TRACE_PATH_LEN];            /* the filename argument, as passed */
	char argv[EXEC_MAX_ARGS][EXEC_ARG_LEN];
};

struct exit_event {
	struct event_header hdr;
	struct trace_task task;   /* comm: the process's (its leader's) name, or the thread's
				   * with --per-thread */
	__u64 lifetime_ns;        /* exit time - start time of the process (or thread) */
	__u32 ppid;
	__s32 status;             /* as wait(2) reports it: code << 8, or signal | 0x80 core */
	__u32 ends_process;       /* 1 when this was the process's last thread */
	__u32 pad;
};

#endif
