/*
 * halfsync plugin ABI, major version 1.
 *
 * A plugin is a shared object that exports one function:
 *
 *     const hs_plugin *halfsync_plugin_v1(void);
 *
 * The symbol name carries the ABI major version, so a host speaking
 * another major version cannot even find it. The returned table must live
 * for the life of the process (a static). The host loads the .so with
 * RTLD_NOW, never unloads it, and calls, in one worker process and one
 * thread:
 *
 *     init   once, with the plugin's own config section as TOML text;
 *     handle once per request, synchronously;
 *     fini   once, at a clean worker exit (not after a crash).
 *
 * Fields may be appended to hs_plugin, hs_host and hs_reply in later minor
 * revisions; struct_size tells each side how much the other knows.
 * hs_request has no struct_size and stays as it is in ABI 1: anything new
 * about a request will come through hs_host.
 *
 * None of the three may let a C++ exception escape: it aborts the worker
 * (catch everything and return HS_STATUS_PLUGIN_ERROR). The worker process
 * owns SIGTERM, SIGUSR1 and SIGUSR2 and ignores SIGINT, SIGQUIT, SIGHUP,
 * SIGPIPE and SIGTTOU; leave those alone (processes the plugin starts
 * inherit the ignored ones: reset them there if that matters). Its working
 * directory is halfsync's.
 */
#ifndef HALFSYNC_PLUGIN_H
#define HALFSYNC_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HALFSYNC_ABI_VERSION 1u
/* The revision of ABI 1 this header describes: 1 has hs_host.group and
 * hs_host.worker. Fields are only ever appended within a major version. */
#define HALFSYNC_ABI_MINOR 1u

/* Reply statuses. Codes below 100 belong to the server; a plugin returns
 * HS_STATUS_OK, HS_STATUS_PLUGIN_ERROR (payload = message) or a code of
 * 100 to 65535. Any other return value becomes HS_STATUS_PLUGIN_ERROR,
 * its payload replaced by "plugin returned reserved status N" (2 to 99)
 * or "plugin returned invalid status N". */
#define HS_STATUS_OK 0
#define HS_STATUS_PLUGIN_ERROR 1
#define HS_STATUS_FIRST_PLUGIN_CODE 100

/* Log levels for hs_host.log. Below HS_LOG_ERROR counts as an error;
 * above HS_LOG_DEBUG is trace, shown only with HALFSYNC_LOG=trace. */
#define HS_LOG_ERROR 1
#define HS_LOG_WARN 2
#define HS_LOG_INFO 3
#define HS_LOG_DEBUG 4

/* One request. The payload points into shared memory and is valid only
 * during the handle call that received it; it is 8-byte aligned and never
 * NULL, even when payload_len is 0. */
typedef struct hs_request {
    uint64_t id;           /* chosen by the client, echoed in the reply */
    uint16_t command;      /* HSP/1 code field of the request */
    uint16_t flags;        /* HSP/1 flags field, as the client sent it */
    uint32_t reserved;     /* 0 */
    const uint8_t *payload;
    size_t payload_len;
} hs_request;

/* The reply under construction. Bytes written go straight into the reply
 * ring in shared memory (the first 64 KiB; a longer reply is assembled in
 * the worker's memory and copied in after handle returns). Valid only
 * during the handle call: never keep the pointer (a write through a kept
 * one is refused, -1 or NULL, unless it happens to hit the reply of the
 * call running then: the host turns through 64). Its functions may be
 * called from another thread while handle waits for that thread, never
 * from two threads at once. A pointer from reserve covers exactly the len
 * bytes asked for, and stays valid until handle returns however long the
 * reply grows after it (until clear, after which it must not be used);
 * the bytes of separate reserve or write calls are not adjacent in
 * memory, so never write past what one reserve returned. */
