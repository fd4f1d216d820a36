/*
 * Shared by the broken test plugins: a minimal, correct init/handle that
 * each file wires into a table it then breaks in its own way.
 */
#ifndef HALFSYNC_TEST_COMMON_H
#define HALFSYNC_TEST_COMMON_H

#include "halfsync_plugin.h"

static int32_t test_init(const hs_host *host, const char *config, size_t config_len,
                         void **state, char *err, size_t err_cap)
{
    (void)host;
    (void)config;
    (void)config_len;
    (void)err;
    (void)err_cap;
    *state = 0;
    return 0;
}

static int32_t test_handle(void *state, const hs_request *req, hs_reply *reply)
{
    (void)state;
    /* The header promises an 8-byte aligned payload, never NULL. */
    if (req->payload == 0 || ((uintptr_t)req->payload & 7) != 0) {
        static const char msg[] = "payload pointer NULL or not 8-byte aligned";
        reply->write(reply->ctx, (const uint8_t *)msg, sizeof msg - 1);
        return HS_STATUS_PLUGIN_ERROR;
    }
    return reply->write(reply->ctx, req->payload, req->payload_len) == 0
        ? HS_STATUS_OK : HS_STATUS_PLUGIN_ERROR;
}

#endif
