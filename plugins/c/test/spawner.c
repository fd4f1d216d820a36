/*
 * An echo plugin that, for command 2, starts a child process (`sleep 60`)
 * and replies with its pid as decimal text, as a plugin that shells out
 * and forgets its child would: the child must end with the worker.
 *
 * With $SPAWNER_LOAD_PIDFILE set, loading the library (a constructor, so
 * also in the plugin probe, which loads without calling init) starts such
 * a child too, which inherits stdout and stderr (pipes, in the probe), and
 * appends "NAME PID" to that file, NAME being the process's name
 * (/proc/self/comm: "halfsync-probe" in the plugin probe, "hs-GROUP-N" in
 * a worker).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "_common.h"

__attribute__((constructor)) static void spawn_at_load(void)
{
    const char *path = getenv("SPAWNER_LOAD_PIDFILE");
    if (!path)
        return;
    pid_t pid = fork();
    if (pid < 0)
        return;
    if (pid == 0) {
        execlp("sleep", "sleep", "60", (char *)0);
        _exit(127);
    }
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    char name[64] = "-";
    FILE *comm = fopen("/proc/self/comm", "r");
    if (comm) {
        if (fgets(name, sizeof name, comm))
            name[strcspn(name, "\n")] = 0;
        fclose(comm);
    }
    fprintf(f, "%s %d\n", name, (int)pid);
    fclose(f);
}

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
