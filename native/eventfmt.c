// SPDX-License-Identifier: Apache-2.0
/* User-space helper of the trace tools: turns a batch of ring-buffer records into text
 * without a Python call per event (src/membrane/native/eventfmt.py is its binding).
 *
 *   mb_ring_scan    where the committed records are, between two ring positions
 *   mb_gather       the fixed-size head of every record, side by side (numpy decodes it)
 *   mb_format_rows  table rows or JSON lines from columns, one pass, into one buffer
 *
 * Python prepares the columns with numpy (values, and strings for distinct values); this
 * file only lays them out. Output is identical to what json.dumps(..., ensure_ascii=True)
 * would write for the same values.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HEADER 8

/* Committed, non-discarded records from `cons` on, stopping at the first one still being
 * written (BUSY), at `prod`, or after `max_records`. offsets[] are relative to `cons` and
 * point past the 8-byte ring header, lengths[] are the records' own sizes. Returns the
 * position after the last record walked (discarded ones included): the new consumer
 * position once the caller copied [cons, end). */
uint64_t mb_ring_scan(const uint8_t *data, uint64_t mask, uint64_t cons, uint64_t prod,
		      uint32_t *offsets, uint32_t *lengths, uint64_t max_records, uint64_t *count)
{
	uint64_t pos = cons, n = 0;

	while (pos < prod && n < max_records) {
		uint32_t len = __atomic_load_n((const uint32_t *)(data + (pos & mask)),
					       __ATOMIC_ACQUIRE);
		uint32_t size = len & ~(RB_BUSY | RB_DISCARD);

		if (len & RB_BUSY)
			break;
		if (!(len & RB_DISCARD)) {
			offsets[n] = (uint32_t)(pos - cons + RB_HEADER);
			lengths[n] = size;
			n++;
		}
		pos += ((uint64_t)size + RB_HEADER + 7) & ~7ull;
	}
	*count = n;
	return pos;
}

/* The first `size` bytes of each record into out[i * size]; a shorter record is padded
 * with zeros. Returns how many were shorter. */
uint64_t mb_gather(const uint8_t *block, const uint32_t *offsets, const uint32_t *lengths,
		   uint64_t n, uint32_t size, uint8_t *out)
{
	uint64_t shorter = 0;

	for (uint64_t i = 0; i < n; i++, out += size) {
		uint32_t len = lengths[i] < size ? lengths[i] : size;

		memcpy(out, block + offsets[i], len);
		if (len < size) {
			memset(out + len, 0, size - len);
			shorter++;
		}
	}
	return shorter;
}

enum column_kind {
	COL_INT = 0,  /* ints[i], decimal */
	COL_TEXT = 1, /* bytes: a JSON string (escaped), table text (control bytes escaped) */
	COL_RAW = 2,  /* bytes written as they are in both forms (true, null, a JSON array) */
	COL_TIME = 3, /* ints[i] = unix ns: 2026-12-06T18:12:04.123456+00:00 */
	COL_FIXED = 4, /* ints[i] / 10^decimals: JSON as Python prints round(x, decimals),
			* a table with table_decimals */
	COL_LIST = 5,  /* bytes: strings each ended by a NUL (a last one may lack it), as
			* exec's argv: a JSON array of strings, table text joined by spaces */
};

enum column_flags {
	COL_RIGHT = 1, /* table: right-aligned */
	COL_CSTR = 2,  /* text ends at its first NUL (within its length) */
	COL_JOIN = 4,  /* COL_LIST: one string, the items joined by spaces, in JSON too */
};

struct mb_column {
	int32_t kind;
	int32_t flags;
	int32_t width;	     /* table: at least this wide (0: no padding) */
	int32_t key_len;
	const char *key;     /* JSON: the key with its quotes and ": " */
	const int64_t *ints; /* COL_INT, COL_TIME */
	const uint8_t *nulls;	 /* optional: nonzero = no value ("-" / null) */
	const uint8_t *blob;	 /* COL_TEXT, COL_RAW */
	const int64_t *offsets;	 /* row i's bytes at blob + offsets[i] (NULL: i * stride) */
	const int32_t *lengths;	 /* row i's length (NULL: max_len for every row) */
	int64_t stride;
	int32_t max_len;
	int32_t decimals;
	int32_t table_decimals;
	int32_t pad;
	const uint8_t *more;	 /* COL_LIST with COL_JOIN, optional: nonzero = " ..." after
				  * the items (some were cut or left out) */
};

static const char hex_digits[] = "0123456789abcdef";

