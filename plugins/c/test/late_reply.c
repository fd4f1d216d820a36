/*
 * A plugin that breaks the reply's lifetime rule: command 116 keeps the
 * hs_reply pointer (and its ctx) it was given; command 117 writes through
 * both after that call returned, then answers with what the two writes
 * returned. The host must refuse them (-1): before, they landed in the
 * reply of whatever request was running, another client's.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>

#include "_common.h"

static hs_reply *kept;
static void *kept_ctx;

static int32_t late_handle(void *state, const hs_request *req, hs_reply *reply)
{
    static const uint8_t late[] = "LATE";
    if (req->command == 116) {
        kept = reply;
        kept_ctx = reply->ctx;
        reply->write(reply->ctx, (const uint8_t *)"kept", 4);
        return HS_STATUS_OK;
    }
    if (req->command == 117 && kept) {
        int rc1 = kept->write(kept->ctx, late, 4);
        int rc2 = reply->write(kept_ctx, late, 4);
        uint8_t *p = kept->reserve(kept->ctx, 4);
        char text[64];
        int n = snprintf(text, sizeof text, "write %d, write via ctx %d, reserve %s", rc1, rc2,
                         p ? "a pointer" : "NULL");
        reply->write(reply->ctx, (const uint8_t *)text, (size_t)n);
        return HS_STATUS_OK;
    }
    return test_handle(state, req, reply);
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "late_reply",
    .version = "1",
    .init = test_init,
    .handle = late_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
