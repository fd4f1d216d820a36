/*
 * An echo plugin that, for command 2, starts a child process (`sleep 60`)
 * and replies with its pid as decimal text, as a plugin that shells out
 * and forgets its child would: the child must end with the worker.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <sys/types.h>
#include <unistd.h>

#include "_common.h"

static int32_t spawner_handle(void *state, const hs_request *req, hs_reply *reply)
{
    if (req->command != 2)
        return test_handle(state, req, reply);
    pid_t pid = fork();
    if (pid < 0)
        return HS_STATUS_PLUGIN_ERROR;
    if (pid == 0) {
        execlp("sleep", "sleep", "60", (char *)0);
        _exit(127);
    }
    char text[32];
    int n = snprintf(text, sizeof text, "%d", (int)pid);
    return reply->write(reply->ctx, (const uint8_t *)text, (size_t)n) == 0 ? HS_STATUS_OK
                                                          : HS_STATUS_PLUGIN_ERROR;
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "spawner",
    .version = "1",
    .init = test_init,
    .handle = spawner_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