typedef struct hs_reply {
    uint32_t struct_size;  /* sizeof(hs_reply) as the host knows it */
    uint32_t reserved;
    void *ctx;             /* host-owned; pass it back to the functions below */
    size_t capacity;       /* most payload bytes this reply can hold in all
                              (fixed: it does not shrink as you write) */
    /* Append len bytes. Returns 0, or -1 (nothing written) if the payload
     * would exceed capacity. */
    int32_t (*write)(void *ctx, const uint8_t *data, size_t len);
    /* Append len uninitialised bytes and return a pointer to them for the
     * plugin to fill, or NULL if the payload would exceed capacity. */
    uint8_t *(*reserve)(void *ctx, size_t len);
    /* Discard everything written so far. */
    void (*clear)(void *ctx);
} hs_reply;

/* Services the host offers the plugin. Valid from init for as long as the
 * process lives (halfsync never frees it, so a plugin thread still running
 * after fini cannot reach freed memory); `log` may be called from any
 * thread. */
typedef struct hs_host {
    uint32_t abi_version;  /* HALFSYNC_ABI_VERSION of the host */
    uint32_t struct_size;  /* sizeof(hs_host) as the host knows it */
    void *ctx;             /* host-owned */
    /* Log one message (UTF-8, not NUL-terminated) through the host's log:
     * one line (newlines are escaped), cut at 16 KiB, and at most 300
     * messages a second per worker (the rest are counted, not logged). */
    void (*log)(void *ctx, int32_t level, const char *msg, size_t len);
    /* Appended in 1.1: read them only if HS_HOST_HAS(host, worker) (an
     * older host's struct ends before them). The worker's group name
     * (NUL-terminated, valid as long as the host; NULL if there is none)
     * and its number in the group (0, 1, ...: N in the process title
     * `halfsync: worker GROUP N`, kept across its restarts), or
     * HS_NOT_A_WORKER while `halfsync check` or a reload test-loads the
     * plugin. A number is unique among a group's serving workers, but a
     * replacement (reload, recycle, scale) starts with the number of the
     * worker it replaces while that one still drains: add the pid to
     * anything that must be unique, such as a file name. */
    const char *group;
    uint32_t worker;
    uint32_t reserved;     /* 0 */
} hs_host;

/* hs_host.worker outside a worker (the test load of `halfsync check`). */
#define HS_NOT_A_WORKER 0xffffffffu

/* Whether `host` (an hs_host pointer) has `field`: fields appended in a
 * later revision are missing from an older host's struct. */
#define HS_HOST_HAS(host, field) \
    ((host)->struct_size >= offsetof(hs_host, field) + sizeof((host)->field))

typedef struct hs_plugin {
    uint32_t abi_version;  /* must be HALFSYNC_ABI_VERSION */
    uint32_t struct_size;  /* sizeof(hs_plugin) */
    const char *name;      /* NUL-terminated, for logs (NULL: the file's name) */
    const char *version;   /* NUL-terminated, for logs and status (NULL: "") */
    /* Set *state (may stay NULL) and return 0; or write a NUL-terminated
     * reason into err (at most err_cap bytes; the host reads no further,
     * NUL or not) and return non-zero: the worker then exits and the pool
     * reports the reason. config is the plugin's config section as TOML
     * text (NUL-terminated, config_len bytes before the NUL), valid only
     * during this call: copy what you keep. The host re-serializes the
     * section: keys sorted, inline tables written as [sections]. */
    int32_t (*init)(const hs_host *host, const char *config, size_t config_len,
                    void **state, char *err, size_t err_cap);
    /* Handle one request; return the reply status. */
    int32_t (*handle)(void *state, const hs_request *req, hs_reply *reply);
    /* Release state. May be NULL. */
    void (*fini)(void *state);
} hs_plugin;

/* The one entry point; the name carries the ABI major version. */
typedef const hs_plugin *(*hs_plugin_entry_fn)(void);
#define HALFSYNC_PLUGIN_ENTRY "halfsync_plugin_v1"

/* The entry point every plugin defines, declared here so that the
 * definition gets C linkage in C++ (no name mangling, no extern "C" of
 * the plugin's own needed) and default visibility under
 * -fvisibility=hidden. */
#if defined(__GNUC__)
__attribute__((visibility("default")))
#endif
const hs_plugin *halfsync_plugin_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* HALFSYNC_PLUGIN_H */
