/* Shared by C and Python: the configuration and events of one TracingPolicy hook
 * (bpf/security_policy.bpf.c). Python builds its types from this BTF.
 *
 * A hook's selectors are load-time constants (struct sp_hook_config in .rodata), so the
 * verifier prunes every selector, filter and value slot the policy does not use. String,
 * binary and address values live in maps (sp_strings, sp_binaries), looked up once per
 * filter: the cost of a filter does not grow with its number of values.
 */
#ifndef MEMBRANE_ABI_SECURITY_POLICY_H
#define MEMBRANE_ABI_SECURITY_POLICY_H

#include "abi/events.h"

enum sp_abi {
	SP_MAX_ARGS = 5,         /* args a hook reads */
	SP_MAX_SELECTORS = 5,    /* Tetragon's limit too */
	SP_MAX_ARG_FILTERS = 4,  /* matchArgs per selector */
	SP_MAX_VALUES = 8,       /* integer values per filter (strings/addresses: a map) */
	SP_MAX_NS_FILTERS = 2,   /* matchNamespaces per selector */
	SP_MAX_CAP_FILTERS = 2,  /* matchCapabilities per selector */
	SP_STR_MAX = 256,        /* bytes of a string argument that events see */
	SP_LPM_STR = 248,        /* bytes of it filters see (an LPM key holds <= 256 bytes) */
	SP_SOCKADDR_MAX = 28,    /* sizeof(struct sockaddr_in6) */
	SP_COMM_LEN = 16,
	SP_EVENT_POLICY = 1,     /* event_header.type */
};
ABI_EXPORT_ENUM(sp_abi);

enum sp_hook_kind {
	SP_HOOK_TRACEPOINT = 1,
	SP_HOOK_UPROBE = 2,
	SP_HOOK_KPROBE = 3,
};
ABI_EXPORT_ENUM(sp_hook_kind);

enum sp_arg_type {
	SP_ARG_NONE = 0,
	SP_ARG_INT = 1,       /* signed, sign-extended from its size */
	SP_ARG_UINT = 2,
	SP_ARG_STRING = 3,    /* pointer to a user string */
	SP_ARG_SOCKADDR = 4,  /* pointer to a user struct sockaddr */
	SP_ARG_DATA_LOC_STRING = 5,  /* a tracepoint's __data_loc char[]: in the record */
	SP_ARG_KERNEL_STRING = 6,    /* pointer to a kernel string (a kprobe's argument) */
};
ABI_EXPORT_ENUM(sp_arg_type);

enum sp_op {
	SP_OP_EQUAL = 1,
	SP_OP_NOT_EQUAL = 2,
	SP_OP_PREFIX = 3,
	SP_OP_NOT_PREFIX = 4,
	SP_OP_POSTFIX = 5,
	SP_OP_NOT_POSTFIX = 6,
	SP_OP_GT = 7,
	SP_OP_LT = 8,
	SP_OP_MASK = 9,
	SP_OP_DPORT = 10,
	SP_OP_NOT_DPORT = 11,
	SP_OP_DADDR = 12,
	SP_OP_NOT_DADDR = 13,
	SP_OP_FAMILY = 14,
	SP_OP_NOT_FAMILY = 15,
};
ABI_EXPORT_ENUM(sp_op);

/* What a matching selector does; the event's action is the first of these it has. */
enum sp_action {
	SP_ACTION_POST = 1,
	SP_ACTION_NOPOST = 2,
	SP_ACTION_SIGKILL = 3,
	SP_ACTION_SIGNAL = 4,
	SP_ACTION_OVERRIDE = 5,  /* connect/sendto: refused (EPERM) by the cgroup hook */
};
ABI_EXPORT_ENUM(sp_action);

enum sp_set_op {
	SP_SET_IN = 1,
	SP_SET_NOT_IN = 2,
	SP_SET_PREFIX = 3,      /* matchBinaries: the executable's path starts with a value */
	SP_SET_NOT_PREFIX = 4,
};
ABI_EXPORT_ENUM(sp_set_op);

struct sp_arg_spec {
	__u16 offset;  /* tracepoint: byte offset in the record; uprobe: parameter number */
	__u8 size;     /* ints: bytes of the field (1, 2, 4, 8); strings: slot in the event */
	__u8 type;     /* enum sp_arg_type */
};

struct sp_arg_filter {
	__u8 arg;       /* index into sp_hook_config.args */
	__u8 op;        /* enum sp_op */
	__u8 nvalues;   /* integer values used */
	__u8 lead_len;  /* strings: bytes of `lead` every value starts with (0: none) */
	__u32 map_id;   /* key prefix of this filter's strings/addresses in sp_strings */
	__u64 lead;     /* the values' common first bytes: a string that does not start
			 * with them is decided on 8 bytes, without reading it whole */
	__u64 values[SP_MAX_VALUES];
};

