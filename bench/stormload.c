/*
 * stormload: the C load client of bench/reconnect.py (`--client c`, the default).
 *
 * N WebSocket clients of the reconnect storm in one single-threaded epoll loop (one core),
 * so that the load client is not what bounds the storm: the same clients as the Python
 * BenchClient of bench/reconnect.py, with the same semantics, in a process of their own.
 * C11, libc and Linux epoll only; bench/reconnect.py builds it with
 * `cc -O2 -o <cache dir>/stormload bench/stormload.c`. Shares its approach and code (SHA-1,
 * base64, the JSON scan, frame parsing) with bench/wsload.c.
 *
 *   stormload --ports A,B --clients N [--host 127.0.0.1] [--path /ws] [--concurrency 200]
 *             [--timeout 60] [--seed 1]
 *
 * Client i is on 20 channels: the 4 shared `quotes.STORM<k>` (k = 0..3), then its 16 own
 * `account.c<i>x<j>.<kind>` (j = 0..3; kind = orders, positions, balance, trades), in this
 * order. It keeps a position (offset, epoch) per channel across connections.
 *
 * Initial phase (at start): client i connects to edge i % 2, at most --concurrency clients
 * between their first connect and their 20th `subscribed` reply at once. A connection: a
 * non-blocking TCP connect, the HTTP/1.1 upgrade offering `fanout.json` (101, Upgrade,
 * Connection, Sec-WebSocket-Accept and the subprotocol checked), {"type":"connect","id":0,
 * "name":"storm"}, and on `connected` the 20 subscribes in ONE write (masked frames, ids
 * counting up per client across connections), each with "recover":{"offset":O,"epoch":"E"}
 * once the channel has a position. A client is back when all 20 `subscribed` replies of its
 * connection came.
 *
 * Messages (a text frame is one JSON object or an array of them): a `pub` is read by a scan
 * of the edge's layout ({"type":"pub","channel":"...","offset":N first: common/protocol.py
 * pub_json); any other message by a scan of its top-level keys (any order). A pub of a channel
 * subscribed on the current connection is checked against the position: offset <= last is a
 * dup, offset > last + 1 a gap of the offsets skipped (counted as `conflated` instead when
 * that channel's `subscribed` said a `delivery` other than "all"). `subscribed`: recovered if
 * it says `recovered` with the epoch of the position, else the position is set from the reply
 * (a resync when there was one). `resync`: the position is set (counted). `gap` notices are
 * counted only (the Python client ignores them). {"type":"ping"} gets {"type":"pong"};
 * protocol pings a pong, a close frame is echoed.
 *
 * The edges' advice, as the Python client follows it: an HTTP answer other than 101 (a 503)
 * is `refused`: wait its Retry-After (1 s without one) plus up to half again. An `error` reply
 * to a subscribe with code `unavailable` or `internal` is `deferred`: that subscribe is sent
 * again on the same connection after retry_after_ms x (1 + rand/2), or 1-5 s without advice.
 * A connection that fails before it is open (TCP refused, reset or timed out by the kernel;
 * the upgrade not done within 30 s of the TCP connect, as the Python client's wait_for)
 * counts in `conn_failures` and is tried again after 0.1-1 s. A connection lost while its client is not
 * back (the server closed it, a reset) is replaced at once, on a random edge, resubscribing
 * everything with recover; one lost after the client is back is not (the Python client's
 * rule; counted in `disconnects`). Other errors: counted, the first 5 texts kept.
 *
 * Differences from the Python client, on paths the storm normally never takes: a connection
 * that fails after the TCP connect but before the upgrade is retried by one loop (the
 * Python client's connection_lost starts a second connect loop beside the failing one); an
 * upgrade that fails its checks is a connection failure retried (Python gives that client
 * up); a client not back within 120 s in the initial phase answers `error` (Python raises).
 *
 * stdin/stdout, one line each way; every command gets exactly one line back:
 *   (at start)    -> `ready <n>` once every client is back, or `error <text>`
 *   storm         -> every connection aborted at once (SO_LINGER 0: a RST, as asyncio's
 *                    abort), then every client connects at once to a random edge and
 *                    resubscribes with recover; answers when all are back or after --timeout
 *                    s: one JSON object, {"clients","back","timed_out","max","p50","p90"
 *                    (seconds from the abort to each client's return; null if none), the
 *                    counters of `stats`}
 *   check <file> [s] -> the file holds lines `<channel> <offset>` (the last offset published
 *                    per channel); waits up to s (default 60) seconds for every client's
 *                    position on each of its channels to reach it; answers {"behind":<pairs
 *                    (client, channel) still behind>,"pairs":<pairs checked>,"waited":<s>}
 *   stats         -> the counters: {"pubs" (publications taken: not dups),"recovered","resynced","gaps","dups","conflated",
 *                    "deferred","refused","conn_failures","disconnects","gap_notices",
 *                    "errors","error_samples":[...],"open","cpu_user","cpu_sys"}; all counted
 *                    since the start (like the Python client's Stats)
 *   quit          -> `bye`: every connection aborted, exit
 * End of stdin (the orchestrator died) ends the program too; so does its death (SIGKILL).
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
    fputs("stormload: ", stderr);
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

static uint64_t rng(void) { /* xorshift64*: mask keys, handshake keys and jitter need no more */
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

static double rand01(void) { return (double)(rng() >> 11) * 0x1.0p-53; }
static double uniform(double a, double b) { return a + (b - a) * rand01(); }

/* --- clients ---------------------------------------------------------------------------- */

