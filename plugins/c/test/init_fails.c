/* init refuses to start: the loader must carry its reason. */
#include <stdio.h>

#include "halfsync_plugin.h"

static int32_t init(const hs_host *host, const char *config, size_t config_len,
                    void **state, char *err, size_t err_cap)
{
    (void)host;
    (void)config;
    (void)config_len;
    (void)state;
    snprintf(err, err_cap, "missing required key `db`");
    return 7;
}

static int32_t handle(void *state, const hs_request *req, hs_reply *reply)
{
    (void)state;
    (void)req;
    (void)reply;
    return HS_STATUS_PLUGIN_ERROR;
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "init_fails",
    .version = "0",
    .init = init,
    .handle = handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
