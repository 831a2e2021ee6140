// SPDX-License-Identifier: Apache-2.0
/* `membrane-cni`: the CNI plugin executable (CNI spec 1.0.0), a thin client of the agent.
 *
 * The runtime runs it twice per container (ADD, DEL), so it is a small static executable
 * that starts in well under a millisecond (the Python script it replaces took ~10 ms).
 * It interprets nothing: the network configuration (stdin) goes to the agent as the body
 * of `POST /v1/cni/<command>?container_id=..&netns=..&ifname=..&args=..` on the unix socket
 * named by the configuration's top-level "apiSocket" (else $MEMBRANE_API_SOCKET, else the
 * agent's default), and it prints the agent's answer, which is already the spec's result
 * (HTTP 200) or error (HTTP 400) JSON. VERSION is answered here.
 *
 * Without an agent: ADD and CHECK fail with code 11 (try again later) naming the socket;
 * DEL succeeds, as the spec asks of a cleanup whose resources may be gone: the veth goes
 * with the runtime's namespace, and the agent forgets the container when it starts again
 * and finds the namespace gone. A configuration it cannot read is refused with code 6.
 *
 * Buffers grow as needed up to MAX_MESSAGE; every read and write is retried on EINTR and
 * continued after a short count; SIGPIPE is ignored (a closed peer is an error, not death).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define CNI_VERSION "1.0.0"
#define DEFAULT_SOCKET "/run/membrane/membrane.sock" /* membrane.api.client's default */
#define SOCKET_ENV "MEMBRANE_API_SOCKET"
#define TIMEOUT_S 300			   /* per connect, send and receive */
#define MAX_MESSAGE (64u << 20)		   /* stdin, and the agent's answer */
#define REFUSED_TEXT_MAX 300		   /* of an unexpected answer, in the error */

enum {
	ERR_INVALID_ENVIRONMENT = 4,
	ERR_DECODING_FAILURE = 6,
	ERR_TRY_AGAIN_LATER = 11,
	ERR_REFUSED = 100,
};

struct buf {
	char *data;
	size_t len, cap;
};

static void out_of_memory(void)
{
	static const char line[] = "{\"cniVersion\": \"" CNI_VERSION "\", \"code\": 11, "
				   "\"msg\": \"membrane-cni: out of memory\"}\n";
	ssize_t done = write(STDOUT_FILENO, line, sizeof(line) - 1);

	(void)done;
	exit(1);
}

/* Room for `extra` more bytes and a NUL after them; false when the buffer would pass
 * MAX_MESSAGE. */
static int buf_reserve(struct buf *b, size_t extra)
{
	size_t cap = b->cap ? b->cap : 4096;
	char *data;

	if (extra >= MAX_MESSAGE || b->len >= MAX_MESSAGE - extra)
		return 0;
	if (b->len + extra < b->cap)
		return 1;
	while (cap <= b->len + extra)
		cap *= 2;
	data = realloc(b->data, cap);
	if (!data)
		out_of_memory();
	b->data = data;
	b->cap = cap;
	return 1;
}

/* The bytes appended, the buffer kept NUL-terminated (a C string where its text is). */
static void buf_add(struct buf *b, const void *data, size_t n)
{
	if (!buf_reserve(b, n))
		out_of_memory(); /* our texts, each no longer than the configuration read */
	memcpy(b->data + b->len, data, n);
	b->len += n;
	b->data[b->len] = '\0';
}

