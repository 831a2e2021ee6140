/* Includes for tracing programs: kernel types from the generated vmlinux.h (CO-RE). */
#ifndef MEMBRANE_TRACE_H
#define MEMBRANE_TRACE_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#endif
