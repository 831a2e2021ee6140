/* Shared by C and Python: the header every ring-buffer event starts with.
 * Python builds its types from these structs' BTF; never keep a hand-written twin. */
#ifndef MEMBRANE_ABI_EVENTS_H
#define MEMBRANE_ABI_EVENTS_H

#include "abi/export.h"

enum event_abi {
	MEMBRANE_EVENT_VERSION = 1, /* event_header.version of this layout */
};
ABI_EXPORT_ENUM(event_abi);

struct event_header {
	__u64 ts_ns;     /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u16 version;   /* MEMBRANE_EVENT_VERSION */
	__u16 type;      /* enum in the producing subsystem's abi header */
	__u32 cpu;
};

#endif
