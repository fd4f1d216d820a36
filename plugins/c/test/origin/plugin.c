/*
 * A plugin linked against libdep.so, which it ships in its own directory
 * and finds through RUNPATH=$ORIGIN (built by the test
 * ops::a_plugin_finds_libraries_beside_it_through_origin): replies
 * "from libdep: " + payload.
 */
#include <string.h>

#include "../_common.h"

const char *origin_dep_greeting(void);

static int32_t origin_handle(void *state, const hs_request *req, hs_reply *reply)
{
    (void)state;
    const char *g = origin_dep_greeting();
    reply->write(reply->ctx, (const uint8_t *)g, strlen(g));
    reply->write(reply->ctx, (const uint8_t *)": ", 2);
    reply->write(reply->ctx, req->payload, req->payload_len);
    return HS_STATUS_OK;
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "origin",
    .version = "1",
    .init = test_init,
    .handle = origin_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
