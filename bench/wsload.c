/*
 * wsload: the C load client of bench/fanout.py (`--client c`).
 *
 * N WebSocket clients in one single-threaded epoll loop (one core), all on the same channels
 * of a fanout edge (one, or K), counting what arrives. C11, libc and Linux epoll only;
 * bench/fanout.py builds it with `cc -O2 -o <cache dir>/wsload bench/wsload.c`.
 *
 *   wsload --port P --channel C --clients N [--channels K] [--host 127.0.0.1] [--path /ws]
 *          [--concurrency 50] [--timeout 30] [--name bench]
 *
 * --channels 1 (the default): every client subscribes to C. --channels K > 1: to C0 ... C{K-1}
 * (C followed by the decimal index), K subscribe requests after `connect`. With --per-client,
 * client i subscribes only to C{i mod K} (one subscriber per channel when K = N: the shape of
 * per-account channels); a pub of another channel is counted as `other_channel`. A message's
 * channel is mapped to its index by the fixed prefix C and the number after it (no table
 * search); every count below is per client and per channel, summed.
 *
 * Each client: a non-blocking TCP connect (at most --concurrency clients between connect
 * and their `subscribed` reply at once), the HTTP/1.1 upgrade offering the `fanout.json`
 * subprotocol (the 101 status, Upgrade, Connection, Sec-WebSocket-Accept and the accepted
 * subprotocol are checked), then, masked as a client must, {"type":"connect","id":1,
 * "name":"bench"} and, on `connected`, {"type":"subscribe","id":2+j,"channel":<channel j>}
 * for every channel j, one at a time (the next on the previous `subscribed`), as
 * docs/protocol.md specifies and bench/fanout.py's Python clients send; a client is
 * subscribed when every channel's `subscribed` reply came.
 *
 * Server frames: unmasked, 7/16/64-bit lengths, split across reads or several per read.
 * Text frames hold one message object or an array of them; every message is scanned as
 * JSON (any key order, any whitespace): its "type", "channel", "offset", "from", "to" and
 * data's top-level "ts". A frame that does not scan is counted as an error (the client
 * stays). Protocol pings get a pong, {"type":"ping"} gets {"type":"pong"}, a close frame's
 * code is recorded (and the close echoed). Per client and channel the `pub` offsets must
 * be contiguous from that `subscribed` reply's offset: skips are gaps, repeats or going back
 * are dups, ranges named by `gap` notices are announced (the Python clients' Totals, same
 * semantics). Latency = CLOCK_REALTIME at the read - data.ts (seconds, the publisher's
 * time.time()) of every pub whose ts is in the window, into a log-linear histogram
 * (128 sub-buckets per power of two of microseconds: < 0.4 % error at the bucket middle).
 *
 * stdin/stdout, one line each way; every command gets exactly one line back:
 *   (at start)          -> `ready <n>` once all N are subscribed to every channel, or
 *                          `error <text>`
 *   window <lo> <hi>    -> `ok`: clear the histogram; measure pubs with lo <= ts < hi
 *                          (seconds since the epoch; `inf`/`-inf` allowed)
 *   until <hi>          -> `ok`: set hi, keep the samples
 *   stats               -> one JSON object (see cmd_stats)
 *   quit                -> `bye`: close every client (1000) and exit
 * End of stdin (the orchestrator died) ends the program too.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* --- small helpers ---------------------------------------------------------------------- */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("wsload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory (%zu bytes)", n);
    return q;
}

static int64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t rng_state;

