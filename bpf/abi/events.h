/* Shared by C and Python: the header every ring-buffer event starts with.
 * Python builds its types from these structs' BTF; never keep a hand-written twin. */
#ifndef MEMBRANE_ABI_EVENTS_H
#define MEMBRANE_ABI_EVENTS_H

#define MEMBRANE_EVENT_VERSION 1

/* clang emits BTF only for types reachable from globals, functions and maps. An object
 * that shares a struct with Python names it here, so the struct is in its BTF:
 *   ABI_EXPORT(filter_event);                                            */
#define ABI_EXPORT(tag) struct tag *__abi_##tag __attribute__((used))

struct event_header {
	__u64 ts_ns;     /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u16 version;   /* MEMBRANE_EVENT_VERSION */
	__u16 type;      /* enum in the producing subsystem's abi header */
	__u32 cpu;
};

#endif