static void buf_str(struct buf *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

static void buf_printf(struct buf *b, const char *fmt, ...)
{
	char small[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(small, sizeof(small), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n < sizeof(small)) {
		buf_add(b, small, (size_t)n);
		return;
	}
	if (!buf_reserve(b, (size_t)n + 1))
		out_of_memory();
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap); /* its NUL included */
	va_end(ap);
	b->len += (size_t)n;
}

/* Everything `fd` gives until EOF, NUL-terminated; 0, or an errno (EFBIG past
 * MAX_MESSAGE). */
static int read_all(int fd, struct buf *b)
{
	for (;;) {
		ssize_t got;

		if (b->cap - b->len < 1024 && !buf_reserve(b, 16384))
			return EFBIG;
		got = read(fd, b->data + b->len, b->cap - b->len - 1);
		if (got > 0) {
			b->len += (size_t)got;
		} else if (got == 0) {
			b->data[b->len] = '\0';
			return 0;
		} else if (errno != EINTR) {
			return errno;
		}
	}
}

static int write_all(int fd, const char *data, size_t n)
{
	while (n) {
		ssize_t done = write(fd, data, n);

		if (done > 0) {
			data += done;
			n -= (size_t)done;
		} else if (done < 0 && errno != EINTR) {
			return errno;
		}
	}
	return 0;
}

/* The length of the valid UTF-8 sequence at p (no overlongs, surrogates or code points
 * past U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *p, size_t n)
{
	size_t len, i;
	uint32_t cp;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		len = 2, cp = p[0] & 0x1f;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		len = 3, cp = p[0] & 0x0f;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		len = 4, cp = p[0] & 0x07;
	else
		return 0;
	if (n < len)
		return 0;
	for (i = 1; i < len; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (p[i] & 0x3f);
	}
	if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return len;
}

/* A JSON string of the bytes: what json.dumps(ensure_ascii=False) writes for their text,
 * an invalid UTF-8 byte replaced by U+FFFD (as bytes.decode(errors="replace")). */
static void json_string(struct buf *b, const char *text, size_t n)
{
	const unsigned char *p = (const unsigned char *)text;
	size_t i = 0;

	buf_add(b, "\"", 1);
	while (i < n) {
		size_t len = utf8_len(p + i, n - i);

		if (!len) {
			buf_add(b, "\xef\xbf\xbd", 3);
			i++;
		} else if (p[i] == '"' || p[i] == '\\') {
			buf_add(b, "\\", 1);
			buf_add(b, p + i++, 1);
		} else if (p[i] < 0x20) {
			buf_printf(b, "\\u%04x", p[i++]);
		} else {
			buf_add(b, p + i, len);
			i += len;
		}
	}
	buf_add(b, "\"", 1);
}

/* Python's repr() of the text (a str from the environment: an undecodable byte is the
 * surrogate os.environ makes of it) or, with `as_bytes`, of the bytes. */
static void py_repr(struct buf *b, const char *text, size_t n, int as_bytes)
{
	const unsigned char *p = (const unsigned char *)text;
	char quote = memchr(text, '\'', n) && !memchr(text, '"', n) ? '"' : '\'';
	size_t i = 0;

	if (as_bytes)
		buf_add(b, "b", 1);
	buf_add(b, &quote, 1);
	while (i < n) {
		size_t len = as_bytes ? (p[i] < 0x80) : utf8_len(p + i, n - i);

		if (p[i] == '\\' || p[i] == (unsigned char)quote) {
			buf_add(b, "\\", 1);
			buf_add(b, p + i++, 1);
		} else if (p[i] == '\t' || p[i] == '\n' || p[i] == '\r') {
			buf_str(b, p[i] == '\t' ? "\\t" : p[i] == '\n' ? "\\n" : "\\r");
			i++;
		} else if (!len) {
			buf_printf(b, as_bytes ? "\\x%02x" : "\\udc%02x", p[i++]);
		} else if (p[i] < 0x20 || p[i] == 0x7f) {
			buf_printf(b, "\\x%02x", p[i++]);
		} else if (len == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0) {
			buf_printf(b, "\\x%02x", p[i + 1]); /* C1 controls */
			i += 2;
		} else {
			buf_add(b, p + i, len);
			i += len;
		}
	}
	buf_add(b, &quote, 1);
}

static void print_error(int code, const char *msg, const char *details, size_t details_len)
{
	struct buf out = { 0 };

	buf_printf(&out, "{\"cniVersion\": \"" CNI_VERSION "\", \"code\": %d, \"msg\": ", code);
	json_string(&out, msg, strlen(msg));
	if (details_len) {
		buf_str(&out, ", \"details\": ");
		json_string(&out, details, details_len);
	}
	buf_str(&out, "}\n");
	write_all(STDOUT_FILENO, out.data, out.len);
	free(out.data);
}

/* The configuration's top-level "apiSocket", read with a JSON scanner that decodes the
 * top-level keys and that string and skips every other value (checking its strings and
 * brackets, not its numbers and literals: the agent parses the whole). */
struct scanner {
	const unsigned char *p, *end, *start;
	const char *problem;
};

static void skip_ws(struct scanner *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

static int fail(struct scanner *s, const char *problem)
{
	s->problem = problem;
	return -1;
}

static int hex_digit(unsigned char c)
{
	return isdigit(c) ? c - '0' : isxdigit(c) ? (c | 0x20) - 'a' + 10 : -1;
}

static int hex4(const unsigned char *p, uint32_t *value)
{
	int i;

	*value = 0;
	for (i = 0; i < 4; i++) {
		if (hex_digit(p[i]) < 0)
			return -1;
		*value = *value << 4 | (uint32_t)hex_digit(p[i]);
	}
	return 0;
}

static void put_utf8(struct buf *b, uint32_t cp)
{
	static const unsigned char lead[] = { 0, 0, 0xc0, 0xe0, 0xf0 };
	size_t n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4, i;
	unsigned char u[4];

	for (i = n - 1; i > 0; i--, cp >>= 6)
		u[i] = (unsigned char)(0x80 | (cp & 0x3f));
	u[0] = (unsigned char)(lead[n] | cp);
	buf_add(b, u, n);
}

/* A UTF-16 surrogate encoded as UTF-8 (ED A0..BF 80..BF): no UTF-8, but json.loads takes it. */
static int is_utf8_surrogate(const unsigned char *p, size_t n)
{
	return n >= 3 && p[0] == 0xed && (p[1] & 0xe0) == 0xa0 && (p[2] & 0xc0) == 0x80;
}

/* The string at s->p (its opening quote), decoded into `out` when given. Surrogates (a
 * lone \uD800, or one encoded as UTF-8), which json.loads takes, are refused only where
 * `strict` (a path cannot hold them). */
static int scan_string(struct scanner *s, struct buf *out, int strict)
{
	s->p++;
	while (s->p < s->end) {
		unsigned char c = *s->p;
		uint32_t cp, low;

		if (c == '"') {
			s->p++;
			return 0;
		}
		if (c < 0x20)
			return fail(s, "a control character inside a string");
		if (c != '\\') {
			size_t len = utf8_len(s->p, (size_t)(s->end - s->p));

			if (!len && !strict && is_utf8_surrogate(s->p, (size_t)(s->end - s->p)))
				len = 3; /* json.loads decodes with "surrogatepass" */
			if (!len)
				return fail(s, strict ? "apiSocket is not UTF-8"
						      : "a string is not UTF-8");
			if (out)
				buf_add(out, s->p, len);
			s->p += len;
			continue;
		}
		if (s->end - s->p < 2)
			break;
		c = s->p[1];
		s->p += 2;
		if (c != 'u') {
			const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
			const char *at = c ? strchr(from, c) : NULL;

			if (!at)
				return fail(s, "an invalid escape in a string");
			if (out)
				buf_add(out, to + (at - from), 1);
			continue;
		}
		if (s->end - s->p < 4 || hex4(s->p, &cp))
			return fail(s, "an invalid \\u escape in a string");
		s->p += 4;
		if (cp >= 0xd800 && cp <= 0xdbff && s->end - s->p >= 6 && s->p[0] == '\\' &&
		    s->p[1] == 'u' && !hex4(s->p + 2, &low) && low >= 0xdc00 && low <= 0xdfff) {
			cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
			s->p += 6;
		} else if (cp >= 0xd800 && cp <= 0xdfff && strict) {
			return fail(s, "apiSocket holds a lone UTF-16 surrogate");
		}
		if (out)
			put_utf8(out, cp);
	}
	return fail(s, "an unterminated string");
}

/* Any value: a string, an object or array (its brackets matched on a stack of the open
 * ones, strings inside skipped whole; no recursion), or a number or literal. */
static int skip_value(struct scanner *s)
{
	const unsigned char *from = s->p;
	struct buf open = { 0 };
	int rc = -1;

	if (s->p >= s->end)
		return fail(s, "a value is missing");
	if (*s->p == '"')
		return scan_string(s, NULL, 0);
	if (*s->p != '{' && *s->p != '[') {
		while (s->p < s->end && (isalnum(*s->p) || (*s->p && strchr("+-.", *s->p))))
			s->p++;
		return s->p > from ? 0 : fail(s, "a value is missing");
	}
	while (s->p < s->end) {
		unsigned char c = *s->p;

		if (c == '"') {
			if (scan_string(s, NULL, 0))
				goto out;
			continue;
		}
		if (c == '{' || c == '[') {
			/* never deeper than the text is long: within MAX_MESSAGE */
			buf_add(&open, c == '{' ? "}" : "]", 1);
		} else if (c == '}' || c == ']') {
			if (open.data[--open.len] != (char)c) {
				fail(s, "a ']' or '}' out of place");
				goto out;
			}
			if (!open.len) {
				s->p++;
				rc = 0;
				goto out;
			}
		}
		s->p++;
	}
	fail(s, "an unterminated object or array");
out:
	free(open.data);
	return rc;
}

/* 1 and the decoded path in `path` when the top-level object has "apiSocket" (the last
 * one, as json.loads keeps it), 0 when it has none, -1 (s->problem) when unreadable. */
static int find_api_socket(struct scanner *s, struct buf *path)
{
	struct buf key = { 0 };
	int found = 0, rc = -1;

	if (s->end - s->p >= 3 && !memcmp(s->p, "\xef\xbb\xbf", 3))
		s->p += 3; /* a UTF-8 byte order mark, which json.loads accepts */
	skip_ws(s);
	if (s->p >= s->end || *s->p != '{') {
		fail(s, "the network configuration is no JSON object");
		goto out;
	}
	s->p++;
	skip_ws(s);
	if (s->p < s->end && *s->p == '}') {
		s->p++;
	} else {
		for (;;) {
			if (s->p >= s->end || *s->p != '"') {
				fail(s, "a key is missing");
				goto out;
			}
			key.len = 0;
			if (scan_string(s, &key, 0))
				goto out;
			skip_ws(s);
			if (s->p >= s->end || *s->p != ':') {
				fail(s, "a ':' is missing");
				goto out;
			}
			s->p++;
			skip_ws(s);
			if (key.len == 9 && !memcmp(key.data, "apiSocket", 9)) {
				if (s->p >= s->end || *s->p != '"') {
					fail(s, "apiSocket is not a string");
					goto out;
				}
				path->len = 0;
				if (scan_string(s, path, 1))
					goto out;
				found = 1;
			} else if (skip_value(s)) {
				goto out;
			}
			skip_ws(s);
			if (s->p < s->end && *s->p == ',') {
				s->p++;
				skip_ws(s);
				continue;
			}
			if (s->p < s->end && *s->p == '}') {
				s->p++;
				break;
			}
			fail(s, "a ',' or '}' is missing");
			goto out;
		}
	}
	skip_ws(s);
	if (s->p != s->end) {
		fail(s, "more follows the object");
		goto out;
	}
	if (found && (!path->len || memchr(path->data, 0, path->len))) {
		fail(s, path->len ? "apiSocket holds a NUL" : "apiSocket is empty");
		goto out;
	}
	rc = found;
out:
	free(key.data);
	return rc;
}

static void quote_into(struct buf *b, const char *value)
{
	static const char safe[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
				   "0123456789-._~/";

	for (; *value; value++) {
		if (strchr(safe, *value))
			buf_add(b, value, 1);
		else
			buf_printf(b, "%%%02X", (unsigned char)*value);
	}
}

/* Why talking to the agent failed: an errno, or a text of ours. */
struct failure {
	int err;
	struct buf text;
};

static int failed_errno(struct failure *f, int err)
{
	f->err = err;
	return -1;
}

static const char *reason(const struct failure *f)
{
	if (f->text.len)
		return f->text.data;
	return f->err == EAGAIN || f->err == EWOULDBLOCK ? "timed out" : strerror(f->err);
}

/* One HTTP/1.1 request (its head, then the body) on its own connection; the raw answer, up
 * to the peer's EOF. */
static int exchange(const char *socket_path, const struct buf *head, const struct buf *body,
		    struct buf *answer, struct failure *f)
{
	struct timeval timeout = { .tv_sec = TIMEOUT_S };
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	size_t path_len = strlen(socket_path);
	int fd, err = 0;

	if (path_len >= sizeof(addr.sun_path))
		return failed_errno(f, ENAMETOOLONG);
	memcpy(addr.sun_path, socket_path, path_len + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return failed_errno(f, errno);
	if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout)) ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)))
		err = errno;
	while (!err && connect(fd, (struct sockaddr *)&addr, sizeof(addr))) {
		if (errno != EINTR) {
			/* EISCONN: an interrupted connect completed meanwhile */
			err = errno == EISCONN ? 0 : errno;
			break;
		}
	}
	if (!err)
		err = write_all(fd, head->data, head->len);
	if (!err && body->len)
		err = write_all(fd, body->data, body->len);
	if (!err)
		err = read_all(fd, answer);
	close(fd);
	if (err == EFBIG) {
		buf_printf(&f->text, "an answer larger than %u MiB", MAX_MESSAGE >> 20);
		return -1;
	}
	return err ? failed_errno(f, err) : 0;
}

