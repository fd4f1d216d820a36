/* The table says it is shorter than a v1 table (as if built from a
 * truncated header): only the fields before init. */
#include <stddef.h>

#include "_common.h"

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = offsetof(hs_plugin, init),
    .name = "short_table",
    .version = "0",
    .init = test_init,
    .handle = test_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