struct sp_ns_filter {
	__u8 ns;       /* 0 uts, 1 ipc, 2 mnt, 3 net, 4 cgroup, 5 user, 6 pid_for_children */
	__u8 op;       /* enum sp_set_op */
	__u8 nvalues;
	__u8 pad;
	__u32 values[SP_MAX_VALUES];  /* namespace inode numbers */
};

struct sp_cap_filter {
	__u8 set;      /* 0 effective, 1 inheritable, 2 permitted */
	__u8 op;       /* enum sp_set_op: In = any of mask held, NotIn = none held */
	__u16 pad;
	__u32 pad2;
	__u64 mask;
};

struct sp_selector {
	__u8 nargs;          /* arg filters used */
	__u8 nns;            /* namespace filters used */
	__u8 ncaps;          /* capability filters used */
	__u8 binaries_op;    /* 0: none, else enum sp_set_op: In/NotIn by inode identity
			      * (sp_binaries), Prefix/NotPrefix on the path (sp_strings) */
	__u8 pids_op;        /* 0: none, else enum sp_set_op */
	__u8 npids;
	__u8 pids_follow_forks;
	__u8 action;         /* enum sp_action */
	__u8 post;           /* emit an event */
	__u8 signal;         /* bpf_send_signal(signal) when not 0 */
	__u8 override;       /* refuse the call (connect/sendto) through the cgroup hook */
	__u8 pad;
	__u32 binaries_id;   /* key prefix in sp_binaries */
	__u32 pids[SP_MAX_VALUES];
	struct sp_ns_filter ns[SP_MAX_NS_FILTERS];
	struct sp_cap_filter caps[SP_MAX_CAP_FILTERS];
	struct sp_arg_filter args[SP_MAX_ARG_FILTERS];
};

struct sp_hook_config {
	__u32 hook_id;      /* the agent's number for this hook (events name it) */
	__u8 kind;          /* enum sp_hook_kind */
	__u8 nargs;
	__u8 nselectors;    /* 0: every call is posted */
	__u8 scoped;        /* only tasks whose net namespace is in sp_scope */
	__u8 has_override;  /* some selector refuses the call: tickets for the cgroup hook */
	__u8 syscall;       /* kprobe on a syscall wrapper: its args are in the inner pt_regs */
	__u8 pad[2];
	struct sp_arg_spec args[SP_MAX_ARGS];
	struct sp_selector selectors[SP_MAX_SELECTORS];
};

/* Strings (forward for Equal/Prefix, reversed for Postfix) and addresses (16 bytes,
 * IPv4 as ::ffff:a.b.c.d) of the filter map_id, in one LPM trie. prefixlen counts the 32
 * bits of map_id; an Equal value includes its terminating NUL, so only the whole string
 * matches it. */
struct sp_lpm_key {
	__u32 prefixlen;
	__u32 map_id;
	__u8 data[SP_LPM_STR];
};

/* matchBinaries values: the executable's identity, so symlinks and hard links of the
 * binary match it wherever it is exec'd from. dev is the kernel's s_dev encoding. */
struct sp_binary_key {
	__u32 binaries_id;
	__u32 dev;
	__u64 ino;
};

/* A refusal the tracepoint decided for the cgroup sock_addr hook of the same syscall,
 * per thread. It names the destination, so a ticket left by a call that failed before
 * reaching the hook never refuses another. */
struct sp_deny_ticket {
	__u32 hook_id;
	__u16 family;
	__u16 port;       /* host order */
	__u8 addr[16];    /* IPv4 as ::ffff:a.b.c.d */
};

struct sp_event {
	struct event_header hdr;
	__u32 hook_id;
	__u32 pid;          /* tgid */
	__u32 tid;
	__u32 uid;
	__u32 ppid;
	__u32 netns;        /* net namespace inode: names the pod */
	__u64 ktime_start;  /* the task's start (for Tetragon's exec_id) */
	__u8 selector;      /* 1-based; 0: the hook has no selectors */
	__u8 action;        /* enum sp_action */
	__u8 nargs;
	__u8 pad;
	__u32 pad2;
	char comm[SP_COMM_LEN];
	__u64 args[SP_MAX_ARGS];                 /* int values; strings: their length */
	__u8 sockaddr[SP_SOCKADDR_MAX];          /* the first sockaddr argument */
	__u32 pad3;
	char strings[2][SP_STR_MAX];             /* the first two string arguments */
};

#endif
