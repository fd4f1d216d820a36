/*
 * An echo plugin that prints a line to stdout for every request, with
 * printf and no fflush, as plugin authors debug: the worker makes its
 * stdout line-buffered, so each line reaches the log at once, not when
 * a 4 KiB buffer fills or the worker exits (or never, if it crashes).
 * Command 3 prints 30,000 lines and its last words, then exits.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <unistd.h>

#include "_common.h"

static int32_t printer_handle(void *state, const hs_request *req, hs_reply *reply)
{
    if (req->command == 3) {
        /* A flood of output, then last words, then death. */
        for (int i = 0; i < 30000; i++)
            printf("flood line %d\n", i);
        printf("dying now\n");
        fflush(stdout);
        _exit(3);
    }
    printf("handled request %llu\n", (unsigned long long)req->id);
    return test_handle(state, req, reply);
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "printer",
    .version = "1",
    .init = test_init,
    .handle = printer_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
