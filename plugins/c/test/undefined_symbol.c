/* Calls a function no library defines. A shared object may link with
 * undefined symbols; loading it with RTLD_NOW must then fail and name the
 * symbol. */
#include "_common.h"

extern int halfsync_test_no_such_function(int);

static int32_t handle(void *state, const hs_request *req, hs_reply *reply)
{
    (void)state;
    (void)reply;
    return halfsync_test_no_such_function((int)req->payload_len);
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "undefined_symbol",
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
