/*
 * An echo plugin that writes to stdout while it loads and initialises,
 * without a newline and unbuffered: the plugin probe's report to its
 * parent must not be garbled by it (it once was: a group's result went
 * missing and the groups after it got each other's plugins).
 * `halfsync check` quotes what it printed. With `exit_in_init` anywhere in
 * its config it then says why on stderr and exits 3 inside init; with
 * `exit0_in_init`, exits 0 there; with `loud_in_init`, prints 200 KB, then
 * its reason, then exits 3; with `fail_in_init`, prints its reason on
 * stderr and fails init (returns non-zero). With `once_per_process`, init
 * fails if it already ran in this process (a static, as a Rust OnceLock).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "_common.h"

__attribute__((constructor)) static void chatty_load(void)
{
    setvbuf(stdout, 0, _IONBF, 0);
    fputs("loading...", stdout);
}

static int32_t chatty_init(const hs_host *host, const char *config, size_t config_len,
                           void **state, char *err, size_t err_cap)
{
    fputs("init\tok\t", stdout);
    /* Look for the keys within config_len. */
    static const char key[] = "exit_in_init", key0[] = "exit0_in_init", loud[] = "loud_in_init";
    static const char fail[] = "fail_in_init", once[] = "once_per_process";
    static int initialised;
    for (size_t i = 0; config && i < config_len; i++) {
        if (i + sizeof fail - 1 <= config_len && memcmp(config + i, fail, sizeof fail - 1) == 0) {
            fputs("\nchatty: the database said no\n", stderr);
            snprintf(err, err_cap, "see what I printed");
            return 1;
        }
        if (i + sizeof once - 1 <= config_len && memcmp(config + i, once, sizeof once - 1) == 0 &&
            initialised++) {
            snprintf(err, err_cap, "init ran twice in one process");
            return 1;
        }
        if (i + sizeof loud - 1 <= config_len && memcmp(config + i, loud, sizeof loud - 1) == 0) {
            /* 200 KB of progress, then the reason, last. */
            for (int n = 0; n < 2000; n++)
                fprintf(stdout, "chatty: init progress %04d .......................................................................................\n", n);
            fflush(stdout);
            fputs("chatty: FATAL the real reason, printed last\n", stderr);
            exit(3);
        }
        if (i + sizeof key - 1 <= config_len && memcmp(config + i, key, sizeof key - 1) == 0) {
            fputs("\nchatty: cannot reach the database, giving up\n", stderr);
            exit(3);
        }
        if (i + sizeof key0 - 1 <= config_len && memcmp(config + i, key0, sizeof key0 - 1) == 0) {
            fputs("\nchatty: nothing to do, bye\n", stderr);
            exit(0);
        }
    }
    return test_init(host, config, config_len, state, err, err_cap);
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "chatty\tname",
    .version = "1\n2",
    .init = chatty_init,
    .handle = test_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