static uint64_t rng(void) { /* xorshift64*: mask keys and handshake keys need no more */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

/* --- SHA-1 and base64 (for Sec-WebSocket-Accept) -------------------------------------- */

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
        else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
        else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
        else f = b ^ c ^ d, k = 0xCA62C1D6;
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d, d = c, c = rol32(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

static void sha1(const uint8_t *data, size_t n, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t i = 0;
    for (; n - i >= 64; i += 64) sha1_block(h, data + i);
    uint8_t tail[128] = {0};
    size_t rest = n - i;
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    size_t blocks = rest + 9 > 64 ? 2 : 1;
    uint64_t bits = (uint64_t)n * 8;
    for (int j = 0; j < 8; j++) tail[blocks * 64 - 1 - j] = (uint8_t)(bits >> (8 * j));
    for (size_t j = 0; j < blocks; j++) sha1_block(h, tail + 64 * j);
    for (int j = 0; j < 5; j++)
        out[4 * j] = (uint8_t)(h[j] >> 24), out[4 * j + 1] = (uint8_t)(h[j] >> 16),
        out[4 * j + 2] = (uint8_t)(h[j] >> 8), out[4 * j + 3] = (uint8_t)h[j];
}

static void base64(const uint8_t *in, size_t n, char *out) { /* out: 4*ceil(n/3)+1 */
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = abc[v >> 18 & 63];
        out[o++] = abc[v >> 12 & 63];
        out[o++] = i + 1 < n ? abc[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? abc[v & 63] : '=';
    }
    out[o] = 0;
}

/* --- latency histogram (microseconds, log-linear) --------------------------------------- */

#define SUB_BITS 7
#define SUB (1u << SUB_BITS)
#define MAX_EXP 40 /* 2^41 us: 25 days */
#define NBUCKETS (SUB + (MAX_EXP - SUB_BITS + 1) * SUB)

static uint64_t hist[NBUCKETS];
static uint64_t hist_n, hist_negative;
static uint64_t hist_min = UINT64_MAX, hist_max;
static int64_t win_lo = INT64_MAX, win_hi = INT64_MAX; /* ns since the epoch */

static inline unsigned bucket_of(uint64_t us) {
    if (us < SUB) return (unsigned)us;
    unsigned e = 63u - (unsigned)__builtin_clzll(us);
    if (e > MAX_EXP) return NBUCKETS - 1;
    unsigned shift = e - SUB_BITS;
    return SUB + shift * SUB + (unsigned)((us >> shift) - SUB);
}

static double bucket_middle(unsigned i) { /* microseconds */
    if (i < SUB) return i;
    unsigned shift = (i - SUB) / SUB;
    uint64_t lower = (uint64_t)(SUB + (i - SUB) % SUB) << shift;
    return (double)lower + ((double)((uint64_t)1 << shift) - 1) / 2;
}

static inline void record_latency(int64_t lat_ns) {
    if (lat_ns < 0) { /* clocks agree on one machine: should not happen; counted as 0 */
        hist_negative++;
        lat_ns = 0;
    }
    uint64_t us = (uint64_t)(lat_ns + 500) / 1000;
    hist[bucket_of(us)]++;
    hist_n++;
    if (us < hist_min) hist_min = us;
    if (us > hist_max) hist_max = us;
}

static double quantile_us(double q) { /* the Python bench's rule: sorted[int(q * n)] */
    uint64_t rank = (uint64_t)(q * (double)hist_n);
    if (rank >= hist_n) rank = hist_n - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        seen += hist[i];
        if (seen > rank) {
            double v = bucket_middle(i);
            if (v < (double)hist_min) v = (double)hist_min;
            if (v > (double)hist_max) v = (double)hist_max;
            return v;
        }
    }
    return (double)hist_max;
}

/* --- clients ---------------------------------------------------------------------------- */

enum state { IDLE, CONNECTING, HANDSHAKE, OPEN, SUBSCRIBED, CLOSED };

typedef struct {
    int fd;
    enum state state;
    bool want_out;         /* EPOLLOUT registered */
    bool subscribed_once;  /* got the `subscribed` of every channel */
    int nsubs;             /* channels whose `subscribed` came */
    int64_t *last;         /* per channel: last offset; -2 until subscribed (in `lasts`) */
    int64_t deadline;      /* monotonic ns: subscribed by then */
    char accept[32];       /* the expected Sec-WebSocket-Accept */
    uint8_t *in;           /* bytes of an incomplete response or frame */
    size_t nin, capin;
    uint8_t *out;          /* bytes the socket did not take yet */
    size_t nout, capout;
} client;

static struct {
    const char *host, *path, *channel, *name;
    int port, clients, concurrency, channels;
    double timeout;
    bool per_client; /* client i on channel i mod channels only */
} opt = {"127.0.0.1", "/ws", NULL, "bench", 0, 0, 50, 1, 30.0, false};

#define MAX_CHANNELS 10000

static client *cl;
static int64_t *lasts; /* clients x channels, client-major */
static int ep;
static size_t channel_len; /* of --channel: the whole name (1 channel) or the prefix */
static struct sockaddr_in addr;

/* Last offsets kept per client: one per channel, or one (its own channel) with --per-client. */
static inline int nlast(void) { return opt.per_client ? 1 : opt.channels; }
/* The channel a --per-client client is on. */
static inline int own_channel(const client *c) { return (int)(c - cl) % opt.channels; }
/* Where a client keeps channel `chan`'s last offset, or NULL if it is not on it. */
static inline int64_t *last_of(client *c, int chan) {
    if (chan < 0) return NULL;
    if (!opt.per_client) return &c->last[chan];
    return chan == own_channel(c) ? &c->last[0] : NULL;
}

/* totals over all clients */
static uint64_t t_pubs, t_frames, t_bytes, t_gaps, t_dups, t_announced, t_resyncs, t_errors;
static uint64_t t_disconnects, t_pings, t_other_channel;
static int n_inflight, n_subscribed, n_failed, n_open;
static bool ready_sent;
#define MAX_CODES 32
static struct { int code; uint64_t count; } codes[MAX_CODES];
static int n_codes;
#define MAX_SAMPLES 5
static char samples[MAX_SAMPLES][320];
static int n_samples;

static void sample(const char *fmt, ...) {
    if (n_samples >= MAX_SAMPLES) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(samples[n_samples++], sizeof samples[0], fmt, ap);
    va_end(ap);
}

static void count_code(int code) {
    for (int i = 0; i < n_codes; i++)
        if (codes[i].code == code) {
            codes[i].count++;
            return;
        }
    if (n_codes < MAX_CODES) codes[n_codes].code = code, codes[n_codes++].count = 1;
}

static void set_events(client *c, bool out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u64 = (uint64_t)(c - cl)};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0) c->want_out = out;
}

static void drop(client *c) { /* close the socket; the caller counted why */
    if (c->state == CLOSED) return;
    if (c->state != IDLE) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        n_open--;
    }
    if (!c->subscribed_once) {
        n_failed++;
        if (c->state != IDLE) n_inflight--;
    }
    c->state = CLOSED;
    c->fd = -1;
    free(c->in), free(c->out);
    c->in = c->out = NULL;
    c->nin = c->capin = c->nout = c->capout = 0;
}

static void fail(client *c, const char *fmt, ...) { /* an error: count it, drop the client */
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    t_errors++;
    sample("client %d: %s", (int)(c - cl), why);
    drop(c);
}

static void lost(client *c, const char *why) { /* the server (or the network) ended it */
    if (c->state == CLOSED) return;
    if (!c->subscribed_once) {
        t_errors++;
        sample("client %d: %s before subscribed", (int)(c - cl), why);
    } else {
        t_disconnects++;
    }
    drop(c);
}

static void send_raw(client *c, const uint8_t *p, size_t n) {
    if (c->state == CLOSED) return;
    if (c->nout == 0) {
        ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                lost(c, strerror(errno));
                return;
            }
            k = 0;
        }
        p += k, n -= (size_t)k;
        if (n == 0) return;
    }
    if (c->nout + n > c->capout) {
        c->capout = (c->nout + n) * 2;
        c->out = xrealloc(c->out, c->capout);
    }
    memcpy(c->out + c->nout, p, n);
    c->nout += n;
    if (!c->want_out) set_events(c, true);
}

static void flush_out(client *c) {
    while (c->nout) {
        ssize_t k = send(c->fd, c->out, c->nout, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            lost(c, strerror(errno));
            return;
        }
        memmove(c->out, c->out + k, c->nout - (size_t)k);
        c->nout -= (size_t)k;
    }
    set_events(c, false);
}