static int bad_answer(struct failure *f, const char *problem)
{
	buf_str(&f->text, problem);
	return -1;
}

/* A chunked body decoded in place (the decoded bytes never pass the encoded ones). */
static int dechunk(char *body, size_t *len, struct failure *f)
{
	size_t in = 0, out = 0;

	for (;;) {
		size_t size = 0;
		char *eol = memmem(body + in, *len - in, "\r\n", 2);
		int digits = 0;

		if (!eol)
			return bad_answer(f, "a chunked answer cut short");
		for (; body + in < eol && hex_digit((unsigned char)body[in]) >= 0; in++) {
			if (size > (SIZE_MAX >> 4))
				return bad_answer(f, "a chunk size out of range");
			size = size << 4 | (size_t)hex_digit((unsigned char)body[in]);
			digits++;
		}
		if (!digits || (body + in < eol && body[in] != ';' && body[in] != ' '))
			return bad_answer(f, "a malformed chunk size");
		in = (size_t)(eol - body) + 2;
		if (!size)
			break; /* trailers, if any, are of no interest */
		if (size > *len - in || *len - in - size < 2 || memcmp(body + in + size, "\r\n", 2))
			return bad_answer(f, "a chunked answer cut short");
		memmove(body + out, body + in, size);
		out += size;
		in += size + 2;
	}
	*len = out;
	return 0;
}