static const char two_digits[] =
	"0001020304050607080910111213141516171819202122232425262728293031323334353637383940414243444546474849"
	"5051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";

static char *put_int(char *p, int64_t v)
{
	char tmp[24];
	int n = 24;
	uint64_t u = v < 0 ? -(uint64_t)v : (uint64_t)v;

	while (u >= 10) {  /* two digits per division */
		unsigned d = (unsigned)(u % 100) * 2;

		u /= 100;
		tmp[--n] = two_digits[d + 1];
		tmp[--n] = two_digits[d];
	}
	if (u || n == 24)  /* a last single digit, or the value 0 */
		tmp[--n] = (char)('0' + u);
	if (v < 0)
		tmp[--n] = '-';
	memcpy(p, tmp + n, (size_t)(24 - n));
	return p + (24 - n);
}

static char *put_u4(char *p, unsigned cp)
{
	*p++ = '\\';
	*p++ = 'u';
	*p++ = hex_digits[(cp >> 12) & 15];
	*p++ = hex_digits[(cp >> 8) & 15];
	*p++ = hex_digits[(cp >> 4) & 15];
	*p++ = hex_digits[cp & 15];
	return p;
}

/* One UTF-8 sequence at s (n bytes left): its code point and length, or -1 and the length
 * of the maximal invalid subpart (what Python's errors="replace" turns into one U+FFFD). */
static int utf8_next(const uint8_t *s, int64_t n, unsigned *cp)
{
	uint8_t c = s[0];
	int need, i;
	uint8_t lo = 0x80, hi = 0xbf;

	if (c >= 0xc2 && c <= 0xdf) {
		need = 1;
		*cp = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		need = 2;
		*cp = c & 0x0f;
		if (c == 0xe0)
			lo = 0xa0;
		else if (c == 0xed)
			hi = 0x9f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		need = 3;
		*cp = c & 0x07;
		if (c == 0xf0)
			lo = 0x90;
		else if (c == 0xf4)
			hi = 0x8f;
	} else {
		return -1;
	}
	for (i = 1; i <= need; i++) {
		if (i >= n || s[i] < lo || s[i] > hi)
			return -i;
		*cp = (*cp << 6) | (s[i] & 0x3f);
		lo = 0x80;
		hi = 0xbf;
	}
	return need + 1;
}

/* Scanning text 8 bytes at a time for the bytes that need escaping (most text has none):
 * classic SWAR tests, exact about whether a word holds such a byte. */
#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull

static inline uint64_t has_less(uint64_t w, uint8_t b) /* a byte < b (b <= 128) */
{
	return (w - ONES * b) & ~w & HIGHS;
}

static inline uint64_t has_byte(uint64_t w, uint8_t b)
{
	return has_less(w ^ (ONES * b), 1);
}

static inline uint64_t load8(const uint8_t *s)
{
	uint64_t w;

	memcpy(&w, s, 8);
	return w;
}

/* A JSON string as json.dumps(ensure_ascii=True) writes it; invalid UTF-8 becomes U+FFFD
 * as bytes.decode(errors="replace") would make it. At most 6 bytes out per byte in + 2. */
static inline int json_plain(uint8_t c)
{
	return c >= 0x20 && c < 0x7f && c != '"' && c != '\\';
}

static char *put_json_body(char *p, const uint8_t *s, int64_t n)
{
	for (int64_t i = 0; i < n;) {
		uint8_t c = s[i];
		unsigned cp;
		int64_t run;
		int len;

		/* Paths are mostly plain ASCII: copy a run of it at once. */
		for (run = i; run + 8 <= n; run += 8) {
			uint64_t w = load8(s + run);

			if ((w & HIGHS) | has_less(w, 0x20) | has_byte(w, 0x7f) | has_byte(w, '"') |
			    has_byte(w, '\\'))
				break;
		}
		for (; run < n && json_plain(s[run]); run++)
			;
		if (run > i) {
			memcpy(p, s + i, (size_t)(run - i));
			p += run - i;
			i = run;
			continue;
		}
		if (c == '"' || c == '\\') {
			*p++ = '\\';
			*p++ = (char)c;
			i++;
			continue;
		}
		if (c < 0x80) {
			*p++ = '\\';
			switch (c) {
			case '\n': *p++ = 'n'; break;
			case '\r': *p++ = 'r'; break;
			case '\t': *p++ = 't'; break;
			case '\b': *p++ = 'b'; break;
			case '\f': *p++ = 'f'; break;
			default: p = put_u4(p - 1, c);
			}
			i++;
			continue;
		}
		len = utf8_next(s + i, n - i, &cp);
		if (len < 0) {
			p = put_u4(p, 0xfffd);
			i += -len;
		} else if (cp >= 0x10000) {
			cp -= 0x10000;
			p = put_u4(p, 0xd800 | (cp >> 10));
			p = put_u4(p, 0xdc00 | (cp & 0x3ff));
			i += len;
		} else {
			p = put_u4(p, cp);
			i += len;
		}
	}
	return p;
}

