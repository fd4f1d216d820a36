/*
 * The fault-injection test plugin in C: echoes, or misbehaves on command.
 *
 * The same plugin as the Rust one in plugins/fault (see its crate doc),
 * written against the shipped header only. Crash and hang isolation tests
 * start the real server with it, put it under normal load (command 1, or
 * any command not listed, echoes) and send exactly one bad request, chosen
 * by its HSP/1 command number (req->command). The numbers are mirrored in
 * halfsync_testkit::fault. Plugin name "c_fault"; testkit::c_fault_plugin()
 * builds it into target/<profile>/test-plugins/libfault.so.
 *
 *   cmd  name             behaviour
 *    1   ECHO             status 0, payload unchanged; also every command
 *                         not listed here (PLUGIN_ERROR if it does not fit)
 *   10   SEGV             write through a NULL pointer: dies of SIGSEGV
 *   11   ABORT            abort(): dies of SIGABRT
 *   12   ERROR            PLUGIN_ERROR "fault: requested error" (the Rust
 *                         plugin panics here; its SDK sends PLUGIN_ERROR)
 *   13   ESCAPING PANIC   raise(SIGABRT): dies of SIGABRT (the Rust plugin
 *                         panics where it cannot unwind, and aborts)
 *   14   EXIT             exit(0) in the middle of the request
 *   15   HANG             never returns (sleeps 1 s at a time: no CPU)
 *   16   SLOW             sleeps for the big-endian u32 in payload bytes
 *                         0..4 in ms (default 100 if shorter), then echoes
 *   17   LEAK             allocates the big-endian u32 in payload bytes 0..4
 *                         in MiB (default 16), writes one byte per 4 KiB so
 *                         it counts in RSS, never frees it, then echoes;
 *                         PLUGIN_ERROR "fault: cannot allocate N MiB" if
 *                         malloc fails
 *   18   SCRIBBLE         corrupts this worker's slot (below); PLUGIN_ERROR
 *                         "fault: no halfsync mapping" if it has none
 *   19   SIGBUS           touches a shared mapping of a memfd truncated
 *                         under it: dies of SIGBUS
 *   20   SIGKILL          kill(getpid(), SIGKILL), as the OOM killer would
 *   21   REPLY-TOO-BIG    writes capacity + 1 bytes; the write fails, so:
 *                         PLUGIN_ERROR "fault: reply too big" (cut to the
 *                         capacity)
 *   22   RESERVED-STATUS  returns status 4, which the server reserves: the
 *                         worker sends PLUGIN_ERROR "plugin returned
 *                         reserved status 4" instead
 *   23   CUSTOM           status 150, payload "custom"
 *   24   PREFIXED         the payload's length (big-endian u32), then the
 *                         payload: reserves the 4 bytes first, writes the
 *                         payload in 4 KiB pieces, and fills the 4 bytes
 *                         last, through the pointer reserve returned
 *   27   WHOAMI           "group=NAME worker=N" from hs_host ("-" for what
 *                         it does not say)
 *
 * The fatal commands first log a warning through the host ("fault: <what>
 * (request id N)").
 *
 * SCRIBBLE finds the slot by reading /proc/self/maps for a line whose path
 * contains "memfd:halfsync-" (a worker maps exactly one: its own slot).
 * Layout: [0, 4096) control block, then the request ring (4096-byte header
 * page, then `capacity` data bytes), then the reply ring (4096-byte header
 * page, then `capacity` data bytes); capacity = (len - 4096) / 2 - 4096.
 * The first payload byte (0 if the payload is empty) picks the variant:
 *   0  the first 128 bytes of the reply ring header (producer tail at 0,
 *      consumer head at 64) become 0xA5, then HANG;
 *   1  the first 128 bytes of the control block become 0xA5, then HANG;
 *   2  as 0, then echo and return normally;
 *   3  the whole reply ring data area becomes random bytes, then HANG;
 *   4  the running request's start time in the control block (the u64 at
 *      byte CONTROL_BUSY_SINCE_OFFSET) becomes a year from now, then HANG;
 *   other: PLUGIN_ERROR "fault: unknown scribble variant N".
 * Payload bytes 1..5, if present, are a big-endian u32 of milliseconds to
 * sleep before scribbling.
 *
 * Init reads only these `key = value` lines of its config section (TOML
 * text) and ignores every other line; they act in this order:
 *   init_delay_ms = N       sleep N ms (slow start);
 *   crash_in_init = true    die of SIGSEGV inside init;
 *   reply_prefix = "v2:"    echo replies start with it;
 *   crash_in_init_if_exists = "path"   the same, but only while that file
 *                           exists (a plugin that starts failing after the
 *                           server started);
 *   hang_in_init = true     never return from init;
 *   fail_init = "message"   fail init with that message.
 * A value of the wrong kind fails init naming the key. Otherwise init
 * succeeds and logs "fault plugin ready (group=NAME worker=N)" (info)
 * through the host.
 *
 * Build (testkit does the same):
 *
 *     cc -shared -fPIC -O2 -Wall -Wextra -Werror -std=c11 \
 *        -I plugin-api/include plugins/c/test/fault.c -o libfault.so
 */
