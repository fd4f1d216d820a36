/*
 * An echo plugin that prints a line to stdout for every request, with
 * printf and no fflush, as plugin authors debug: the worker makes its
 * stdout line-buffered, so each line reaches the log at once, not when
 * a 4 KiB buffer fills or the worker exits (or never, if it crashes).
 * Command 3 prints 30,000 lines and its last words, then exits.
 * Command 4 prints one 1 MiB line, then a short one. Command 5 logs one
 * 1 MiB message through hs_host.log.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "_common.h"

static const hs_host *the_host;

static int32_t printer_init(const hs_host *host, const char *config, size_t config_len,
                            void **state, char *err, size_t err_cap)
{
    the_host = host;
    return test_init(host, config, config_len, state, err, err_cap);
}

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
    if (req->command == 4 || req->command == 5) {
        size_t n = 1 << 20;
        char *big = malloc(n);
        if (!big)
            return HS_STATUS_PLUGIN_ERROR;
        memset(big, 'x', n);
        if (req->command == 4) {
            fwrite(big, 1, n, stdout);
            printf("\nafter the long line\n");
        } else {
            the_host->log(the_host->ctx, HS_LOG_WARN, big, n);
        }
        free(big);
    }
    printf("handled request %llu\n", (unsigned long long)req->id);
    return test_handle(state, req, reply);
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "printer",
    .version = "1",
    .init = printer_init,
    .handle = printer_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