#define NSHARED 4
#define NCH 20 /* 4 shared + 16 own */
#define ALL ((1u << NCH) - 1)
#define EPOCH_MAX 32 /* epochs are 12 hex digits (common/broker/types.py new_epoch) */
#define CONNECT_TIMEOUT 30.0  /* s: from the TCP connect to the upgrade's answer */
#define INITIAL_TIMEOUT 120.0 /* s: a client's first return (the Python bench's wait_for) */

static const char *const KINDS[4] = {"orders", "positions", "balance", "trades"};

enum state { IDLE, CONNECTING, HANDSHAKE, OPEN };

typedef struct {
    int64_t offset;
    char epoch[EPOCH_MAX]; /* NUL-terminated */
} position;

typedef struct {
    int fd;
    enum state state;
    bool want_out;    /* EPOLLOUT registered */
    bool done;        /* back: all 20 subscribed since the last reset */
    bool inflight;    /* initial phase: counted against --concurrency */
    int fixed_port;   /* this connect loop's edge (0, 1), or -1: a random one per attempt */
    uint32_t gen;     /* bumped by every connection attempt and reset: stale timers see it */
    uint32_t live;    /* bit j: channel j subscribed on the current connection */
    uint32_t lossy;   /* bit j: channel j's `delivery` is not "all" */
    uint32_t known;   /* bit j: channel j has a position */
    uint32_t ids;     /* the last request id used */
    uint32_t req[NCH]; /* the id of channel j's pending subscribe; 0: none */
    int64_t deadline; /* monotonic ns: upgraded by then (HANDSHAKE), or a connection failure */
    int64_t started;  /* monotonic ns: the initial phase's first connect */
    int64_t back_ns;  /* monotonic ns: when it was last back */
    int64_t open_ns;  /* monotonic ns: the last upgrade's 101 */
    int64_t conn_ns;  /* monotonic ns: the last `connected` reply */
    char accept[32];  /* the expected Sec-WebSocket-Accept */
    uint8_t *in;      /* bytes of an incomplete response or frame */
    size_t nin, capin;
    uint8_t *out;     /* bytes the socket did not take yet */
    size_t nout, capout;
    position pos[NCH];
} client;

static struct {
    const char *host, *path;
    int ports[2], clients, concurrency;
    double timeout;
    uint64_t seed;
} opt = {"127.0.0.1", "/ws", {0, 0}, 0, 200, 60.0, 1};

static client *cl;
static int ep;
static struct sockaddr_in addrs[2];

/* counters, all clients, since the start */
static uint64_t t_pubs, t_recovered, t_resynced, t_gaps, t_dups, t_conflated, t_deferred, t_refused;
static uint64_t t_conn_failures, t_disconnects, t_gap_notices, t_errors;
static int n_open;
#define MAX_SAMPLES 5
static char samples[MAX_SAMPLES][320];
static int n_samples;

enum phase { P_INITIAL, P_IDLE, P_STORM, P_CHECK };
static enum phase phase = P_INITIAL;
static int n_back;          /* clients back in this phase */
static int n_inflight;      /* initial phase */
static int64_t phase_start; /* monotonic ns */
static int64_t phase_deadline;
static bool stopping;

static void error_sample(const char *fmt, ...) {
    t_errors++;
    if (n_samples >= MAX_SAMPLES) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(samples[n_samples++], sizeof samples[0], fmt, ap);
    va_end(ap);
}

/* The name of client i's channel j. */
static int channel_name(char *out, size_t cap, int i, int j) {
    if (j < NSHARED) return snprintf(out, cap, "quotes.STORM%d", j);
    j -= NSHARED;
    return snprintf(out, cap, "account.c%dx%d.%s", i, j / 4, KINDS[j % 4]);
}

/* A channel name's slot j (0..19) and owner (-1 for a shared channel, else the client), or
 * -1 if it is not a channel of this bench. */
static int channel_slot(const uint8_t *s, size_t n, int *owner) {
    static const char shared[] = "quotes.STORM", own[] = "account.c";
    if (n == sizeof shared && memcmp(s, shared, sizeof shared - 1) == 0) {
        unsigned k = (unsigned)(s[n - 1] - '0');
        if (k >= NSHARED) return -1;
        *owner = -1;
        return (int)k;
    }
    if (n < sizeof own - 1 || memcmp(s, own, sizeof own - 1) != 0) return -1;
    const uint8_t *p = s + sizeof own - 1, *e = s + n;
    int64_t i = 0;
    const uint8_t *d = p;
    while (p < e && (unsigned)(*p - '0') < 10 && p - d < 9) i = i * 10 + (*p++ - '0');
    if (p == d || p + 4 > e || p[0] != 'x' || (unsigned)(p[1] - '0') >= 4 || p[2] != '.')
        return -1;
    int j = p[1] - '0';
    p += 3;
    for (int k = 0; k < 4; k++) {
        size_t kl = strlen(KINDS[k]);
        if ((size_t)(e - p) == kl && memcmp(p, KINDS[k], kl) == 0) {
            *owner = (int)i;
            return NSHARED + 4 * j + k;
        }
    }
    return -1;
}

/* Client c's slot of a channel name, or -1 if the channel is not one of its own. */
static int slot_of(const client *c, const uint8_t *s, size_t n) {
    int owner;
    int j = channel_slot(s, n, &owner);
    if (j < 0 || (owner >= 0 && owner != (int)(c - cl))) return -1;
    return j;
}

/* --- timers (a binary heap) ------------------------------------------------------------- */

typedef struct {
    int64_t when; /* monotonic ns */
    int client;
    int slot;     /* -1: a connection attempt; else resubscribe that channel */
    uint32_t gen; /* the client's gen when set: fires only if it is still the same */
} timer;

static timer *heap;
static size_t nheap, capheap;