/* The status and the body (moved to the start of `answer`) of an HTTP answer. */
static int parse_answer(struct buf *answer, long *status, struct failure *f)
{
	char *data = answer->data, *head_end, *line, *cursor;
	size_t body_len;
	long content_length = -1;
	int chunked = 0;

	head_end = memmem(data, answer->len, "\r\n\r\n", 4);
	if (head_end) {
		char *status_end = memchr(data, '\r', (size_t)(head_end - data) + 1);
		char *sp = memchr(data, ' ', (size_t)(status_end - data));
		size_t digits = sp ? strspn(sp + 1, "0123456789") : 0; /* stops at the \r */

		if (head_end - data < 5 || memcmp(data, "HTTP/", 5) || !digits || digits > 3 ||
		    (sp[1 + digits] != ' ' && sp[1 + digits] != '\r'))
			head_end = NULL;
		else
			*status = strtol(sp + 1, NULL, 10);
	}
	if (!head_end) {
		buf_str(&f->text, "not an HTTP answer: ");
		py_repr(&f->text, data, answer->len < 80 ? answer->len : 80, 1);
		return -1;
	}
	*head_end = '\0'; /* the headers, one string */
	line = strstr(data, "\r\n");
	while (line) {
		char *next, *value;

		line += 2;
		next = strstr(line, "\r\n");
		if (next)
			*next = '\0';
		value = strchr(line, ':');
		if (value) {
			*value++ = '\0';
			value += strspn(value, " \t");
			if (!strcasecmp(line, "transfer-encoding"))
				chunked = strcasestr(value, "chunked") != NULL;
			else if (!strcasecmp(line, "content-length")) {
				content_length = strtol(value, &cursor, 10);
				if (cursor == value || content_length < 0)
					return bad_answer(f, "a malformed Content-Length");
			}
		}
		line = next;
	}
	body_len = answer->len - (size_t)(head_end + 4 - data);
	memmove(data, head_end + 4, body_len);
	if (chunked) {
		if (dechunk(data, &body_len, f))
			return -1;
	} else if (content_length >= 0) {
		if ((size_t)content_length > body_len)
			return bad_answer(f, "an answer shorter than its Content-Length");
		body_len = (size_t)content_length;
	}
	answer->len = body_len;
	return 0;
}