#define _GNU_SOURCE /* memfd_create, kill, nanosleep under -std=c11 */

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "halfsync_plugin.h"

#define FAULT_ECHO 1
#define FAULT_SEGV 10
#define FAULT_ABORT 11
#define FAULT_ERROR 12
#define FAULT_ESCAPING_PANIC 13
#define FAULT_EXIT 14
#define FAULT_HANG 15
#define FAULT_SLOW 16
#define FAULT_LEAK 17
#define FAULT_SCRIBBLE 18
#define FAULT_SIGBUS 19
#define FAULT_SIGKILL 20
#define FAULT_REPLY_TOO_BIG 21
#define FAULT_RESERVED_STATUS 22
#define FAULT_CUSTOM 23
#define FAULT_PREFIXED 24
/* Rust: log through the log crate. C: echo (the default). */
#define FAULT_LOG_CRATE 26
#define FAULT_WHOAMI 27

#define FAULT_CUSTOM_STATUS 150
#define FAULT_RESERVED_STATUS_CODE 4
#define FAULT_SLOW_DEFAULT_MS 100u
#define FAULT_LEAK_DEFAULT_MIB 16u

#define SCRIBBLE_REPLY_HEADER_HANG 0
#define SCRIBBLE_CONTROL_HANG 1
#define SCRIBBLE_REPLY_HEADER_RETURN 2
#define SCRIBBLE_REPLY_DATA_HANG 3
#define SCRIBBLE_FUTURE_START_HANG 4
#define CONTROL_BUSY_SINCE_OFFSET 48

#define SLOT_MARKER "memfd:halfsync-"
#define SLOT_PAGE 4096u
#define SCRIBBLE_LEN 128u
#define SCRIBBLE_BYTE 0xA5
#define TOUCH_STRIDE 4096u

typedef struct fault_state {
    const hs_host *host;
    char prefix[256];    /* reply_prefix: written before every echo payload */
    size_t prefix_len;
    void *leaked;        /* blocks from LEAK, each linking to the previous */
    uint64_t leaked_mib;
} fault_state;

static void fault_log(const hs_host *host, int32_t level, const char *msg)
{
    if (host && host->log)
        host->log(host->ctx, level, msg, strlen(msg));
}

static void fault_warn(const fault_state *s, const char *what, const hs_request *req)
{
    char msg[128];
    snprintf(msg, sizeof msg, "fault: %s (request id %llu)", what,
             (unsigned long long)req->id);
    fault_log(s->host, HS_LOG_WARN, msg);
}

