/* A v1 table whose handle function is NULL. */
#include "_common.h"

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "no_handle",
    .version = "0",
    .init = test_init,
    .handle = 0,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    (void)test_handle;
    return &table;
}
