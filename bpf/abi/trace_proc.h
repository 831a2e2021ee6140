/* Shared by C and Python: events of `membrane trace exec` and `membrane trace exit`. */
#ifndef MEMBRANE_ABI_TRACE_PROC_H
#define MEMBRANE_ABI_TRACE_PROC_H

#include "abi/trace.h"

/* At syscall entry the path and argv are copied, one after the other, each with its NUL,
 * as long as they are: up to EXEC_MAX_ARGS arguments and EXEC_DATA_MAX bytes in all (the
 * path up to PATH_MAX). Only the used bytes go into the ring. */
#define EXEC_MAX_ARGS 128
#define EXEC_DATA_MAX 8192
#define EXEC_PATH_MAX 4096

enum exec_flags {
	EXEC_ARGS_MORE = 1,  /* argv had more arguments than were copied */
	EXEC_ARG_CUT = 2,    /* the last argument copied was cut (EXEC_DATA_MAX reached) */
	EXEC_ARG_FAULT = 4,  /* an argument could not be read (not resident, bad pointer) */
};
ABI_EXPORT_ENUM(exec_flags);

struct exec_event {
	struct event_header hdr;
	struct trace_task task;   /* after a successful exec: the new command name */
	__s64 ret;                /* 0, or -errno */
	__u32 ppid;               /* parent's tgid (task->real_parent) */
	__u32 argc;               /* arguments copied into data */
	__u32 flags;              /* enum exec_flags */
	__u32 syscall;            /* 0 execve, 1 execveat */
	__u32 path_len;           /* the filename argument's bytes in data, with its NUL */
	__u32 data_len;           /* bytes used in data (the record's length after it) */
	/* path\0arg0\0arg1\0...: the filename as passed, then argv. Twice EXEC_DATA_MAX:
	 * each copy may then be as long as what is left, within bounds the verifier sees. */
	char data[2 * EXEC_DATA_MAX];
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