static void send_frame(client *c, int opcode, const void *payload, size_t n) {
    uint8_t buf[16 + 1024], *f = n <= 1024 ? buf : xrealloc(NULL, n + 16);
    size_t h = 0;
    f[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        f[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        f[h++] = 0x80 | 126, f[h++] = (uint8_t)(n >> 8), f[h++] = (uint8_t)n;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) f[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint32_t key = (uint32_t)rng();
    uint8_t mask[4] = {(uint8_t)(key >> 24), (uint8_t)(key >> 16), (uint8_t)(key >> 8), (uint8_t)key};
    memcpy(f + h, mask, 4);
    h += 4;
    const uint8_t *p = payload;
    for (size_t i = 0; i < n; i++) f[h + i] = p[i] ^ mask[i & 3];
    send_raw(c, f, h + n);
    if (f != buf) free(f);
}

static void send_text(client *c, const char *text) { send_frame(c, 1, text, strlen(text)); }

static void send_close(client *c, int code) {
    uint8_t p[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    send_frame(c, 8, p, 2);
}

/* --- JSON scanning ---------------------------------------------------------------------- */

/* Not a validator: enough to walk any well-formed message and to refuse what does not
 * look like JSON. Each function returns the position after what it read, or NULL. */

static const uint8_t *ws(const uint8_t *p, const uint8_t *e) {
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

static inline const uint8_t *skip_string(const uint8_t *p, const uint8_t *e) { /* p at '"' */
    for (p++; p < e; p++) { /* strings here are short: a plain loop beats memchr */
        if (*p == '"') return p + 1;
        if (*p == '\\' && ++p == e) return NULL;
    }
    return NULL;
}

static uint8_t structural[256]; /* '"', '{', '}', '[', ']' */

/* The rest of a container whose `depth` brackets are open at q; returns after the last. */
static const uint8_t *close_container(const uint8_t *q, const uint8_t *e, int depth) {
    while (q < e) {
        while (q < e && !structural[*q]) q++;
        if (q >= e) break;
        uint8_t ch = *q;
        if (ch == '"') {
            q = skip_string(q, e);
            if (!q) return NULL;
            continue;
        }
        if (ch == '{' || ch == '[') depth++;
        else if (--depth == 0) return q + 1;
        q++;
    }
    return NULL;
}

static const uint8_t *skip_value(const uint8_t *p, const uint8_t *e) {
    p = ws(p, e);
    if (p >= e) return NULL;
    if (*p == '"') return skip_string(p, e);
    if (*p == '{' || *p == '[') return close_container(p + 1, e, 1);
    const uint8_t *s = p; /* number, true, false, null */
    while (p < e && (isalnum(*p) || *p == '-' || *p == '+' || *p == '.')) p++;
    return p > s ? p : NULL;
}

/* A non-negative integer; NULL if the value is anything else. */
static const uint8_t *parse_int(const uint8_t *p, const uint8_t *e, int64_t *out) {
    int64_t v = 0;
    const uint8_t *s = p;
    while (p < e && *p >= '0' && *p <= '9') {
        if (v > (INT64_MAX - 9) / 10) return NULL;
        v = v * 10 + (*p++ - '0');
    }
    if (p == s || (p < e && (*p == '.' || *p == 'e' || *p == 'E'))) return NULL;
    *out = v;
    return p;
}

/* A JSON number of seconds as nanoseconds (exact for plain decimals; strtod otherwise). */
static const uint8_t *parse_seconds(const uint8_t *p, const uint8_t *e, int64_t *ns) {
    static const int64_t pow10[10] = {1000000000, 100000000, 10000000, 1000000, 100000,
                                      10000, 1000, 100, 10, 1};
    const uint8_t *s = p;
    bool neg = p < e && *p == '-';
    if (neg) p++;
    int64_t whole = 0, frac = 0;
    const uint8_t *d = p;
    while (p < e && (unsigned)(*p - '0') < 10 && p - d < 11) whole = whole * 10 + (*p++ - '0');
    bool plain = p > d && !(p < e && (unsigned)(*p - '0') < 10);
    if (plain && p < e && *p == '.') {
        const uint8_t *f = ++p;
        while (p < e && (unsigned)(*p - '0') < 10 && p - f < 9) frac = frac * 10 + (*p++ - '0');
        int digits = (int)(p - f);
        while (p < e && (unsigned)(*p - '0') < 10) p++; /* beyond nanoseconds */
        plain = digits > 0;
        frac *= pow10[digits];
    }
    if (plain && !(p < e && (*p == 'e' || *p == 'E'))) {
        *ns = (whole * 1000000000 + frac) * (neg ? -1 : 1);
        return p;
    }
    char tmp[64]; /* exponents, huge numbers: the slow way */
    const uint8_t *t = s;
    while (t < e && t - s < 63 && (isdigit(*t) || *t == '-' || *t == '+' || *t == '.' ||
                                   *t == 'e' || *t == 'E'))
        t++;
    memcpy(tmp, s, (size_t)(t - s));
    tmp[t - s] = 0;
    char *end;
    double v = strtod(tmp, &end);
    if (end == tmp || v != v || v > 9e9 || v < -9e9) return NULL;
    *ns = (int64_t)(v * 1e9);
    return s + (end - tmp);
}

typedef struct {
    const uint8_t *start, *end, *type, *channel; /* the message is [start, end) */
    size_t type_len, channel_len;
    int64_t offset, from, to, ts;
    int chan; /* index of "channel" among ours; -1: absent or not one of ours */
    bool has_offset, has_from, has_to, has_ts;
} msg;

#define KEY(k, s) (k##_len == sizeof(s) - 1 && memcmp(k, s, sizeof(s) - 1) == 0)

/* The top-level keys of data, looking for "ts". p at '{'. */
static const uint8_t *scan_data(const uint8_t *p, const uint8_t *e, msg *m) {
    p = ws(p + 1, e);
    if (p < e && *p == '}') return p + 1;
    while (p < e) {
        if (*p != '"') return NULL;
        const uint8_t *k = p + 1, *ke = skip_string(p, e);
        if (!ke) return NULL;
        size_t k_len = (size_t)(ke - 1 - k);
        p = ws(ke, e);
        if (p >= e || *p != ':') return NULL;
        p = ws(p + 1, e);
        if (KEY(k, "ts") && p < e && (*p == '-' || (*p >= '0' && *p <= '9'))) {
            p = parse_seconds(p, e, &m->ts);
            if (!p) return NULL;
            m->has_ts = true;
            return close_container(p, e, 1); /* the rest of data */
        }
        p = skip_value(p, e);
        if (!p) return NULL;
        p = ws(p, e);
        if (p < e && *p == ',') {
            p = ws(p + 1, e);
            continue;
        }
        if (p < e && *p == '}') return p + 1;
        return NULL;
    }
    return NULL;
}

/* The channel index in the name's suffix after --channel, p at the suffix: with one channel
 * nothing (index 0), else the decimal index (no sign, no leading zero) below --channels.
 * Returns the position after the digits (at the closing quote), or NULL. */
static inline const uint8_t *channel_suffix(const uint8_t *p, const uint8_t *e, int *index) {
    if (opt.channels == 1) return *index = 0, p;
    const uint8_t *d = p;
    int v = 0;
    while (p < e && (unsigned)(*p - '0') < 10 && p - d < 6) v = v * 10 + (*p++ - '0');
    if (p == d || (*d == '0' && p - d > 1) || v >= opt.channels) return NULL;
    *index = v;
    return p;
}

/* The index of a channel name among ours, or -1. */
static int channel_index(const uint8_t *name, size_t len) {
    int index;
    if (len < channel_len || memcmp(name, opt.channel, channel_len) != 0) return -1;
    const uint8_t *e = name + len, *p = channel_suffix(name + channel_len, e, &index);
    return p == e ? index : -1;
}

static char pub_prefix[300]; /* {"type":"pub","channel":"<--channel> */
static size_t pub_prefix_len;
#define OFFSET_KEY "\",\"offset\":"
#define DATA_TS ",\"data\":{\"ts\":"

/* A pub exactly as the edge writes it (common.protocol.pub_json, compact, with the
 * publisher's data starting with "ts") on one of our channels; NULL for anything else,
 * which then takes the general path. */
static const uint8_t *scan_pub_fast(const uint8_t *p, const uint8_t *e, msg *m) {
    if ((size_t)(e - p) < pub_prefix_len + 40 || memcmp(p, pub_prefix, pub_prefix_len) != 0)
        return NULL;
    const uint8_t *q = channel_suffix(p + pub_prefix_len, e, &m->chan);
    if (!q || (size_t)(e - q) < sizeof OFFSET_KEY ||
        memcmp(q, OFFSET_KEY, sizeof OFFSET_KEY - 1) != 0)
        return NULL;
    m->channel = p + 25, m->channel_len = (size_t)(q - m->channel);
    q = parse_int(q + sizeof OFFSET_KEY - 1, e, &m->offset);
    if (!q || (size_t)(e - q) < sizeof DATA_TS || memcmp(q, DATA_TS, sizeof DATA_TS - 1) != 0)
        return NULL;
    q = parse_seconds(q + sizeof DATA_TS - 1, e, &m->ts);
    if (!q || !(q = close_container(q, e, 1))) return NULL;
    if (q >= e || *q != '}') return NULL; /* anything after data: the general path */
    m->type = p + 9, m->type_len = 3;
    m->has_offset = m->has_ts = true;
    return q + 1;
}

static const uint8_t *scan_object(const uint8_t *p, const uint8_t *e, msg *m);

/* One message object at p ('{'). */
static const uint8_t *scan_message(const uint8_t *p, const uint8_t *e, msg *m) {
    memset(m, 0, sizeof *m);
    m->start = p;
    const uint8_t *fast = scan_pub_fast(p, e, m);
    if (fast) return fast;
    memset(m, 0, sizeof *m);
    m->start = p;
    const uint8_t *r = scan_object(p, e, m);
    m->chan = m->channel ? channel_index(m->channel, m->channel_len) : -1;
    return r;
}

/* The general path: any well-formed message object at p. */
static const uint8_t *scan_object(const uint8_t *p, const uint8_t *e, msg *m) {
    if (p >= e || *p != '{') return NULL;
    p = ws(p + 1, e);
    if (p < e && *p == '}') return p + 1;
    while (p < e) {
        if (*p != '"') return NULL;
        const uint8_t *k = p + 1, *ke = skip_string(p, e);
        if (!ke) return NULL;
        size_t k_len = (size_t)(ke - 1 - k);
        p = ws(ke, e);
        if (p >= e || *p != ':') return NULL;
        p = ws(p + 1, e);
        if (p >= e) return NULL;
        const uint8_t *v = p;
        if ((KEY(k, "type") || KEY(k, "channel")) && *p == '"') {
            p = skip_string(p, e);
            if (!p) return NULL;
            if (k_len == 4) m->type = v + 1, m->type_len = (size_t)(p - 1 - m->type);
            else m->channel = v + 1, m->channel_len = (size_t)(p - 1 - m->channel);
        } else if (KEY(k, "offset") && *p >= '0' && *p <= '9') {
            p = parse_int(p, e, &m->offset);
            m->has_offset = p != NULL;
        } else if (KEY(k, "from") && *p >= '0' && *p <= '9') {
            p = parse_int(p, e, &m->from);
            m->has_from = p != NULL;
        } else if (KEY(k, "to") && *p >= '0' && *p <= '9') {
            p = parse_int(p, e, &m->to);
            m->has_to = p != NULL;
        } else if (KEY(k, "data") && *p == '{') {
            p = scan_data(p, e, m);
        } else {
            p = skip_value(p, e);
        }
        if (!p) return NULL;
        p = ws(p, e);
        if (p < e && *p == ',') {
            p = ws(p + 1, e);
            continue;
        }
        if (p < e && *p == '}') return p + 1;
        return NULL;
    }
    return NULL;
}

#define IS(field, s) (m->field##_len == sizeof(s) - 1 && memcmp(m->field, s, sizeof(s) - 1) == 0)

static void subscribed(client *c) {
    if (c->subscribed_once) return;
    c->subscribed_once = true;
    n_subscribed++;
    n_inflight--;
}

/* Subscribe to channel j. One at a time per client (the next on the previous reply): the
 * subscribes in flight stay at most --concurrency, whatever --channels (an edge refuses
 * subscribes with `unavailable` when ~100 are in flight: its Redis pool's limit). */
static void send_subscribe(client *c, int j) {
    char buf[400];
    if (opt.per_client) j = own_channel(c);
    if (opt.channels == 1)
        snprintf(buf, sizeof buf, "{\"type\":\"subscribe\",\"id\":2,\"channel\":\"%s\"}",
                 opt.channel);
    else
        snprintf(buf, sizeof buf, "{\"type\":\"subscribe\",\"id\":%d,\"channel\":\"%s%d\"}",
                 2 + j, opt.channel, j);
    send_text(c, buf);
}

/* One message; false if the client is gone. */
static bool on_message(client *c, const msg *m, int64_t now) {
    if (IS(type, "pub")) {
        int64_t *last = last_of(c, m->chan);
        if (!last) {
            t_other_channel++;
            return true;
        }
        if (!m->has_offset) {
            t_errors++;
            sample("client %d: pub without an offset", (int)(c - cl));
            return true;
        }
        if (*last < -1) {
            t_errors++; /* before the subscribe reply */
            sample("client %d: pub before subscribed (channel %d)", (int)(c - cl), m->chan);
            return true;
        }
        int64_t off = m->offset;
        if (off <= *last) {
            t_dups++;
            return true;
        }
        if (off != *last + 1) t_gaps += (uint64_t)(off - *last - 1);
        *last = off;
        t_pubs++;
        if (m->has_ts && m->ts >= win_lo && m->ts < win_hi) record_latency(now - m->ts);
    } else if (IS(type, "ping")) {
        t_pings++;
        send_text(c, "{\"type\":\"pong\"}");
    } else if (IS(type, "connected")) {
        send_subscribe(c, 0);
    } else if (IS(type, "subscribed")) {
        int64_t *last = last_of(c, m->chan);
        if (!last || !m->has_offset) {
            fail(c, "bad subscribed reply");
            return false;
        }
        if (*last >= -1) {
            fail(c, "a second subscribed reply for channel %d", m->chan);
            return false;
        }
        *last = m->offset;
        if (++c->nsubs == (opt.per_client ? 1 : opt.channels)) {
            c->state = SUBSCRIBED;
            subscribed(c);
        } else {
            send_subscribe(c, c->nsubs);
        }
    } else if (IS(type, "resync") || IS(type, "gap")) {
        int64_t *last = last_of(c, m->chan);
        if (!last) return true;
        if (*last < -1) {
            t_errors++;
            sample("client %d: %.*s before subscribed", (int)(c - cl), (int)m->type_len,
                   (const char *)m->type);
            return true;
        }
        if (m->type_len == 6) { /* resync */
            if (m->has_offset) {
                t_resyncs++;
                *last = m->offset;
            }
            return true;
        }
        if (!m->has_from || !m->has_to) {
            t_errors++;
            sample("client %d: gap without from/to", (int)(c - cl));
            return true;
        }
        int64_t first = m->from, to = m->to;
        if (first > *last + 1) t_gaps += (uint64_t)(first - *last - 1);
        int64_t lo = first > *last + 1 ? first : *last + 1;
        if (to >= lo) t_announced += (uint64_t)(to - lo + 1);
        if (to > *last) *last = to;
    } else if (IS(type, "error")) {
        int len = m->end - m->start > 200 ? 200 : (int)(m->end - m->start);
        fail(c, "error reply: %.*s", len, (const char *)m->start);
        return false;
    }
    return true; /* pong, unsubscribed, history, ...: nothing to do */
}

static void bad_frame(client *c, const uint8_t *p, size_t n) {
    t_errors++;
    char shown[121];
    size_t k = n < 120 ? n : 120;
    for (size_t i = 0; i < k; i++) shown[i] = p[i] >= 32 && p[i] < 127 ? (char)p[i] : '?';
    shown[k] = 0;
    sample("client %d: a text frame that does not scan (%zu bytes): %s", (int)(c - cl), n, shown);
}

/* A text frame: one message or an array of them. False if the client is gone. */
static bool on_text(client *c, const uint8_t *p, size_t n, int64_t now) {
    const uint8_t *e = p + n, *q = ws(p, e);
    msg m;
    t_frames++;
    if (q < e && *q == '[') {
        q = ws(q + 1, e);
        if (q < e && *q == ']') return true;
        while (q < e) {
            const uint8_t *r = scan_message(q, e, &m);
            if (!r) break;
            m.end = r;
            if (!on_message(c, &m, now)) return false;
            q = ws(r, e);
            if (q < e && *q == ',') {
                q = ws(q + 1, e);
                continue;
            }
            if (q < e && *q == ']' && ws(q + 1, e) == e) return true;
            break;
        }
    } else {
        const uint8_t *r = scan_message(q, e, &m);
        m.end = r;
        if (r && ws(r, e) == e) return on_message(c, &m, now);
    }
    bad_frame(c, p, n);
    return true;
}

/* Frames in buf[0..n): returns the bytes consumed (complete frames). The client may be
 * closed when it returns. */
static size_t on_frames(client *c, const uint8_t *buf, size_t n, int64_t now) {
    size_t pos = 0;
    while (n - pos >= 2) {
        uint8_t b0 = buf[pos], b1 = buf[pos + 1];
        if (b1 & 0x80) {
            fail(c, "masked frame from the server");
            return pos;
        }
        uint64_t len = b1 & 0x7F;
        size_t h = 2;
        if (len == 126) {
            if (n - pos < 4) break;
            len = (uint64_t)buf[pos + 2] << 8 | buf[pos + 3];
            h = 4;
        } else if (len == 127) {
            if (n - pos < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | buf[pos + 2 + i];
            h = 10;
            if (len > ((uint64_t)1 << 40)) {
                fail(c, "frame length %llu", (unsigned long long)len);
                return pos;
            }
        }
        if (n - pos - h < len) break;
        const uint8_t *payload = buf + pos + h;
        int opcode = b0 & 0x0F;
        if ((b0 & 0x70) || !(b0 & 0x80) || opcode == 0 || opcode == 2) {
            fail(c, "unexpected frame: first byte 0x%02x (RSV, fragment or binary)", b0);
            return pos;
        }
        pos += h + (size_t)len;
        if (opcode == 1) {
            if (!on_text(c, payload, (size_t)len, now)) return pos;
        } else if (opcode == 8) {
            int code = len >= 2 ? payload[0] << 8 | payload[1] : 1005;
            count_code(code);
            if (len >= 2) send_close(c, code);
            else send_frame(c, 8, "", 0);
            lost(c, "closed by the server");
            return pos;
        } else if (opcode == 9) {
            send_frame(c, 10, payload, (size_t)len);
        } else if (opcode != 10) {
            fail(c, "unknown opcode %d", opcode);
            return pos;
        }
        if (c->state == CLOSED) return pos;
    }
    return pos;
}

static bool header_is(const char *head, const char *name, const char *value, bool token) {
    size_t nl = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        if (strncasecmp(line, name, nl) != 0 || line[nl] != ':') continue;
        const char *v = line + nl + 1, *end = strstr(v, "\r\n");
        while (*v == ' ' || *v == '\t') v++;
        size_t vl = (size_t)(end - v);
        while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) vl--;
        if (!token) return vl == strlen(value) && strncmp(v, value, vl) == 0;
        /* a comma-separated list of case-insensitive tokens */
        size_t tl = strlen(value);
        for (const char *t = v; t < v + vl;) {
            while (t < v + vl && (*t == ' ' || *t == ',')) t++;
            const char *te = t;
            while (te < v + vl && *te != ',' && *te != ' ') te++;
            if ((size_t)(te - t) == tl && strncasecmp(t, value, tl) == 0) return true;
            t = te;
        }
        return false;
    }
    return false;
}

static bool has_header(const char *head, const char *name) {
    size_t nl = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') return true;
    }
    return false;
}

/* The HTTP response in c->in; false if the client is gone or the response incomplete. */
static bool on_handshake(client *c) {
    uint8_t *end = memmem(c->in, c->nin, "\r\n\r\n", 4);
    if (!end) {
        if (c->nin > 65536) fail(c, "handshake response too long");
        return false;
    }
    size_t hl = (size_t)(end - c->in) + 4;
    char *head = xrealloc(NULL, hl + 1);
    memcpy(head, c->in, hl);
    head[hl] = 0;
    const char *why = NULL;
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) why = "status is not 101";
    else if (!header_is(head, "upgrade", "websocket", true)) why = "no Upgrade: websocket";
    else if (!header_is(head, "connection", "upgrade", true)) why = "no Connection: upgrade";
    else if (!header_is(head, "sec-websocket-accept", c->accept, false)) why = "bad Sec-WebSocket-Accept";
    else if (!header_is(head, "sec-websocket-protocol", "fanout.json", false)) why = "subprotocol fanout.json not accepted";
    else if (has_header(head, "sec-websocket-extensions")) why = "an extension we did not offer";
    if (why) {
        char *eol = strstr(head, "\r\n");
        if (eol) *eol = 0;
        fail(c, "handshake failed: %s (%.80s)", why, head);
        free(head);
        return false;
    }
    free(head);
    memmove(c->in, c->in + hl, c->nin - hl);
    c->nin -= hl;
    c->state = OPEN;
    char buf[256];
    snprintf(buf, sizeof buf, "{\"type\":\"connect\",\"id\":1,\"name\":\"%s\"}", opt.name);
    send_text(c, buf);
    return c->state != CLOSED;
}

static uint8_t *rbuf;
static size_t rcap;

static void keep(client *c, const uint8_t *p, size_t n) {
    if (n > c->capin) {
        c->capin = n * 2 > 4096 ? n * 2 : 4096;
        c->in = xrealloc(c->in, c->capin);
    }
    memmove(c->in, p, n);
    c->nin = n;
}

static void on_readable(client *c) {
    size_t want = c->nin + 65536;
    if (rcap < want) {
        rcap = want * 2;
        rbuf = xrealloc(rbuf, rcap);
    }
    if (c->nin) memcpy(rbuf, c->in, c->nin);
    ssize_t k = recv(c->fd, rbuf + c->nin, rcap - c->nin, 0);
    if (k == 0) {
        lost(c, "connection closed (no close frame)");
        return;
    }
    if (k < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lost(c, strerror(errno));
        return;
    }
    size_t n = c->nin + (size_t)k;
    int64_t now = clock_ns(CLOCK_REALTIME);
    if (c->state == HANDSHAKE) {
        keep(c, rbuf, n);
        if (!on_handshake(c)) return;
        if (c->nin == 0) return;
        n = c->nin;
        memcpy(rbuf, c->in, n);
    }
    t_bytes += (uint64_t)k;
    size_t used = on_frames(c, rbuf, n, now);
    if (c->state != CLOSED) keep(c, rbuf + used, n - used);
}

static void start_client(client *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        t_errors++;
        sample("client %d: socket: %s", (int)(c - cl), strerror(errno));
        n_failed++;
        c->state = CLOSED;
        return;
    }
    n_inflight++;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = CONNECTING;
    c->nsubs = 0;
    for (int j = 0; j < nlast(); j++) c->last[j] = -2;
    c->deadline = clock_ns(CLOCK_MONOTONIC) + (int64_t)(opt.timeout * 1e9);
    n_open++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)(c - cl)};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        fail(c, "epoll_ctl: %s", strerror(errno));
        return;
    }
    c->want_out = true;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        fail(c, "connect: %s", strerror(errno));
}