static void sleep_ms(uint64_t ms)
{
    struct timespec ts = { .tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static _Noreturn void hang(void)
{
    for (;;)
        sleep_ms(1000);
}

/* Resets sig to its default action and raises it: the fallback of the real
 * faults (a handler could catch a raised signal and return; the Rust
 * worker's runtime handles SIGSEGV and SIGBUS). */
static _Noreturn void raise_default(int sig)
{
    signal(sig, SIG_DFL);
    raise(sig);
    abort();
}

static _Noreturn void segfault(void)
{
    /* Both volatile: the compiler can neither see that the pointer is NULL
     * nor drop the store. */
    volatile int *volatile null = NULL;
    *null = 1;
    raise_default(SIGSEGV);
}

static _Noreturn void bus_error(void)
{
    int fd = memfd_create("fault-sigbus", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, SLOT_PAGE) != 0)
        raise_default(SIGBUS);
    volatile uint8_t *page = mmap(NULL, SLOT_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (page == MAP_FAILED || ftruncate(fd, 0) != 0)
        raise_default(SIGBUS);
    *page = 1; /* the file is empty now: SIGBUS */
    raise_default(SIGBUS);
}

/* Replaces the reply by as much of msg as fits; returns PLUGIN_ERROR. */
static int32_t fail(hs_reply *reply, const char *msg)
{
    size_t n = strlen(msg);
    reply->clear(reply->ctx);
    reply->write(reply->ctx, (const uint8_t *)msg, n < reply->capacity ? n : reply->capacity);
    return HS_STATUS_PLUGIN_ERROR;
}

static int32_t echo(const hs_request *req, hs_reply *reply)
{
    if (reply->write(reply->ctx, req->payload, req->payload_len) != 0)
        return fail(reply, "fault: payload does not fit in the reply");
    return HS_STATUS_OK;
}

/* The big-endian u32 in the first 4 payload bytes, or dflt. */
static uint32_t payload_u32(const hs_request *req, uint32_t dflt)
{
    const uint8_t *p = req->payload;
    if (req->payload_len < 4)
        return dflt;
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int32_t leak(fault_state *s, const hs_request *req, hs_reply *reply)
{
    uint32_t mib = payload_u32(req, FAULT_LEAK_DEFAULT_MIB);
    size_t bytes = (size_t)mib << 20;
    char msg[96];
    if (bytes == 0)
        return echo(req, reply);
    volatile uint8_t *block = malloc(bytes);
    if (!block) {
        snprintf(msg, sizeof msg, "fault: cannot allocate %lu MiB", (unsigned long)mib);
        return fail(reply, msg);
    }
    for (size_t i = 0; i < bytes; i += TOUCH_STRIDE)
        block[i] = SCRIBBLE_BYTE;
    /* Keep every block reachable (a leak, not garbage): a linked list. */
    memcpy((void *)block, &s->leaked, sizeof s->leaked);
    s->leaked = (void *)block;
    s->leaked_mib += mib;
    snprintf(msg, sizeof msg, "fault: leaked %lu MiB, %llu MiB in all", (unsigned long)mib,
             (unsigned long long)s->leaked_mib);
    fault_log(s->host, HS_LOG_DEBUG, msg);
    return echo(req, reply);
}

/* Finds the halfsync slot mapping; 0 on success. */
/* The worker maps its request ring's data read-only, which splits the slot
 * into several lines of /proc/self/maps: the slot is their union. */
static int find_slot(uintptr_t *start, size_t *len)
{
    char line[4096 + 256];
    FILE *maps = fopen("/proc/self/maps", "re");
    unsigned long min_lo = 0, max_hi = 0;
    int found = -1;
    if (!maps)
        return -1;
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        if (!strstr(line, SLOT_MARKER))
            continue;
        if (sscanf(line, "%lx-%lx", &lo, &hi) != 2 || hi <= lo)
            continue;
        if (found != 0 || lo < min_lo)
            min_lo = lo;
        if (found != 0 || hi > max_hi)
            max_hi = hi;
        found = 0;
    }
    fclose(maps);
    if (found == 0) {
        *start = (uintptr_t)min_lo;
        *len = (size_t)(max_hi - min_lo);
    }
    return found;
}

static void scribble_bytes(uintptr_t addr, size_t len, uint8_t byte)
{
    volatile uint8_t *p = (volatile uint8_t *)addr;
    for (size_t i = 0; i < len; i++)
        p[i] = byte;
}

static void scribble_random(uintptr_t addr, size_t len)
{
    volatile uint64_t *p = (volatile uint64_t *)addr;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t x = ((uint64_t)now.tv_nsec ^ (uint64_t)now.tv_sec ^ ((uint64_t)getpid() << 32)) | 1;
    for (size_t i = 0; i < len / 8; i++) {
        x ^= x >> 12; /* xorshift64* */
        x ^= x << 25;
        x ^= x >> 27;
        p[i] = x * 0x2545F4914F6CDD1DULL;
    }
}

static int32_t scribble(fault_state *s, const hs_request *req, hs_reply *reply)
{
    unsigned variant = req->payload_len > 0 ? req->payload[0] : 0;
    uintptr_t start;
    size_t len, capacity;
    char msg[96];
    if (variant > SCRIBBLE_FUTURE_START_HANG) {
        snprintf(msg, sizeof msg, "fault: unknown scribble variant %u", variant);
        return fail(reply, msg);
    }
    if (find_slot(&start, &len) != 0)
        return fail(reply, "fault: no halfsync mapping");
    if (len < SLOT_PAGE || (len - SLOT_PAGE) / 2 <= SLOT_PAGE) {
        snprintf(msg, sizeof msg, "fault: halfsync mapping of %zu bytes is too small", len);
        return fail(reply, msg);
    }
    capacity = (len - SLOT_PAGE) / 2 - SLOT_PAGE;
    /* Optional pause first: payload bytes 1..5, big-endian ms. */
    if (req->payload_len >= 5) {
        const uint8_t *p = req->payload + 1;
        sleep_ms(((unsigned long long)p[0] << 24) | ((unsigned long long)p[1] << 16) |
                 ((unsigned long long)p[2] << 8) | (unsigned long long)p[3]);
    }
    uintptr_t control = start;
    uintptr_t reply_header = start + SLOT_PAGE + SLOT_PAGE + capacity;
    uintptr_t reply_data = reply_header + SLOT_PAGE;
    snprintf(msg, sizeof msg, "scribble variant %u", variant);
    fault_warn(s, msg, req);
    switch (variant) {
    case SCRIBBLE_REPLY_HEADER_HANG:
    case SCRIBBLE_REPLY_HEADER_RETURN:
        scribble_bytes(reply_header, SCRIBBLE_LEN, SCRIBBLE_BYTE);
        break;
    case SCRIBBLE_CONTROL_HANG:
        scribble_bytes(control, SCRIBBLE_LEN, SCRIBBLE_BYTE);
        break;
    case SCRIBBLE_FUTURE_START_HANG: {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t now = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        *(volatile uint64_t *)(control + CONTROL_BUSY_SINCE_OFFSET) =
            now + 365ULL * 24 * 3600 * 1000000000ULL;
        break;
    }
    default:
        scribble_random(reply_data, capacity & ~(size_t)7);
        break;
    }
    if (variant != SCRIBBLE_REPLY_HEADER_RETURN)
        hang();
    return echo(req, reply);
}

static int32_t reply_too_big(hs_reply *reply)
{
    size_t n = reply->capacity + 1;
    uint8_t *big = n ? calloc(1, n) : NULL;
    if (!big)
        return fail(reply, "fault: cannot allocate the reply");
    int32_t rc = reply->write(reply->ctx, big, n);
    free(big);
    if (rc == -1)
        return fail(reply, "fault: reply too big");
    return HS_STATUS_OK; /* the host accepted it: a host bug, for the test to see */
}

/* Length prefix reserved first, filled last: the host must keep the
 * pointer valid however far the reply grows after it. */
static int32_t prefixed(const hs_request *req, hs_reply *reply)
{
    uint8_t *len = reply->reserve(reply->ctx, 4);
    if (!len)
        return fail(reply, "fault: payload does not fit in the reply");
    for (size_t at = 0; at < req->payload_len; at += 4096) {
        size_t n = req->payload_len - at < 4096 ? req->payload_len - at : 4096;
        if (reply->write(reply->ctx, req->payload + at, n) != 0)
            return fail(reply, "fault: payload does not fit in the reply");
    }
    uint32_t v = (uint32_t)req->payload_len;
    len[0] = (uint8_t)(v >> 24);
    len[1] = (uint8_t)(v >> 16);
    len[2] = (uint8_t)(v >> 8);
    len[3] = (uint8_t)v;
    return HS_STATUS_OK;
}

/* ---- init: the config lines it knows ---- */

typedef struct init_config {
    unsigned long long delay_ms;
    int crash, hang;
    int fail;
    char fail_msg[1024];
    char crash_if_exists[1024];
    char prefix[256];
} init_config;

static char *trim(char *s)
{
    char *end;
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        *--end = '\0';
    return s;
}

/* value without a trailing "# comment" (for unquoted values) */
static char *strip_comment(char *value)
{
    char *hash = strchr(value, '#');
    if (hash)
        *hash = '\0';
    return trim(value);
}

/* A TOML basic ("...", with \" \\ \n \t escapes) or literal ('...') string;
 * anything else is taken as it is. */
static void parse_string(char *value, char *out, size_t cap)
{
    size_t n = 0;
    char quote = value[0];
    if (quote != '"' && quote != '\'') {
        snprintf(out, cap, "%s", strip_comment(value));
        return;
    }
    for (const char *p = value + 1; *p && *p != quote && n + 1 < cap; p++) {
        char c = *p;
        if (quote == '"' && c == '\\' && p[1]) {
            c = *++p;
            c = c == 'n' ? '\n' : c == 't' ? '\t' : c;
        }
        out[n++] = c;
    }
    out[n] = '\0';
}

static int parse_bool(const char *key, char *raw, int *out, char *err, size_t err_cap)
{
    char copy[256];
    snprintf(copy, sizeof copy, "%s", raw);
    char *value = strip_comment(copy);
    if (strcmp(value, "true") == 0)
        *out = 1;
    else if (strcmp(value, "false") == 0)
        *out = 0;
    else {
        snprintf(err, err_cap, "fault: %s: expected true or false, got `%s`", key, raw);
        return -1;
    }
    return 0;
}

static int parse_config(const char *config, size_t config_len, init_config *out, char *err,
                        size_t err_cap)
{
    size_t pos = 0;
    memset(out, 0, sizeof *out);
    while (pos < config_len) {
        char line[1024];
        const char *nl = memchr(config + pos, '\n', config_len - pos);
        size_t end = nl ? (size_t)(nl - config) : config_len;
        size_t n = end - pos < sizeof line - 1 ? end - pos : sizeof line - 1;
        memcpy(line, config + pos, n);
        line[n] = '\0';
        pos = end + 1;

        char *eq = strchr(line, '=');
        if (!eq)
            continue;
        *eq = '\0';
        char *key = trim(line);
        char *value = trim(eq + 1);
        if (strcmp(key, "init_delay_ms") == 0) {
            char copy[256], *digits, *rest;
            snprintf(copy, sizeof copy, "%s", value);
            digits = strip_comment(copy);
            errno = 0;
            out->delay_ms = strtoull(digits, &rest, 10);
            if (!*digits || *rest || errno || digits[0] == '-' || digits[0] == '+') {
                snprintf(err, err_cap, "fault: init_delay_ms: expected milliseconds, got `%s`",
                         value);
                return -1;
            }
        } else if (strcmp(key, "crash_in_init") == 0) {
            if (parse_bool(key, value, &out->crash, err, err_cap) != 0)
                return -1;
        } else if (strcmp(key, "hang_in_init") == 0) {
            if (parse_bool(key, value, &out->hang, err, err_cap) != 0)
                return -1;
        } else if (strcmp(key, "fail_init") == 0) {
            out->fail = 1;
            parse_string(value, out->fail_msg, sizeof out->fail_msg);
        } else if (strcmp(key, "reply_prefix") == 0) {
            parse_string(value, out->prefix, sizeof out->prefix);
        } else if (strcmp(key, "crash_in_init_if_exists") == 0) {
            parse_string(value, out->crash_if_exists, sizeof out->crash_if_exists);
        }
    }
    return 0;
}

/* "group=NAME worker=N" from what the host says ("-" for what it does not,
 * an older host or a test load) into out; returns its length. */
static size_t whoami(const hs_host *host, char *out, size_t cap)
{
    char worker[16] = "-";
    const char *group = HS_HOST_HAS(host, group) && host->group ? host->group : "-";
    if (HS_HOST_HAS(host, worker) && host->worker != HS_NOT_A_WORKER)
        snprintf(worker, sizeof worker, "%u", (unsigned)host->worker);
    int n = snprintf(out, cap, "group=%s worker=%s", group, worker);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

static int32_t fault_init(const hs_host *host, const char *config, size_t config_len,
                          void **state, char *err, size_t err_cap)
{
    init_config cfg;
    if (parse_config(config ? config : "", config ? config_len : 0, &cfg, err, err_cap) != 0)
        return 1;
    if (cfg.delay_ms > 0) {
        char msg[64];
        snprintf(msg, sizeof msg, "fault: init sleeps %llu ms", cfg.delay_ms);
        fault_log(host, HS_LOG_INFO, msg);
        sleep_ms(cfg.delay_ms);
    }
    if (cfg.crash_if_exists[0] && access(cfg.crash_if_exists, F_OK) == 0)
        cfg.crash = 1;
    if (cfg.crash) {
        fault_log(host, HS_LOG_WARN, "fault: crashing in init");
        segfault();
    }
    if (cfg.hang) {
        fault_log(host, HS_LOG_WARN, "fault: hanging in init");
        hang();
    }
    if (cfg.fail) {
        snprintf(err, err_cap, "%s", cfg.fail_msg);
        return 1;
    }
    fault_state *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, err_cap, "fault: out of memory");
        return 1;
    }
    s->host = host;
    memcpy(s->prefix, cfg.prefix, sizeof s->prefix);
    s->prefix_len = strlen(s->prefix);
    {
        char who[128], ready[160];
        whoami(host, who, sizeof who);
        snprintf(ready, sizeof ready, "fault plugin ready (%s)", who);
        fault_log(host, HS_LOG_INFO, ready);
    }
    *state = s;
    return 0;
}

static int32_t fault_handle(void *state, const hs_request *req, hs_reply *reply)
{
    fault_state *s = state;
    switch (req->command) {
    case FAULT_SEGV:
        fault_warn(s, "SIGSEGV", req);
        segfault();
        break;
    case FAULT_ABORT:
        fault_warn(s, "abort", req);
        abort();
    case FAULT_ERROR:
        return fail(reply, "fault: requested error");
    case FAULT_ESCAPING_PANIC:
        fault_warn(s, "escaping panic", req);
        raise(SIGABRT);
        abort();
    case FAULT_EXIT:
        fault_warn(s, "exit(0)", req);
        exit(0);
    case FAULT_HANG:
        fault_warn(s, "hang", req);
        hang();
        break;
    case FAULT_SLOW:
        sleep_ms(payload_u32(req, FAULT_SLOW_DEFAULT_MS));
        return echo(req, reply);
    case FAULT_LEAK:
        return leak(s, req, reply);
    case FAULT_SCRIBBLE:
        return scribble(s, req, reply);
    case FAULT_SIGBUS:
        fault_warn(s, "SIGBUS", req);
        bus_error();
        break;
    case FAULT_SIGKILL:
        fault_warn(s, "SIGKILL", req);
        kill(getpid(), SIGKILL);
        hang();
        break;
    case FAULT_REPLY_TOO_BIG:
        return reply_too_big(reply);
    case FAULT_RESERVED_STATUS:
        return FAULT_RESERVED_STATUS_CODE;
    case FAULT_CUSTOM:
        if (reply->write(reply->ctx, (const uint8_t *)"custom", 6) != 0)
            return fail(reply, "fault: payload does not fit in the reply");
        return FAULT_CUSTOM_STATUS;
    case FAULT_PREFIXED:
        return prefixed(req, reply);
    case FAULT_WHOAMI: {
        char text[128];
        size_t n = whoami(s->host, text, sizeof text);
        if (reply->write(reply->ctx, (const uint8_t *)text, n) != 0)
            return fail(reply, "fault: payload does not fit in the reply");
        return HS_STATUS_OK;
    }
    default:
        break;
    }
    if (s->prefix_len && reply->write(reply->ctx, (const uint8_t *)s->prefix, s->prefix_len) != 0)
        return fail(reply, "fault: prefix does not fit in the reply");
    return echo(req, reply);
}

static void fault_fini(void *state)
{
    /* The leaked blocks stay leaked: that is the point. */
    free(state);
}

static const hs_plugin fault_plugin = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "c_fault",
    .version = "1.0.0",
    .init = fault_init,
    .handle = fault_handle,
    .fini = fault_fini,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &fault_plugin;
}
