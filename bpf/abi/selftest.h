/* Shared by C and Python: structs of selftest.bpf.o, the loader's own test object. */
#ifndef MEMBRANE_ABI_SELFTEST_H
#define MEMBRANE_ABI_SELFTEST_H

#include "abi/events.h"

struct selftest_key {
	__u32 a;
	__u16 b;
	/* 2 bytes of compiler padding here: the BTF-built type must reproduce it */
	__u64 c;
};

struct selftest_event {
	struct event_header hdr;
	__u64 seq;
	__u32 magic;
	char tag[12];
};

#endif