static void timer_add(client *c, double delay, int slot) {
    if (nheap == capheap) {
        capheap = capheap ? capheap * 2 : 1024;
        heap = xrealloc(heap, capheap * sizeof *heap);
    }
    timer t = {clock_ns(CLOCK_MONOTONIC) + (int64_t)(delay * 1e9), (int)(c - cl), slot, c->gen};
    size_t i = nheap++;
    while (i > 0 && heap[(i - 1) / 2].when > t.when) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = t;
}

static timer timer_pop(void) {
    timer top = heap[0], last = heap[--nheap];
    size_t i = 0;
    for (;;) {
        size_t k = 2 * i + 1;
        if (k >= nheap) break;
        if (k + 1 < nheap && heap[k + 1].when < heap[k].when) k++;
        if (heap[k].when >= last.when) break;
        heap[i] = heap[k];
        i = k;
    }
    if (nheap) heap[i] = last;
    return top;
}

/* --- connections ------------------------------------------------------------------------ */

/* An epoll event's tag: the client and its gen, so that an event of a connection closed
 * earlier in the same batch never reaches the client's next one. */
static inline uint64_t tag(const client *c) { return (uint64_t)c->gen << 32 | (uint64_t)(c - cl); }

static void set_events(client *c, bool out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u64 = tag(c)};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0) c->want_out = out;
}

/* Close the socket (with a RST if `reset`); the caller counted why. */
static void close_conn(client *c, bool reset) {
    if (c->state == IDLE) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (reset) {
        struct linger lg = {1, 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);
    n_open--;
    c->fd = -1;
    c->state = IDLE;
    c->want_out = false;
    free(c->in), free(c->out);
    c->in = c->out = NULL;
    c->nin = c->capin = c->nout = c->capout = 0;
}

/* The connection's subscriptions are gone (Python's reset()): pending retries too. */
static void reset(client *c) {
    c->live = 0;
    memset(c->req, 0, sizeof c->req);
    c->gen++;
}

static void start_attempt(client *c);

/* A connection that never opened: try again after 0.1-1 s. */
static void conn_failed(client *c) {
    t_conn_failures++;
    close_conn(c, false);
    c->gen++;
    if (!stopping) timer_add(c, uniform(0.1, 1.0), -1);
}

/* An open connection ended by the server or the network. */
static void lost(client *c) {
    if (c->state != OPEN) {
        conn_failed(c);
        return;
    }
    t_disconnects++;
    close_conn(c, false);
    if (!c->done && c->live != ALL && !stopping) { /* dropped during its recovery */
        reset(c);
        c->fixed_port = -1;
        start_attempt(c);
    }
}

static void send_raw(client *c, const uint8_t *p, size_t n) {
    if (c->state == IDLE) return;
    if (c->nout == 0) {
        ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                lost(c);
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
            lost(c);
            return;
        }
        memmove(c->out, c->out + k, c->nout - (size_t)k);
        c->nout -= (size_t)k;
    }
    set_events(c, false);
}

/* A masked client frame of `n` payload bytes at f (room for n + 14); returns its length. */
static size_t put_frame(uint8_t *f, int opcode, const void *payload, size_t n) {
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
    return h + n;
}

static void send_frame(client *c, int opcode, const void *payload, size_t n) {
    uint8_t buf[16 + 1024], *f = n <= 1024 ? buf : xrealloc(NULL, n + 16);
    send_raw(c, f, put_frame(f, opcode, payload, n));
    if (f != buf) free(f);
}

static void send_text(client *c, const char *text) {
    if (c->state == OPEN) send_frame(c, 1, text, strlen(text));
}

/* A subscribe request for channel j (with recover once it has a position) as a frame at f. */
static size_t put_subscribe(client *c, int j, uint8_t *f) {
    char name[96], text[300];
    channel_name(name, sizeof name, (int)(c - cl), j);
    c->req[j] = ++c->ids;
    int n;
    if (c->known >> j & 1)
        n = snprintf(text, sizeof text,
                     "{\"type\":\"subscribe\",\"id\":%u,\"channel\":\"%s\","
                     "\"recover\":{\"offset\":%lld,\"epoch\":\"%s\"}}",
                     c->req[j], name, (long long)c->pos[j].offset, c->pos[j].epoch);
    else
        n = snprintf(text, sizeof text, "{\"type\":\"subscribe\",\"id\":%u,\"channel\":\"%s\"}",
                     c->req[j], name);
    return put_frame(f, 1, text, (size_t)n);
}

/* Every channel's subscribe in one write (as a browser's leave in one segment). */
static void subscribe_all(client *c) {
    uint8_t buf[NCH * 320];
    size_t n = 0;
    for (int j = 0; j < NCH; j++) n += put_subscribe(c, j, buf + n);
    send_raw(c, buf, n);
}

static void subscribe_one(client *c, int j) {
    uint8_t buf[320];
    send_raw(c, buf, put_subscribe(c, j, buf));
}

