/*
 * An echo plugin whose library constructor sleeps while the plugin probe
 * loads it (the process named "halfsync-probe"): HALFSYNC_TEST_LOAD_DELAY_MS
 * milliseconds, default 0. Workers load it at once. For the test that the
 * master goes on supervising while a reload test-loads a slow plugin.
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep under -std=c11 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_common.h"

__attribute__((constructor)) static void slow_load(void)
{
    char name[64] = "";
    FILE *comm = fopen("/proc/self/comm", "r");
    if (comm) {
        if (!fgets(name, sizeof name, comm))
            name[0] = 0;
        fclose(comm);
    }
    const char *ms = getenv("HALFSYNC_TEST_LOAD_DELAY_MS");
    if (strncmp(name, "halfsync-probe", 14) != 0 || !ms)
        return;
    long n = strtol(ms, 0, 10);
    struct timespec ts = {n / 1000, (n % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "slow_load",
    .version = "1",
    .init = test_init,
    .handle = test_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