static void on_connected(client *c) { /* the TCP connect finished */
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(c, "connect: %s", strerror(err));
        return;
    }
    uint8_t raw[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = rng();
        memcpy(raw + i, &r, 8);
    }
    char key[32], cat[96];
    base64(raw, 16, key);
    snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    uint8_t digest[20];
    sha1((const uint8_t *)cat, strlen(cat), digest);
    base64(digest, 20, c->accept);
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: fanout.json\r\n"
                     "User-Agent: wsload\r\n\r\n",
                     opt.path, opt.host, opt.port, key);
    c->state = HANDSHAKE;
    set_events(c, false);
    send_raw(c, (const uint8_t *)req, (size_t)n);
}

/* --- commands --------------------------------------------------------------------------- */

static void reply(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    if (fflush(stdout) != 0) exit(1); /* the orchestrator is gone */
}

static bool parse_bound(const char *s, int64_t *ns) {
    if (strcmp(s, "inf") == 0 || strcmp(s, "+inf") == 0) return *ns = INT64_MAX, true;
    if (strcmp(s, "-inf") == 0) return *ns = INT64_MIN, true;
    const uint8_t *e = (const uint8_t *)s + strlen(s);
    const uint8_t *p = parse_seconds((const uint8_t *)s, e, ns);
    return p == e;
}

