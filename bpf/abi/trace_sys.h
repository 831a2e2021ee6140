/* Shared by C and Python: `membrane trace syscalls` and `membrane trace latency`.
 *
 * Both tools aggregate in the kernel (per-CPU hash maps) and send nothing per call: user
 * space reads the maps once per interval. The counters only grow; each report is the
 * difference to the previous read, so reading never races with the programs' updates.
 */
#ifndef MEMBRANE_ABI_TRACE_SYS_H
#define MEMBRANE_ABI_TRACE_SYS_H

#include "abi/export.h"

#define SYS_COMM_LEN 16
#define SYS_HIST_SLOTS 64  /* log2 slots: slot i holds values in [2^(i-1), 2^i - 1] */

enum sys_abi {
	SYS_NR_MAX = 1024, /* syscall numbers the latency tool can select (x86_64 < 512) */
};
ABI_EXPORT_ENUM(sys_abi);

/* `syscalls`: one counter set per syscall, or per (process, syscall) with --per-process. */
struct sys_key {
	__u32 pid;       /* tgid; 0 unless --per-process */
	__s32 nr;        /* syscall number as the kernel saw it (-1 and unknown ones too) */
};

struct sys_stats {
	__u64 count;     /* completed calls */
	__u64 errors;    /* calls that returned -4095..-1 (an errno) */
	__u64 total_ns;  /* sum of entry-to-exit times */
};

/* --per-process: map `comms`, pid -> the process's name (its leader's comm) when first
 * seen, renewed by each successful exec. */
struct sys_comm {
	char comm[SYS_COMM_LEN];
};

/* `latency`: a log2 histogram of one syscall's entry-to-exit time, in the chosen unit. */
struct sys_hist {
	__u64 slots[SYS_HIST_SLOTS];
};

#endif
