/* Built for a future ABI: exports only halfsync_plugin_v2. The loader must
 * say which version it was built for. */
#include "_common.h"

static const hs_plugin table = {
    .abi_version = 2,
    .struct_size = sizeof(hs_plugin),
    .name = "v2_only",
    .version = "0",
    .init = test_init,
    .handle = test_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v2(void)
{
    return &table;
}
