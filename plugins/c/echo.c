/*
 * The echo plugin in plain C: replies status 0 with the request payload.
 *
 * The same behaviour as the Rust plugin in plugins/echo, written against
 * the shipped header only; the test suite builds and loads it to prove the
 * header is enough to write a plugin. Build:
 *
 *     cc -shared -fPIC -O2 -Wall -Wextra -Werror -I plugin-api/include \
 *        plugins/c/echo.c -o libc_echo.so
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "halfsync_plugin.h"

typedef struct echo_state {
    const hs_host *host;
    uint64_t served;
} echo_state;

static void echo_log(const hs_host *host, int32_t level, const char *msg)
{
    if (host && host->log)
        host->log(host->ctx, level, msg, strlen(msg));
}

static int32_t echo_init(const hs_host *host, const char *config, size_t config_len,
                         void **state, char *err, size_t err_cap)
{
    (void)config;
    (void)config_len; /* echo takes no configuration */
    echo_state *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, err_cap, "c_echo: out of memory");
        return 1;
    }
    s->host = host;
    echo_log(host, HS_LOG_INFO, "c_echo ready");
    *state = s;
    return 0;
}

static int32_t echo_handle(void *state, const hs_request *req, hs_reply *reply)
{
    static const char too_big[] = "c_echo: payload does not fit in the reply";
    echo_state *s = state;
    s->served++;
    if (reply->write(reply->ctx, req->payload, req->payload_len) != 0) {
        size_t n = sizeof too_big - 1;
        reply->clear(reply->ctx);
        reply->write(reply->ctx, (const uint8_t *)too_big, n < reply->capacity ? n : reply->capacity);
        return HS_STATUS_PLUGIN_ERROR;
    }
    return HS_STATUS_OK;
}

static void echo_fini(void *state)
{
    echo_state *s = state;
    char msg[64];
    snprintf(msg, sizeof msg, "c_echo served %llu requests", (unsigned long long)s->served);
    echo_log(s->host, HS_LOG_INFO, msg);
    free(s);
}

static const hs_plugin echo_plugin = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "c_echo",
    .version = "1.0.0",
    .init = echo_init,
    .handle = echo_handle,
    .fini = echo_fini,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &echo_plugin;
}