/* One call's memory, freed on every way out (so sanitizers and valgrind see no leak). */
struct call {
	const char *command, *lower, *socket_path;
	struct buf config, path, request, answer, message;
	struct failure failure;
	long status;
};

/* The socket to call: the configuration's, else $MEMBRANE_API_SOCKET, else the default;
 * false (and the spec's error printed) when the configuration cannot be read. */
static int choose_socket(struct call *c)
{
	struct scanner scan = { .p = (const unsigned char *)c->config.data,
				.start = (const unsigned char *)c->config.data,
				.end = (const unsigned char *)c->config.data + c->config.len };
	int found = c->config.len ? find_api_socket(&scan, &c->path) : fail(&scan, "it is empty");

	if (found == 1) {
		c->socket_path = c->path.data;
	} else if (found == 0) {
		c->socket_path = getenv(SOCKET_ENV);
		if (!c->socket_path || !*c->socket_path)
			c->socket_path = DEFAULT_SOCKET;
	} else {
		buf_printf(&c->message, "%s (at byte %zu)", scan.problem,
			   (size_t)(scan.p - scan.start));
		print_error(ERR_DECODING_FAILURE, "cannot decode the network configuration",
			    c->message.data, c->message.len);
		return 0;
	}
	return 1;
}

/* The request's head; the configuration is its body. */
static void build_request(struct call *c)
{
	static const char *const query[][2] = { { "container_id", "CNI_CONTAINERID" },
						{ "netns", "CNI_NETNS" },
						{ "ifname", "CNI_IFNAME" },
						{ "args", "CNI_ARGS" } };
	size_t i;

	buf_printf(&c->request, "POST /v1/cni/%s?", c->lower);
	for (i = 0; i < sizeof(query) / sizeof(query[0]); i++) {
		const char *value = getenv(query[i][1]);

		buf_printf(&c->request, "%s%s=", i ? "&" : "", query[i][0]);
		quote_into(&c->request, value ? value : "");
	}
	buf_printf(&c->request,
		   " HTTP/1.1\r\nHost: membrane\r\nConnection: close\r\n"
		   "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
		   c->config.len);
}