static char *put_json_string(char *p, const uint8_t *s, int64_t n)
{
	*p++ = '"';
	p = put_json_body(p, s, n);
	*p++ = '"';
	return p;
}

/* Table text: bytes as they are, except control bytes (\xNN) and the backslash (\\), so
 * that one event stays one line and the text can be read back. At most 4 out per 1 in. */
static char *put_table_text(char *p, const uint8_t *s, int64_t n)
{
	for (int64_t i = 0; i < n; i++) {
		uint8_t c = s[i];
		int64_t run;

		for (run = i; run + 8 <= n; run += 8) {
			uint64_t w = load8(s + run);

			if (has_less(w, 0x20) | has_byte(w, 0x7f) | has_byte(w, '\\'))
				break;
		}
		for (; run < n && s[run] >= 0x20 && s[run] != 0x7f && s[run] != '\\'; run++)
			;
		if (run > i) {  /* the common case: a run of printable bytes at once */
			memcpy(p, s + i, (size_t)(run - i));
			p += run - i;
			i = run - 1;
			continue;
		}

		if (c < 0x20 || c == 0x7f) {
			*p++ = '\\';
			*p++ = 'x';
			*p++ = hex_digits[c >> 4];
			*p++ = hex_digits[c & 15];
		} else {
			if (c == '\\')
				*p++ = '\\';
			*p++ = (char)c;
		}
	}
	return p;
}

/* A COL_LIST cell: items ended by NULs. JSON: ["a", "b"] as json.dumps writes a list, or
 * with COL_JOIN "a b" (" ..." added where `more`); a table: a b (...). */
static char *put_list(char *p, const uint8_t *s, int64_t n, int json, int join, int more)
{
	int64_t i = 0, k = 0;

	if (json)
		*p++ = join ? '"' : '[';
	while (i < n) {
		const uint8_t *end = memchr(s + i, 0, (size_t)(n - i));
		int64_t len = end ? end - (s + i) : n - i;

		if (k++) {
			if (json && !join) {
				*p++ = ',';
				*p++ = ' ';
			} else {
				*p++ = ' ';
			}
		}
		if (!json)
			p = put_table_text(p, s + i, len);
		else if (join)
			p = put_json_body(p, s + i, len);
		else
			p = put_json_string(p, s + i, len);
		i += len + 1;
	}
	if (join && more) {
		memcpy(p, " ...", 4);
		p += 4;
	}
	if (json)
		*p++ = join ? '"' : ']';
	return p;
}

static const int64_t pow10[] = { 1, 10, 100, 1000, 10000, 100000, 1000000, 10000000,
				   100000000, 1000000000 };

/* v / 10^decimals with `digits` decimals (rounded half away from zero); with trim, trailing
 * zeros go but one digit stays (12.5, 3.0: Python's float repr of a rounded value). */
static char *put_fixed(char *p, int64_t v, int decimals, int digits, int trim)
{
	int64_t scale, whole, frac;
	char tmp[12];

	if (digits < decimals) {
		int64_t div = pow10[decimals - digits];

		v = v >= 0 ? (v + div / 2) / div : -((-v + div / 2) / div);
	}
	scale = pow10[digits];
	if (v < 0) {
		*p++ = '-';
		v = -v;
	}
	whole = v / scale;
	frac = v % scale;
	p = put_int(p, whole);
	if (!digits)
		return p;
	*p++ = '.';
	for (int d = digits - 1; d >= 0; d--) {
		tmp[d] = (char)('0' + frac % 10);
		frac /= 10;
	}
	if (trim)
		while (digits > 1 && tmp[digits - 1] == '0')
			digits--;
	memcpy(p, tmp, (size_t)digits);
	return p + digits;
}

struct time_cache {
	int64_t second;
	char text[20]; /* YYYY-MM-DDTHH:MM:SS */
};

