/*
 * An echo plugin whose init fails if it can see an inheritable descriptor
 * of a shared object (a plugin file the master holds open): processes a
 * plugin starts must not get those (test
 * bad_config::plugins_cannot_pass_on_the_plugin_files_descriptors).
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "_common.h"

static int32_t fd_check_init(const hs_host *host, const char *config, size_t config_len,
                             void **state, char *err, size_t err_cap)
{
    for (int fd = 3; fd < 4096; fd++) {
        int flags = fcntl(fd, F_GETFD);
        if (flags < 0 || (flags & FD_CLOEXEC)) {
            continue;
        }
        char link[64], target[512];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n <= 0) {
            continue;
        }
        target[n] = 0;
        size_t len = strlen(target);
        if (len > 3 && strcmp(target + len - 3, ".so") == 0) {
            snprintf(err, err_cap, "descriptor %d of %s is inheritable", fd, target);
            return 1;
        }
    }
    return test_init(host, config, config_len, state, err, err_cap);
}

static const hs_plugin table = {
    .abi_version = HALFSYNC_ABI_VERSION,
    .struct_size = sizeof(hs_plugin),
    .name = "fd_check",
    .version = "1",
    .init = fd_check_init,
    .handle = test_handle,
    .fini = 0,
};

const hs_plugin *halfsync_plugin_v1(void)
{
    return &table;
}