static void json_string(char *out, size_t cap, const char *s) {
    size_t o = 0;
    out[o++] = '"';
    for (; *s && o + 8 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') out[o++] = '\\', out[o++] = (char)ch;
        else if (ch < 32 || ch >= 127) out[o++] = '?';
        else out[o++] = (char)ch;
    }
    out[o++] = '"';
    out[o] = 0;
}

/* `min_lasts`: per channel, the lowest last offset over the open clients (the orchestrator
 * compares each with the last offset it published there: the drain check); `min_last`: the
 * lowest of them (with one channel, the same number). */
static void cmd_stats(void) {
    static char *buf;
    static size_t cap;
    static int64_t *min_lasts;
    if (!buf) {
        cap = 8192 + 24 * (size_t)opt.channels;
        buf = xrealloc(NULL, cap);
        min_lasts = xrealloc(NULL, sizeof *min_lasts * (size_t)opt.channels);
    }
    size_t o = 0;
#define PUT(...) o += (size_t)snprintf(buf + o, cap - o, __VA_ARGS__)
    int64_t min_last = INT64_MAX;
    int open = 0;
    for (int j = 0; j < opt.channels; j++) min_lasts[j] = INT64_MAX;
    for (int i = 0; i < opt.clients; i++) {
        client *c = &cl[i];
        if (c->state == CLOSED || c->state == IDLE) continue;
        open++;
        if (opt.per_client) {
            int j = own_channel(c);
            if (c->last[0] < min_lasts[j]) min_lasts[j] = c->last[0];
            continue;
        }
        for (int j = 0; j < opt.channels; j++)
            if (c->last[j] < min_lasts[j]) min_lasts[j] = c->last[j];
    }
    for (int j = 0; j < opt.channels; j++)
        if (min_lasts[j] < min_last) min_last = min_lasts[j];
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    PUT("{\"mono\":%.6f,\"pubs\":%llu,\"frames\":%llu,\"bytes\":%llu,\"gaps\":%llu,"
        "\"dups\":%llu,\"announced\":%llu,\"resyncs\":%llu,\"errors\":%llu,"
        "\"disconnects\":%llu,\"pings\":%llu,\"other_channel\":%llu,",
        (double)clock_ns(CLOCK_MONOTONIC) / 1e9, (unsigned long long)t_pubs,
        (unsigned long long)t_frames, (unsigned long long)t_bytes, (unsigned long long)t_gaps,
        (unsigned long long)t_dups, (unsigned long long)t_announced,
        (unsigned long long)t_resyncs, (unsigned long long)t_errors,
        (unsigned long long)t_disconnects, (unsigned long long)t_pings,
        (unsigned long long)t_other_channel);
    PUT("\"open\":%d,\"subscribed\":%d,\"failed\":%d,\"channels\":%d,", open, n_subscribed,
        n_failed, opt.channels);
    if (open) {
        PUT("\"min_last\":%lld,\"min_lasts\":[", (long long)min_last);
        for (int j = 0; j < opt.channels; j++) PUT("%s%lld", j ? "," : "", (long long)min_lasts[j]);
        PUT("],");
    } else {
        PUT("\"min_last\":null,\"min_lasts\":null,");
    }
    PUT("\"close_codes\":{");
    for (int i = 0; i < n_codes; i++)
        PUT("%s\"%d\":%llu", i ? "," : "", codes[i].code, (unsigned long long)codes[i].count);
    PUT("},\"error_samples\":[");
    for (int i = 0; i < n_samples; i++) {
        char s[700];
        json_string(s, sizeof s, samples[i]);
        PUT("%s%s", i ? "," : "", s);
    }
    PUT("],\"cpu_user\":%.3f,\"cpu_sys\":%.3f,",
        (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
        (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    if (hist_n)
        PUT("\"lat\":{\"n\":%llu,\"p50\":%.6f,\"p99\":%.6f,\"max\":%.6f,\"min\":%.6f,"
            "\"negative\":%llu}}",
            (unsigned long long)hist_n, quantile_us(0.50) / 1e6, quantile_us(0.99) / 1e6,
            (double)hist_max / 1e6, (double)hist_min / 1e6, (unsigned long long)hist_negative);
    else
        PUT("\"lat\":{\"n\":0,\"p50\":null,\"p99\":null,\"max\":null,\"min\":null,"
            "\"negative\":0}}");
#undef PUT
    reply("%s", buf);
}

static void quit(void) {
    for (int i = 0; i < opt.clients; i++) {
        client *c = &cl[i];
        if (c->state == OPEN || c->state == SUBSCRIBED) send_close(c, 1000);
        if (c->state != CLOSED && c->state != IDLE) {
            shutdown(c->fd, SHUT_WR);
            close(c->fd);
        }
    }
    reply("bye");
    exit(0);
}

static void command(char *line) {
    char *argv[4] = {0};
    int argc = 0;
    for (char *t = strtok(line, " \t\r"); t && argc < 4; t = strtok(NULL, " \t\r")) argv[argc++] = t;
    if (argc == 0) {
        reply("error empty command");
    } else if (strcmp(argv[0], "window") == 0 && argc == 3) {
        int64_t lo, hi;
        if (!parse_bound(argv[1], &lo) || !parse_bound(argv[2], &hi)) {
            reply("error bad window bounds");
            return;
        }
        memset(hist, 0, sizeof hist);
        hist_n = hist_negative = hist_max = 0;
        hist_min = UINT64_MAX;
        win_lo = lo, win_hi = hi;
        reply("ok");
    } else if (strcmp(argv[0], "until") == 0 && argc == 2) {
        int64_t hi;
        if (!parse_bound(argv[1], &hi)) {
            reply("error bad bound");
            return;
        }
        win_hi = hi;
        reply("ok");
    } else if (strcmp(argv[0], "stats") == 0) {
        cmd_stats();
    } else if (strcmp(argv[0], "quit") == 0) {
        quit();
    } else {
        reply("error unknown command %s (window <lo> <hi>, until <hi>, stats, quit)", argv[0]);
    }
}

static char cmdbuf[4096];
static size_t ncmd;

static void on_stdin(void) {
    ssize_t k = read(0, cmdbuf + ncmd, sizeof cmdbuf - 1 - ncmd);
    if (k == 0) exit(0); /* the orchestrator is gone */
    if (k < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        exit(1);
    }
    ncmd += (size_t)k;
    char *nl;
    while ((nl = memchr(cmdbuf, '\n', ncmd))) {
        *nl = 0;
        size_t used = (size_t)(nl - cmdbuf) + 1;
        command(cmdbuf);
        memmove(cmdbuf, cmdbuf + used, ncmd - used);
        ncmd -= used;
    }
    if (ncmd == sizeof cmdbuf - 1) ncmd = 0; /* a line that long is no command */
}

/* --- main ------------------------------------------------------------------------------- */

static void usage(void) {
    fputs("usage: wsload --port P --channel C --clients N [--channels 1] [--per-client]\n"
          "              [--host 127.0.0.1]\n"
          "              [--path /ws] [--concurrency 50] [--timeout 30] [--name bench]\n"
          "stdin commands: window <lo> <hi> | until <hi> | stats | quit\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv) {
    static const struct option longs[] = {
        {"host", 1, 0, 'h'},        {"port", 1, 0, 'p'},    {"path", 1, 0, 'P'},
        {"channel", 1, 0, 'c'},     {"clients", 1, 0, 'n'}, {"concurrency", 1, 0, 'k'},
        {"timeout", 1, 0, 't'},     {"name", 1, 0, 'N'},    {"channels", 1, 0, 'C'},
        {"per-client", 0, 0, 'I'},  {0, 0, 0, 0},
    };
    for (int ch; (ch = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'P': opt.path = optarg; break;
        case 'c': opt.channel = optarg; break;
        case 'n': opt.clients = atoi(optarg); break;
        case 'k': opt.concurrency = atoi(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 'N': opt.name = optarg; break;
        case 'C': opt.channels = atoi(optarg); break;
        case 'I': opt.per_client = true; break;
        default: usage();
        }
    }
    if (!opt.channel || opt.port <= 0 || opt.port > 65535 || opt.clients <= 0 ||
        opt.concurrency <= 0 || opt.timeout <= 0 || opt.channels <= 0)
        usage();
    if (opt.channels > MAX_CHANNELS) die("--channels: at most %d", MAX_CHANNELS);
    for (const char *s = opt.channel; *s; s++)
        if (*s == '"' || *s == '\\' || (unsigned char)*s < 32) die("a channel name needs no escaping");
    for (const char *s = opt.name; *s; s++)
        if (*s == '"' || *s == '\\' || (unsigned char)*s < 32) die("--name: no quotes or backslashes");
    if (strlen(opt.channel) > 200 || strlen(opt.name) > 64 || strlen(opt.path) > 512)
        die("--channel, --name or --path too long");
    channel_len = strlen(opt.channel);
    pub_prefix_len = (size_t)snprintf(pub_prefix, sizeof pub_prefix,
                                      "{\"type\":\"pub\",\"channel\":\"%s", opt.channel);
    for (const char *t = "\"{}[]"; *t; t++) structural[(uint8_t)*t] = 1;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) die("--host: an IPv4 address, got %s", opt.host);

    prctl(PR_SET_PDEATHSIG, SIGKILL); /* die with the orchestrator (it also closes stdin) */
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)opt.clients + 64) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    rng_state = (uint64_t)clock_ns(CLOCK_REALTIME) ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
    cl = calloc((size_t)opt.clients, sizeof *cl);
    if (!cl) die("out of memory");
    lasts = calloc((size_t)opt.clients * (size_t)nlast(), sizeof *lasts);
    if (!lasts) die("out of memory");
    for (int i = 0; i < opt.clients; i++) {
        cl[i].fd = -1;
        cl[i].last = lasts + (size_t)i * (size_t)nlast();
        for (int j = 0; j < nlast(); j++) cl[i].last[j] = -2;
    }
    rcap = 256 * 1024;
    rbuf = xrealloc(NULL, rcap);

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1: %s", strerror(errno));
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev) < 0) die("epoll_ctl(stdin): %s", strerror(errno));

    enum { MAXEV = 256 };
    struct epoll_event evs[MAXEV];
    int next = 0;
    int64_t next_check = 0;
    for (;;) {
        while (next < opt.clients && n_inflight < opt.concurrency) start_client(&cl[next++]);
        bool connecting = n_subscribed + n_failed < opt.clients;
        int k = epoll_wait(ep, evs, MAXEV, connecting ? 50 : 1000);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < k; i++) {
            uint64_t id = evs[i].data.u64;
            if (id == UINT64_MAX) {
                on_stdin();
                continue;
            }
            client *c = &cl[id];
            uint32_t e = evs[i].events;
            if (c->state == CLOSED) continue;
            if (c->state == CONNECTING) {
                if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
                continue;
            }
            if ((e & EPOLLOUT) && c->nout) flush_out(c);
            if (c->state != CLOSED && (e & (EPOLLIN | EPOLLERR | EPOLLHUP))) on_readable(c);
        }
        if (connecting) {
            int64_t now = clock_ns(CLOCK_MONOTONIC);
            if (now >= next_check) {
                next_check = now + 100000000;
                for (int i = 0; i < next; i++) {
                    client *c = &cl[i];
                    if (c->state != CLOSED && !c->subscribed_once && now > c->deadline)
                        fail(c, "not subscribed within %g s (state %d)", opt.timeout, (int)c->state);
                }
            }
            if (n_subscribed + n_failed == opt.clients && !ready_sent) {
                ready_sent = true;
                if (n_failed == 0) reply("ready %d", n_subscribed);
                else reply("error %d of %d clients failed: %s", n_failed, opt.clients,
                           n_samples ? samples[0] : "?");
            }
        }
    }
}