/* The client has every channel subscribed on its connection. */
static void on_back(client *c, int64_t now) {
    c->done = true;
    c->back_ns = now;
    n_back++;
    if (c->inflight) {
        c->inflight = false;
        n_inflight--;
    }
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


typedef struct {
    const uint8_t *start, *end; /* the message is [start, end) */
    const uint8_t *type, *channel, *epoch, *delivery, *code;
    size_t type_len, channel_len, epoch_len, delivery_len, code_len;
    int64_t id, offset, retry_after_ms;
    bool has_id, has_offset, has_retry, recovered;
} msg;

#define KEY(s) (k_len == sizeof(s) - 1 && memcmp(k, s, sizeof(s) - 1) == 0)
#define IS(field, s) (m->field##_len == sizeof(s) - 1 && memcmp(m->field, s, sizeof(s) - 1) == 0)

#define PUB_HEAD "{\"type\":\"pub\",\"channel\":\""
#define OFFSET_KEY "\",\"offset\":"

/* A pub as the edge writes it (common/protocol.py pub_json: channel and offset first, no
 * quote in a channel name); NULL for anything else, which takes the general path. */
static const uint8_t *scan_pub_fast(const uint8_t *p, const uint8_t *e, msg *m) {
    if ((size_t)(e - p) < sizeof PUB_HEAD + sizeof OFFSET_KEY ||
        memcmp(p, PUB_HEAD, sizeof PUB_HEAD - 1) != 0)
        return NULL;
    const uint8_t *ch = p + sizeof PUB_HEAD - 1, *q = memchr(ch, '"', (size_t)(e - ch));
    if (!q || (size_t)(e - q) < sizeof OFFSET_KEY || memcmp(q, OFFSET_KEY, sizeof OFFSET_KEY - 1) != 0)
        return NULL;
    m->channel = ch, m->channel_len = (size_t)(q - ch);
    q = parse_int(q + sizeof OFFSET_KEY - 1, e, &m->offset);
    if (!q || !(q = close_container(q, e, 1))) return NULL; /* the rest: key, data */
    m->type = p + 9, m->type_len = 3;
    m->has_offset = true;
    return q;
}

/* An integer value if it is one (the key's value is skipped otherwise). */
static const uint8_t *int_or_skip(const uint8_t *p, const uint8_t *e, int64_t *v, bool *has) {
    const uint8_t *q = *p >= '0' && *p <= '9' ? parse_int(p, e, v) : NULL;
    if (q) {
        *has = true;
        return q;
    }
    return skip_value(p, e);
}

/* Any message object at p ('{'): its top-level keys in any order. */
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
        const uint8_t **str = NULL;
        size_t *str_len = NULL;
        if (KEY("type")) str = &m->type, str_len = &m->type_len;
        else if (KEY("channel")) str = &m->channel, str_len = &m->channel_len;
        else if (KEY("epoch")) str = &m->epoch, str_len = &m->epoch_len;
        else if (KEY("delivery")) str = &m->delivery, str_len = &m->delivery_len;
        else if (KEY("code")) str = &m->code, str_len = &m->code_len;
        if (str && *p == '"') {
            p = skip_string(p, e);
            if (!p) return NULL;
            *str = v + 1, *str_len = (size_t)(p - 1 - *str);
        } else if (KEY("id")) {
            p = int_or_skip(p, e, &m->id, &m->has_id);
        } else if (KEY("offset")) {
            p = int_or_skip(p, e, &m->offset, &m->has_offset);
        } else if (KEY("retry_after_ms")) {
            p = int_or_skip(p, e, &m->retry_after_ms, &m->has_retry);
        } else if (KEY("recovered")) {
            m->recovered = (size_t)(e - p) >= 4 && memcmp(p, "true", 4) == 0;
            p = skip_value(p, e);
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

static const uint8_t *scan_message(const uint8_t *p, const uint8_t *e, msg *m) {
    memset(m, 0, sizeof *m);
    m->start = p;
    const uint8_t *r = scan_pub_fast(p, e, m);
    if (r) return r;
    memset(m, 0, sizeof *m);
    m->start = p;
    return scan_object(p, e, m);
}

/* A publication of channel j: checked against the position (gap, duplicate) and taken. */
static void on_pub(client *c, int j, int64_t offset) {
    uint32_t bit = 1u << j;
    if (!(c->live & bit) || !(c->known & bit)) return;
    int64_t last = c->pos[j].offset;
    if (offset <= last) {
        t_dups++;
        return;
    }
    t_pubs++;
    if (offset != last + 1) {
        if (c->lossy & bit) t_conflated += (uint64_t)(offset - last - 1);
        else t_gaps += (uint64_t)(offset - last - 1);
    }
    c->pos[j].offset = offset;
}

static void set_position(client *c, int j, const msg *m) {
    c->pos[j].offset = m->offset;
    size_t n = m->epoch_len < EPOCH_MAX - 1 ? m->epoch_len : EPOCH_MAX - 1;
    if (m->epoch_len >= EPOCH_MAX) error_sample("an epoch longer than %d bytes", EPOCH_MAX - 1);
    memcpy(c->pos[j].epoch, m->epoch, n);
    c->pos[j].epoch[n] = 0;
    c->known |= 1u << j;
}

static bool same_epoch(const client *c, int j, const msg *m) {
    return m->epoch && strlen(c->pos[j].epoch) == m->epoch_len &&
           memcmp(c->pos[j].epoch, m->epoch, m->epoch_len) == 0;
}

static void message_error(client *c, const msg *m, const char *why) {
    int len = m->end - m->start > 200 ? 200 : (int)(m->end - m->start);
    error_sample("client %d: %s: %.*s", (int)(c - cl), why, len, (const char *)m->start);
}

/* The slot whose pending subscribe has id `id`, or -1. */
static int slot_of_request(const client *c, const msg *m) {
    if (!m->has_id || m->id <= 0) return -1;
    for (int j = 0; j < NCH; j++)
        if (c->req[j] == (uint64_t)m->id) return j;
    return -1;
}

static void on_message(client *c, const msg *m, int64_t now) {
    if (IS(type, "pub")) {
        int j = m->has_offset ? slot_of(c, m->channel, m->channel_len) : -1;
        if (j >= 0) on_pub(c, j, m->offset);
    } else if (IS(type, "ping")) {
        send_text(c, "{\"type\":\"pong\"}");
    } else if (IS(type, "connected")) {
        c->conn_ns = now;
        subscribe_all(c);
    } else if (IS(type, "subscribed")) {
        int j = slot_of_request(c, m);
        if (j < 0 || !m->has_offset || !m->epoch) {
            message_error(c, m, j < 0 ? "a reply to no pending subscribe" : "a bad reply");
            return;
        }
        c->req[j] = 0;
        uint32_t bit = 1u << j;
        if ((c->known & bit) && m->recovered && same_epoch(c, j, m)) {
            t_recovered++;
        } else {
            if (c->known & bit) t_resynced++;
            set_position(c, j, m);
        }
        c->live |= bit;
        if (!m->delivery || IS(delivery, "all")) c->lossy &= ~bit;
        else c->lossy |= bit;
        if (c->live == ALL && !c->done) on_back(c, now);
    } else if (IS(type, "resync")) {
        int j = m->channel ? slot_of(c, m->channel, m->channel_len) : -1;
        if (j < 0 || !m->has_offset || !m->epoch) {
            message_error(c, m, "a resync not understood");
            return;
        }
        t_resynced++;
        set_position(c, j, m);
    } else if (IS(type, "gap")) {
        t_gap_notices++;
    } else if (IS(type, "error")) {
        int j = slot_of_request(c, m);
        if (j >= 0) c->req[j] = 0; /* answered: Python's requests.pop */
        if (j < 0 || !(IS(code, "unavailable") || IS(code, "internal"))) {
            message_error(c, m, "error");
            return;
        }
        t_deferred++;
        double delay = m->has_retry && m->retry_after_ms > 0
                           ? (double)m->retry_after_ms / 1000 * (1 + rand01() / 2)
                           : uniform(1.0, 5.0);
        timer_add(c, delay, j); /* the same connection only: gen */
    }
    /* pong, unsubscribed, history, ...: nothing to do */
}

/* A text frame: one message or an array of them. */
static void on_text(client *c, const uint8_t *p, size_t n, int64_t now) {
    const uint8_t *e = p + n, *q = ws(p, e);
    msg m;
    uint32_t gen = c->gen;
    if (q < e && *q == '[') {
        q = ws(q + 1, e);
        if (q < e && *q == ']') return;
        while (q < e) {
            const uint8_t *r = scan_message(q, e, &m);
            if (!r) break;
            m.end = r;
            on_message(c, &m, now);
            if (c->gen != gen || c->state != OPEN) return; /* the connection is gone */
            q = ws(r, e);
            if (q < e && *q == ',') {
                q = ws(q + 1, e);
                continue;
            }
            if (q < e && *q == ']' && ws(q + 1, e) == e) return;
            break;
        }
    } else {
        const uint8_t *r = scan_message(q, e, &m);
        m.end = r;
        if (r && ws(r, e) == e) {
            on_message(c, &m, now);
            return;
        }
    }
    char shown[121];
    size_t k = n < 120 ? n : 120;
    for (size_t i = 0; i < k; i++) shown[i] = p[i] >= 32 && p[i] < 127 ? (char)p[i] : '?';
    shown[k] = 0;
    error_sample("client %d: a text frame that does not scan (%zu bytes): %s", (int)(c - cl), n,
                 shown);
}

/* Frames in buf[0..n): returns the bytes consumed (complete frames). The connection may be
 * gone when it returns (then c->state is not OPEN or c->gen changed). */
static size_t on_frames(client *c, const uint8_t *buf, size_t n, int64_t now) {
    size_t pos = 0;
    uint32_t gen = c->gen;
    while (n - pos >= 2) {
        uint8_t b0 = buf[pos], b1 = buf[pos + 1];
        if (b1 & 0x80) {
            error_sample("client %d: masked frame from the server", (int)(c - cl));
            lost(c);
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
                error_sample("client %d: frame length %llu", (int)(c - cl), (unsigned long long)len);
                lost(c);
                return pos;
            }
        }
        if (n - pos - h < len) break;
        const uint8_t *payload = buf + pos + h;
        int opcode = b0 & 0x0F;
        if ((b0 & 0x70) || !(b0 & 0x80) || opcode == 0 || opcode == 2) {
            error_sample("client %d: unexpected frame: first byte 0x%02x", (int)(c - cl), b0);
            lost(c);
            return pos;
        }
        pos += h + (size_t)len;
        if (opcode == 1) {
            on_text(c, payload, (size_t)len, now);
        } else if (opcode == 8) { /* echo the close, then the connection is over */
            if (len >= 2) send_frame(c, 8, payload, 2);
            else send_frame(c, 8, "", 0);
            if (c->gen == gen && c->state == OPEN) lost(c);
            return pos;
        } else if (opcode == 9) {
            send_frame(c, 10, payload, (size_t)len);
        } else if (opcode != 10) {
            error_sample("client %d: unknown opcode %d", (int)(c - cl), opcode);
            lost(c);
            return pos;
        }
        if (c->gen != gen || c->state != OPEN) return pos;
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


/* A header's value (trimmed) into out, or false if absent. */
static bool header_value(const char *head, const char *name, char *out, size_t cap) {
    size_t nl = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        if (strncasecmp(line, name, nl) != 0 || line[nl] != ':') continue;
        const char *v = line + nl + 1, *end = strstr(v, "\r\n");
        while (*v == ' ' || *v == '\t') v++;
        size_t vl = (size_t)(end - v);
        while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) vl--;
        if (vl >= cap) vl = cap - 1;
        memcpy(out, v, vl);
        out[vl] = 0;
        return true;
    }
    return false;
}

/* The HTTP response in c->in; false if the connection is not open (yet, or any more). */
static bool on_handshake(client *c) {
    uint8_t *end = memmem(c->in, c->nin, "\r\n\r\n", 4);
    if (!end) {
        if (c->nin > 65536) {
            error_sample("client %d: handshake response too long", (int)(c - cl));
            conn_failed(c);
        }
        return false;
    }
    size_t hl = (size_t)(end - c->in) + 4;
    char *head = xrealloc(NULL, hl + 1);
    memcpy(head, c->in, hl);
    head[hl] = 0;
    if (strncmp(head, "HTTP/1.1 ", 9) == 0 && strncmp(head + 9, "101", 3) != 0) {
        /* refused (a 503): come back after its Retry-After, plus up to half again */
        char after[32];
        double delay = 1.0;
        if (header_value(head, "retry-after", after, sizeof after) && after[0]) {
            bool digits = true;
            for (const char *s = after; *s; s++) digits = digits && isdigit((unsigned char)*s);
            if (digits) delay = atof(after);
        }
        free(head);
        t_refused++;
        close_conn(c, false);
        c->gen++;
        timer_add(c, delay + uniform(0, delay / 2), -1);
        return false;
    }
    const char *why = NULL;
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) why = "not an HTTP/1.1 response";
    else if (!header_is(head, "upgrade", "websocket", true)) why = "no Upgrade: websocket";
    else if (!header_is(head, "connection", "upgrade", true)) why = "no Connection: upgrade";
    else if (!header_is(head, "sec-websocket-accept", c->accept, false)) why = "bad Sec-WebSocket-Accept";
    else if (!header_is(head, "sec-websocket-protocol", "fanout.json", false)) why = "subprotocol fanout.json not accepted";
    else if (has_header(head, "sec-websocket-extensions")) why = "an extension we did not offer";
    if (why) {
        char *eol = strstr(head, "\r\n");
        if (eol) *eol = 0;
        error_sample("client %d: handshake failed: %s (%.80s)", (int)(c - cl), why, head);
        free(head);
        conn_failed(c);
        return false;
    }
    free(head);
    memmove(c->in, c->in + hl, c->nin - hl);
    c->nin -= hl;
    c->state = OPEN;
    c->open_ns = clock_ns(CLOCK_MONOTONIC);
    send_text(c, "{\"type\":\"connect\",\"id\":0,\"name\":\"storm\"}");
    return c->state == OPEN;
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
        lost(c);
        return;
    }
    if (k < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) lost(c);
        return;
    }
    size_t n = c->nin + (size_t)k;
    int64_t now = clock_ns(CLOCK_MONOTONIC);
    if (c->state == HANDSHAKE) {
        keep(c, rbuf, n);
        if (!on_handshake(c)) return;
        if (c->nin == 0) return;
        n = c->nin;
        memcpy(rbuf, c->in, n);
    }
    uint32_t gen = c->gen;
    size_t used = on_frames(c, rbuf, n, now);
    if (c->gen == gen && c->state == OPEN) keep(c, rbuf + used, n - used);
}