static char *put_time(char *p, int64_t ns, struct time_cache *tc)
{
	int64_t sec = ns >= 0 ? ns / 1000000000 : (ns - 999999999) / 1000000000;
	int64_t us = (ns - sec * 1000000000) / 1000;

	if (sec != tc->second) {
		time_t t = (time_t)sec;
		struct tm tm;

		gmtime_r(&t, &tm);
		strftime(tc->text, sizeof(tc->text), "%Y-%m-%dT%H:%M:%S", &tm);
		tc->second = sec;
	}
	memcpy(p, tc->text, 19);
	p += 19;
	*p++ = '.';
	for (int d = 100000; d; d /= 10)
		*p++ = (char)('0' + (us / d) % 10);
	memcpy(p, "+00:00", 6);
	return p + 6;
}

static void cell_bytes(const struct mb_column *c, int64_t i, const uint8_t **s, int64_t *n)
{
	*s = c->blob + (c->offsets ? c->offsets[i] : i * c->stride);
	*n = c->lengths ? c->lengths[i] : c->max_len;
	if (c->flags & COL_CSTR) {
		const uint8_t *end = memchr(*s, 0, (size_t)*n);

		if (end)
			*n = end - *s;
	}
}

static int64_t cell_bound(const struct mb_column *c, int64_t i)
{
	int64_t n = 0;

	if (c->kind == COL_TEXT || c->kind == COL_RAW)
		n = (c->lengths ? c->lengths[i] : c->max_len) * 6 + 2;
	else if (c->kind == COL_LIST)  /* per byte: 6 escaped, or a NUL: ", " and quotes */
		n = (c->lengths ? c->lengths[i] : c->max_len) * 6 + 8;
	else
		n = 40;
	return n + c->width + c->key_len + 4;
}

/* Rows from `first` on, as long as they fit in `cap` bytes: table rows (cells separated
 * by one space, padded to their widths, trailing spaces cut) or JSON objects, one per
 * line. Returns the bytes written; *rows_done says how many rows they hold. */
int64_t mb_format_rows(const struct mb_column *cols, int32_t ncols, int64_t first,
		       int64_t nrows, int32_t json, char *out, int64_t cap, int64_t *rows_done)
{
	struct time_cache tc = { .second = INT64_MIN };
	char *p = out;
	int64_t i;

	for (i = first; i < nrows; i++) {
		int64_t bound = 4;
		char *row = p;

		for (int32_t k = 0; k < ncols; k++)
			bound += cell_bound(&cols[k], i);
		if ((p - out) + bound > cap)
			break;
		if (json)
			*p++ = '{';
		for (int32_t k = 0; k < ncols; k++) {
			const struct mb_column *c = &cols[k];
			char *cell;

			if (json) {
				if (k) {
					*p++ = ',';
					*p++ = ' ';
				}
				memcpy(p, c->key, (size_t)c->key_len);
				p += c->key_len;
			} else if (k) {
				*p++ = ' ';
			}
			cell = p;
			if (c->nulls && c->nulls[i]) {
				if (json) {
					memcpy(p, "null", 4);
					p += 4;
				} else {
					*p++ = '-';
				}
			} else if (c->kind == COL_INT) {
				p = put_int(p, c->ints[i]);
			} else if (c->kind == COL_FIXED) {
				p = put_fixed(p, c->ints[i], c->decimals,
					      json ? c->decimals : c->table_decimals, json);
			} else if (c->kind == COL_TIME) {
				if (json)
					*p++ = '"';
				p = put_time(p, c->ints[i], &tc);
				if (json)
					*p++ = '"';
			} else {
				const uint8_t *s;
				int64_t n;

				cell_bytes(c, i, &s, &n);
				if (c->kind == COL_LIST) {
					p = put_list(p, s, n, json, c->flags & COL_JOIN,
						     c->more && c->more[i]);
				} else if (c->kind == COL_RAW) {
					memcpy(p, s, (size_t)n);
					p += n;
				} else if (json) {
					p = put_json_string(p, s, n);
				} else {
					p = put_table_text(p, s, n);
				}
			}
			if (!json && p - cell < c->width) {
				int64_t used = p - cell, fill = c->width - used;

				if (c->flags & COL_RIGHT) {
					memmove(cell + fill, cell, (size_t)used);
					memset(cell, ' ', (size_t)fill);
				} else {
					memset(p, ' ', (size_t)fill);
				}
				p += fill;
			}
		}
		if (json) {
			*p++ = '}';
		} else {
			while (p > row && p[-1] == ' ')
				p--;
		}
		*p++ = '\n';
	}
	*rows_done = i - first;
	return p - out;
}