/* The agent's answer as the exit code and output: a result or error of the spec's as it
 * is, anything else an error of ours with its first bytes. */
static int relay_answer(struct call *c)
{
	const char *text = c->answer.data;
	size_t len = c->answer.len;

	while (len && isspace((unsigned char)*text))
		text++, len--;
	if ((c->status != 200 && c->status != 400) || len < 13 ||
	    memcmp(text, "{\"cniVersion\"", 13)) {
		buf_printf(&c->message, "HTTP %ld: ", c->status);
		buf_add(&c->message, c->answer.data,
			c->answer.len < REFUSED_TEXT_MAX ? c->answer.len : REFUSED_TEXT_MAX);
		print_error(ERR_REFUSED, "the membrane agent refused the call", c->message.data,
			    c->message.len);
		return 1;
	}
	if (c->status == 400 || !strcmp(c->command, "ADD")) {
		while (c->answer.len && isspace((unsigned char)c->answer.data[c->answer.len - 1]))
			c->answer.len--;
		c->answer.data[c->answer.len] = '\n'; /* in the buffer's room for its NUL */
		write_all(STDOUT_FILENO, c->answer.data, c->answer.len + 1);
	}
	return c->status == 200 ? 0 : 1;
}

static int run(struct call *c)
{
	static const char *const commands[][2] = { { "ADD", "add" },
						   { "DEL", "del" },
						   { "CHECK", "check" } };
	size_t i;

	if (read_all(STDIN_FILENO, &c->config) == EFBIG && strcmp(c->command, "VERSION")) {
		buf_printf(&c->message, "larger than %u MiB", MAX_MESSAGE >> 20);
		print_error(ERR_DECODING_FAILURE, "cannot decode the network configuration",
			    c->message.data, c->message.len);
		return 1;
	}
	if (!strcmp(c->command, "VERSION")) {
		static const char line[] = "{\"cniVersion\": \"" CNI_VERSION "\", "
					   "\"supportedVersions\": [\"" CNI_VERSION "\"]}\n";

		write_all(STDOUT_FILENO, line, sizeof(line) - 1);
		return 0;
	}
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(c->command, commands[i][0]))
			c->lower = commands[i][1];
	if (!c->lower) {
		buf_str(&c->message, "CNI_COMMAND ");
		py_repr(&c->message, c->command, strlen(c->command), 0);
		buf_str(&c->message, " is not supported");
		print_error(ERR_INVALID_ENVIRONMENT, c->message.data, NULL, 0);
		return 1;
	}
	if (!choose_socket(c))
		return 1;
	build_request(c);
	if (exchange(c->socket_path, &c->request, &c->config, &c->answer, &c->failure) ||
	    parse_answer(&c->answer, &c->status, &c->failure)) {
		buf_printf(&c->message, "no agent answers at %s (%s)", c->socket_path,
			   reason(&c->failure));
		if (!strcmp(c->command, "DEL")) {
			fprintf(stderr, "membrane-cni: DEL without an agent: %s\n",
				c->message.data);
			return 0;
		}
		print_error(ERR_TRY_AGAIN_LATER, "the membrane agent is not reachable",
			    c->message.data, c->message.len);
		return 1;
	}
	return relay_answer(c);
}

int main(void)
{
	struct call c = { .command = getenv("CNI_COMMAND") };
	int rc;

	signal(SIGPIPE, SIG_IGN);
	if (!c.command)
		c.command = "";
	rc = run(&c);
	free(c.config.data);
	free(c.path.data);
	free(c.request.data);
	free(c.answer.data);
	free(c.message.data);
	free(c.failure.text.data);
	return rc;
}
