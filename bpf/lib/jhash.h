/* Bob Jenkins' lookup3 hash as Linux's jhash2 (include/linux/jhash.h): the LB's 5-tuple
 * hash. membrane.lb.flowhash is its Python twin; tests compare them on random flows.
 *
 *   __u32 h = jhash2_10(words, seed);    ten 32-bit words
 */
#ifndef MEMBRANE_LIB_JHASH_H
#define MEMBRANE_LIB_JHASH_H

#include <linux/types.h>

#define JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 rol32_(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define jhash_mix_(a, b, c)                                  \
	{                                                    \
		a -= c; a ^= rol32_(c, 4);  c += b;          \
		b -= a; b ^= rol32_(a, 6);  a += c;          \
		c -= b; c ^= rol32_(b, 8);  b += a;          \
		a -= c; a ^= rol32_(c, 16); c += b;          \
		b -= a; b ^= rol32_(a, 19); a += c;          \
		c -= b; c ^= rol32_(b, 4);  b += a;          \
	}

#define jhash_final_(a, b, c)                \
	{                                    \
		c ^= b; c -= rol32_(b, 14);  \
		a ^= c; a -= rol32_(c, 11);  \
		b ^= a; b -= rol32_(a, 25);  \
		c ^= b; c -= rol32_(b, 16);  \
		a ^= c; a -= rol32_(c, 4);   \
		b ^= a; b -= rol32_(a, 14);  \
		c ^= b; c -= rol32_(b, 24);  \
	}

static __always_inline __u32 jhash2_10(const __u32 *k, __u32 seed)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (10 << 2) + seed;
	a += k[0]; b += k[1]; c += k[2];
	jhash_mix_(a, b, c);
	a += k[3]; b += k[4]; c += k[5];
	jhash_mix_(a, b, c);
	a += k[6]; b += k[7]; c += k[8];
	jhash_mix_(a, b, c);
	a += k[9];
	jhash_final_(a, b, c);
	return c;
}

#endif
