/* Shared by C and Python: the process lifecycle events of runtime security
 * (bpf/security_process.bpf.c). Python builds its types from this BTF. */
#ifndef MEMBRANE_ABI_SECURITY_H
#define MEMBRANE_ABI_SECURITY_H

#include "abi/events.h"

enum sec_proc_abi {
	SEC_PROC_PATH_MAX = 4096,  /* binary path and cwd, each (PATH_MAX) */
	SEC_PROC_ARGS_MAX = 4096,  /* argv bytes sent; more is flagged SEC_PROC_TRUNC_ARGS */
	SEC_PROC_DEPTH = 64,       /* path components walked; deeper is flagged truncated */
};
ABI_EXPORT_ENUM(sec_proc_abi);

enum sec_proc_event_type {
	SEC_PROC_EXEC = 1,  /* event_header.type */
	SEC_PROC_CLONE = 2,
	SEC_PROC_EXIT = 3,
};
ABI_EXPORT_ENUM(sec_proc_event_type);

enum sec_proc_flags {
	SEC_PROC_TRUNC_ARGS = 1,    /* argv was longer than SEC_PROC_ARGS_MAX */
	SEC_PROC_TRUNC_BINARY = 2,  /* the binary's path was deeper or longer than we walk */
	SEC_PROC_TRUNC_CWD = 4,
	SEC_PROC_NO_START = 8,      /* exit: the kernel did not know the process's start */
};
ABI_EXPORT_ENUM(sec_proc_flags);

/* A variable-length record: the fixed part, then binary_len bytes of the binary's path,
 * cwd_len of the working directory, args_len of argv (each argument with its NUL). Only
 * exec events carry data; clone and exit are the fixed part. */
struct sec_proc_event {
	struct event_header hdr;
	__u64 ktime;      /* the process's start (exec or clone), monotonic ns: its exec_id */
	__u64 cgroup_id;  /* cgroup v2 id */
	__u32 pid;        /* tgid */
	__u32 tid;
	__u32 ppid;       /* the parent's tgid (real_parent) */
	__u32 uid;        /* effective uid */
	__u32 auid;       /* loginuid; (u32)-1 when unset */
	__u32 netns;      /* network namespace inode */
	__s32 status;     /* exit: as wait(2) reports it */
	__u32 flags;      /* enum sec_proc_flags */
	__u16 binary_len;
	__u16 cwd_len;
	__u16 args_len;
	__u16 pad;
	char data[2 * SEC_PROC_PATH_MAX + SEC_PROC_ARGS_MAX];
};

/* The start of each live process, by tgid: the kernel side of its exec_id. */
struct sec_proc_start {
	__u64 ktime;
};

#endif
