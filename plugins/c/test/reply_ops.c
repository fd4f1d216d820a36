/*
 * Exercises the host's side of hs_reply and the status mapping.
 *
 * command 0: write "written", then return the status given as a decimal
 *            number in the payload (so the host's mapping of reserved and
 *            out-of-range statuses can be tested);
 * command 1: reserve + fill "abc", clear, write "xyz", reserve one byte
 *            more than is left (must be NULL), then reserve exactly what is
 *            left and fill it with '.';
 * command 2: reserve and fill the payload, then write it again from the
 *            reply's own bytes (a source inside the reply buffer).
 */
#include <stdlib.h>
#include <string.h>

#include "_common.h"

static int32_t handle(void *state, const hs_request *req, hs_reply *reply)
{
    (void)state;
    switch (req->command) {
    case 0: {
        char num[32] = {0};
        size_t n = req->payload_len < sizeof num - 1 ? req->payload_len : sizeof num - 1;
        memcpy(num, req->payload, n);
        reply->write(reply->ctx, (const uint8_t *)"written", 7);
        return (int32_t)strtol(num, 0, 10);
    }
    case 1: {
        uint8_t *p = reply->reserve(reply->ctx, 3);
        if (!p)
            return 100;
        memcpy(p, "abc", 3);
        reply->clear(reply->ctx);
        if (reply->write(reply->ctx, (const uint8_t *)"xyz", 3) != 0)
            return 101;
        if (reply->reserve(reply->ctx, reply->capacity - 3 + 1) != 0)
            return 102;
        p = reply->reserve(reply->ctx, reply->capacity - 3);
        if (!p)
            return 103;
        memset(p, '.', reply->capacity - 3);
        return HS_STATUS_OK;
    }
    case 2: {
        uint8_t *p = reply->reserve(reply->ctx, req->payload_len);
        if (!p)
            return 100;
        memcpy(p, req->payload, req->payload_len);
        if (reply->write(reply->ctx, p, req->payload_len) != 0)
            return 101;
        return HS_STATUS_OK;
    }
    default:
        return HS_STATUS_PLUGIN_ERROR;
    }
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "reply_ops",
    .version = "0",
    .init = test_init,
    .handle = handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    (void)test_handle;
    return &table;
}
