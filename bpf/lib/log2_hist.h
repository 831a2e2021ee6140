/* Power-of-two histograms the way bcc's tools fill them, so they print like bcc's.
 *
 *   hist->slots[log2_slot(value, SLOTS)] += 1;
 *
 * Slot i (i >= 1) holds the values 2^(i-1) .. 2^i - 1; 0 and 1 share slot 1 and slot 0 is
 * never used (bcc's bpf_log2l() + 1). Values beyond the last slot land in the last slot.
 */
#ifndef MEMBRANE_LIB_LOG2_HIST_H
#define MEMBRANE_LIB_LOG2_HIST_H

static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 r, shift;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline __u32 log2_slot(__u64 v, __u32 slots)
{
	__u32 hi = v >> 32;
	__u32 slot = hi ? log2_u32(hi) + 33 : log2_u32(v) + 1;

	return slot < slots ? slot : slots - 1;
}

#endif
