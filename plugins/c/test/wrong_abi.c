/* Exports halfsync_plugin_v1, but its table claims ABI version 2: the
 * loader must refuse it by the version in the table. */
#include "_common.h"

static const hs_plugin table = {
    .abi_version = 2,
    .struct_size = sizeof(hs_plugin),
    .name = "wrong_abi",
    .version = "0",
    .init = test_init,
    .handle = test_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
