/*
 * An echo plugin whose init fails if it can see an inheritable descriptor
 * that is the host's: a shared object (a plugin file the master holds
 * open), its shared memory (a memfd), its eventfd, or the log descriptor
 * it names in $HALFSYNC_LOG_FD; or $HALFSYNC_ROLE set. Processes a plugin
 * starts must not get those (tests bad_config::plugins_cannot_pass_on_the_plugin_files_descriptors
 * and faults::processes_a_plugin_starts_inherit_no_host_descriptor).
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "_common.h"

static int32_t fd_check_init(const hs_host *host, const char *config, size_t config_len,
                             void **state, char *err, size_t err_cap)
{
    /* Nor the host's role: a `halfsync` command it runs would act on it. */
    if (getenv("HALFSYNC_ROLE")) {
        snprintf(err, err_cap, "HALFSYNC_ROLE is set in the environment");
        return 1;
    }
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
        const char *log_fd = getenv("HALFSYNC_LOG_FD");
        if ((len > 3 && strcmp(target + len - 3, ".so") == 0) ||
            strncmp(target, "/memfd:", 7) == 0 || strcmp(target, "anon_inode:[eventfd]") == 0 ||
            (log_fd && atoi(log_fd) == fd)) {
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