/* A connection attempt: to this loop's edge, or a random one. */
static void start_attempt(client *c) {
    c->gen++;
    int port = c->fixed_port >= 0 ? c->fixed_port : (int)(rng() >> 63);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_sample("client %d: socket: %s", (int)(c - cl), strerror(errno));
        t_conn_failures++;
        timer_add(c, uniform(0.1, 1.0), -1);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = CONNECTING; /* no deadline of ours: the kernel's SYN retries, as asyncio's */
    n_open++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = tag(c)};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    c->want_out = true;
    if (connect(fd, (struct sockaddr *)&addrs[port], sizeof addrs[port]) < 0 && errno != EINPROGRESS)
        conn_failed(c);
}

static void on_connected(client *c) { /* the TCP connect finished */
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        conn_failed(c);
        return;
    }
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    int port = getpeername(c->fd, (struct sockaddr *)&peer, &plen) == 0 ? ntohs(peer.sin_port) : 0;
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
                     "User-Agent: stormload\r\n\r\n",
                     opt.path, opt.host, port, key);
    c->state = HANDSHAKE;
    c->deadline = clock_ns(CLOCK_MONOTONIC) + (int64_t)(CONNECT_TIMEOUT * 1e9);
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

/* The counters as JSON members (no braces) at buf. */
static size_t put_counters(char *buf, size_t cap) {
    size_t o = 0;
#define PUT(...) o += (size_t)snprintf(buf + o, o < cap ? cap - o : 0, __VA_ARGS__)
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    PUT("\"pubs\":%llu,\"recovered\":%llu,\"resynced\":%llu,\"gaps\":%llu,\"dups\":%llu,\"conflated\":%llu,"
        "\"deferred\":%llu,\"refused\":%llu,\"conn_failures\":%llu,\"disconnects\":%llu,"
        "\"gap_notices\":%llu,\"errors\":%llu,\"open\":%d,",
        (unsigned long long)t_pubs, (unsigned long long)t_recovered,
        (unsigned long long)t_resynced,
        (unsigned long long)t_gaps, (unsigned long long)t_dups, (unsigned long long)t_conflated,
        (unsigned long long)t_deferred, (unsigned long long)t_refused,
        (unsigned long long)t_conn_failures, (unsigned long long)t_disconnects,
        (unsigned long long)t_gap_notices, (unsigned long long)t_errors, n_open);
    PUT("\"error_samples\":[");
    for (int i = 0; i < n_samples; i++) {
        char s[700];
        json_string(s, sizeof s, samples[i]);
        PUT("%s%s", i ? "," : "", s);
    }
    PUT("],\"cpu_user\":%.3f,\"cpu_sys\":%.3f",
        (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
        (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
#undef PUT
    return o;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The storm's answer: the times back (statistics.median's p50, as the Python bench). */
static void storm_reply(bool timed_out) {
    static char buf[8192];
    int64_t *t = xrealloc(NULL, sizeof *t * (size_t)(n_back ? n_back : 1));
    int k = 0;
    for (int i = 0; i < opt.clients; i++)
        if (cl[i].done) t[k++] = cl[i].back_ns - phase_start;
    qsort(t, (size_t)k, sizeof *t, cmp_i64);
    size_t o = (size_t)snprintf(buf, sizeof buf, "\"clients\":%d,\"back\":%d,\"timed_out\":%s,",
                                opt.clients, k, timed_out ? "true" : "false");
    if (k) {
        double p50 = k % 2 ? (double)t[k / 2] : ((double)t[k / 2 - 1] + (double)t[k / 2]) / 2;
        o += (size_t)snprintf(buf + o, sizeof buf - o, "\"max\":%.3f,\"p50\":%.3f,\"p90\":%.3f,",
                              (double)t[k - 1] / 1e9, p50 / 1e9, (double)t[(int)(0.9 * k)] / 1e9);
    } else {
        o += (size_t)snprintf(buf + o, sizeof buf - o, "\"max\":null,\"p50\":null,\"p90\":null,");
    }
    /* Where the clients' time went: the p50 and p90 of the upgrade's 101 and of the
     * `connected` reply, from the abort (the clients back). */
    static const char *const what[2] = {"upgraded", "connected"};
    for (int w = 0; w < 2 && k; w++) {
        int m = 0;
        for (int i = 0; i < opt.clients; i++)
            if (cl[i].done) t[m++] = (w ? cl[i].conn_ns : cl[i].open_ns) - phase_start;
        qsort(t, (size_t)m, sizeof *t, cmp_i64);
        o += (size_t)snprintf(buf + o, sizeof buf - o, "\"%s_p50\":%.3f,\"%s_p90\":%.3f,",
                              what[w], (double)t[m / 2] / 1e9, what[w],
                              (double)t[(int)(0.9 * m)] / 1e9);
    }
    put_counters(buf + o, sizeof buf - o);
    free(t);
    reply("{%s}", buf);
}

/* The check: (client, channel) pairs whose position is below the published top. */
typedef struct {
    int owner, slot; /* owner -1: a shared channel (every client) */
    int64_t top;
} top;

static top *tops;
static int ntops;
static int64_t check_pairs;

static int64_t behind_now(void) {
    int64_t behind = 0;
    for (int t = 0; t < ntops; t++) {
        int j = tops[t].slot;
        int64_t v = tops[t].top;
        if (tops[t].owner >= 0) {
            client *c = &cl[tops[t].owner];
            behind += ((c->known >> j & 1) ? c->pos[j].offset : 0) < v;
            continue;
        }
        for (int i = 0; i < opt.clients; i++)
            behind += ((cl[i].known >> j & 1) ? cl[i].pos[j].offset : 0) < v;
    }
    return behind;
}

static bool load_tops(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        reply("error cannot open %s: %s", path, strerror(errno));
        return false;
    }
    ntops = 0;
    check_pairs = 0;
    int cap = 0;
    char name[256];
    long long v;
    while (fscanf(f, "%255s %lld", name, &v) == 2) {
        int owner;
        int j = channel_slot((const uint8_t *)name, strlen(name), &owner);
        if (j < 0 || owner >= opt.clients) continue; /* not a channel of these clients */
        if (ntops == cap) {
            cap = cap ? cap * 2 : 1024;
            tops = xrealloc(tops, sizeof *tops * (size_t)cap);
        }
        tops[ntops++] = (top){owner, j, v};
        check_pairs += owner >= 0 ? 1 : opt.clients;
    }
    fclose(f);
    return true;
}

static void start_storm(void) {
    stopping = false;
    phase_start = clock_ns(CLOCK_MONOTONIC);
    for (int i = 0; i < opt.clients; i++) { /* every connection aborted at once */
        client *c = &cl[i];
        close_conn(c, true);
        reset(c);
        c->done = false;
        c->inflight = false;
    }
    n_back = 0;
    phase = P_STORM;
    phase_deadline = phase_start + (int64_t)(opt.timeout * 1e9);
    for (int i = 0; i < opt.clients; i++) { /* ... and every client back at once */
        cl[i].fixed_port = -1;
        start_attempt(&cl[i]);
    }
}

static void quit(void) {
    stopping = true;
    for (int i = 0; i < opt.clients; i++) close_conn(&cl[i], true);
    reply("bye");
    exit(0);
}

static void command(char *line) {
    char *argv[4] = {0};
    int argc = 0;
    for (char *t = strtok(line, " \t\r"); t && argc < 4; t = strtok(NULL, " \t\r")) argv[argc++] = t;
    if (argc == 0) {
        reply("error empty command");
    } else if (phase == P_INITIAL || phase == P_STORM || phase == P_CHECK) {
        reply("error busy (the initial phase, a storm or a check is running)");
    } else if (strcmp(argv[0], "storm") == 0 && argc == 1) {
        start_storm();
    } else if (strcmp(argv[0], "check") == 0 && (argc == 2 || argc == 3)) {
        double wait = argc == 3 ? atof(argv[2]) : 60.0;
        if (!load_tops(argv[1])) return;
        phase = P_CHECK;
        phase_start = clock_ns(CLOCK_MONOTONIC);
        phase_deadline = phase_start + (int64_t)(wait * 1e9);
    } else if (strcmp(argv[0], "stats") == 0) {
        static char buf[8192];
        put_counters(buf, sizeof buf);
        reply("{%s}", buf);
    } else if (strcmp(argv[0], "quit") == 0) {
        quit();
    } else {
        reply("error unknown command %s (storm, check <file> [s], stats, quit)", argv[0]);
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
    fputs("usage: stormload --ports A,B --clients N [--host 127.0.0.1] [--path /ws]\n"
          "                 [--concurrency 200] [--timeout 60] [--seed 1]\n"
          "stdin commands: storm | check <file> [s] | stats | quit\n",
          stderr);
    exit(2);
}

/* Periodic work: connection deadlines, the phase's end. */
static void tick(int64_t now) {
    static int64_t next, next_check;
    if (now >= next) {
        next = now + 100000000;
        for (int i = 0; i < opt.clients; i++) {
            client *c = &cl[i];
            if (c->state == HANDSHAKE && now > c->deadline) conn_failed(c);
            if (phase == P_INITIAL && c->inflight && now - c->started > (int64_t)(INITIAL_TIMEOUT * 1e9)) {
                reply("error client %d not subscribed to its %d channels within %.0f s: %s", i,
                      NCH, INITIAL_TIMEOUT, n_samples ? samples[0] : "no error seen");
                phase = P_IDLE;
            }
        }
    }
    if (phase == P_INITIAL && n_back == opt.clients) {
        phase = P_IDLE;
        reply("ready %d", n_back);
    } else if (phase == P_STORM && (n_back == opt.clients || now >= phase_deadline)) {
        phase = P_IDLE;
        storm_reply(n_back < opt.clients);
    } else if (phase == P_CHECK && now >= next_check) {
        next_check = now + 50000000;
        int64_t behind = behind_now();
        if (behind == 0 || now >= phase_deadline) {
            phase = P_IDLE;
            reply("{\"behind\":%lld,\"pairs\":%lld,\"waited\":%.3f}", (long long)behind,
                  (long long)check_pairs, (double)(now - phase_start) / 1e9);
        }
    }
}

int main(int argc, char **argv) {
    static const struct option longs[] = {
        {"host", 1, 0, 'h'},    {"ports", 1, 0, 'p'},       {"path", 1, 0, 'P'},
        {"clients", 1, 0, 'n'}, {"concurrency", 1, 0, 'k'}, {"timeout", 1, 0, 't'},
        {"seed", 1, 0, 's'},    {0, 0, 0, 0},
    };
    for (int ch; (ch = getopt_long(argc, argv, "", longs, NULL)) != -1;) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p':
            if (sscanf(optarg, "%d,%d", &opt.ports[0], &opt.ports[1]) != 2) usage();
            break;
        case 'P': opt.path = optarg; break;
        case 'n': opt.clients = atoi(optarg); break;
        case 'k': opt.concurrency = atoi(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 's': opt.seed = strtoull(optarg, NULL, 10); break;
        default: usage();
        }
    }
    for (int p = 0; p < 2; p++)
        if (opt.ports[p] <= 0 || opt.ports[p] > 65535) usage();
    if (opt.clients <= 0 || opt.concurrency <= 0 || opt.timeout <= 0) usage();
    if (strlen(opt.path) > 512) die("--path too long");
    for (const char *t = "\"{}[]"; *t; t++) structural[(uint8_t)*t] = 1;
    for (int p = 0; p < 2; p++) {
        memset(&addrs[p], 0, sizeof addrs[p]);
        addrs[p].sin_family = AF_INET;
        addrs[p].sin_port = htons((uint16_t)opt.ports[p]);
        if (inet_pton(AF_INET, opt.host, &addrs[p].sin_addr) != 1)
            die("--host: an IPv4 address, got %s", opt.host);
    }

    prctl(PR_SET_PDEATHSIG, SIGKILL); /* die with the orchestrator (it also closes stdin) */
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl; /* a descriptor per client, and some: no limit surprises */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)opt.clients + 64)
        die("RLIMIT_NOFILE is %llu: too few descriptors for %d clients",
            (unsigned long long)rl.rlim_cur, opt.clients);
    rng_state = opt.seed * 0x9E3779B97F4A7C15ULL + 0x2545F4914F6CDD1DULL;
    if (!rng_state) rng_state = 1;
    cl = calloc((size_t)opt.clients, sizeof *cl);
    if (!cl) die("out of memory");
    for (int i = 0; i < opt.clients; i++) cl[i].fd = -1;
    rcap = 256 * 1024;
    rbuf = xrealloc(NULL, rcap);

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1: %s", strerror(errno));
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev) < 0) die("epoll_ctl(stdin): %s", strerror(errno));

    enum { MAXEV = 256 };
    struct epoll_event evs[MAXEV];
    int next = 0; /* the initial phase's next client */
    for (;;) {
        int64_t now = clock_ns(CLOCK_MONOTONIC);
        while (phase == P_INITIAL && next < opt.clients && n_inflight < opt.concurrency) {
            client *c = &cl[next];
            c->fixed_port = next % 2;
            c->inflight = true;
            c->started = now;
            n_inflight++;
            next++;
            start_attempt(c);
        }
        while (nheap && heap[0].when <= now) {
            timer t = timer_pop();
            client *c = &cl[t.client];
            if (t.gen != c->gen || stopping) continue; /* a reset since: stale */
            if (t.slot < 0) start_attempt(c);
            else if (c->state == OPEN) subscribe_one(c, t.slot);
        }
        tick(now);
        int wait = 50;
        if (nheap) {
            int64_t ms = (heap[0].when - now) / 1000000 + 1;
            if (ms < wait) wait = (int)(ms < 0 ? 0 : ms);
        }
        int k = epoll_wait(ep, evs, MAXEV, wait);
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
            client *c = &cl[(uint32_t)id];
            uint32_t e = evs[i].events;
            if (c->state == IDLE || (uint32_t)(id >> 32) != c->gen) continue; /* stale */
            if (c->state == CONNECTING) {
                if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
                continue;
            }
            uint32_t gen = c->gen;
            if ((e & EPOLLOUT) && c->nout) flush_out(c);
            if (c->gen == gen && c->state != IDLE && (e & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                on_readable(c);
        }
        tick(clock_ns(CLOCK_MONOTONIC));
    }
}
