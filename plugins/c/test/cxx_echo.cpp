/*
 * The echo plugin in C++, written against the shipped C header only, the
 * way an SPP-style C++ plugin would be: a class for the state, new/delete,
 * no extern "C" of its own. The test suite compiles it with
 * -fvisibility=hidden, so it loads only because the header declares the
 * entry point with C linkage and default visibility. Build:
 *
 *     c++ -std=c++17 -shared -fPIC -O2 -Wall -Wextra -fvisibility=hidden \
 *         -I plugin-api/include plugins/c/test/cxx_echo.cpp -o libcxx_echo.so
 */
#include <cstdio>
#include <cstring>
#include <new>

#include "halfsync_plugin.h"

namespace {

class Echo {
public:
    explicit Echo(const hs_host *host) : host_(host) {}

    int32_t handle(const hs_request *req, hs_reply *reply)
    {
        ++served_;
        if (reply->write(reply->ctx, req->payload, req->payload_len) != 0) {
            static const char too_big[] = "cxx_echo: payload does not fit in the reply";
            size_t n = sizeof too_big - 1;
            reply->clear(reply->ctx);
            reply->write(reply->ctx, reinterpret_cast<const uint8_t *>(too_big),
                         n < reply->capacity ? n : reply->capacity);
            return HS_STATUS_PLUGIN_ERROR;
        }
        return HS_STATUS_OK;
    }

    void log(int32_t level, const char *msg) const
    {
        if (host_ && host_->log)
            host_->log(host_->ctx, level, msg, std::strlen(msg));
    }

    unsigned long long served() const { return served_; }

private:
    const hs_host *host_;
    unsigned long long served_ = 0;
};

int32_t echo_init(const hs_host *host, const char *, size_t, void **state, char *err,
                  size_t err_cap)
{
    Echo *e = new (std::nothrow) Echo(host);
    if (!e) {
        std::snprintf(err, err_cap, "cxx_echo: out of memory");
        return 1;
    }
    e->log(HS_LOG_INFO, "cxx_echo ready");
    *state = e;
    return 0;
}

int32_t echo_handle(void *state, const hs_request *req, hs_reply *reply)
{
    return static_cast<Echo *>(state)->handle(req, reply);
}

void echo_fini(void *state)
{
    Echo *e = static_cast<Echo *>(state);
    char msg[64];
    std::snprintf(msg, sizeof msg, "cxx_echo served %llu requests", e->served());
    e->log(HS_LOG_INFO, msg);
    delete e;
}

const hs_plugin echo_plugin = {
    HALFSYNC_ABI_VERSION, sizeof(hs_plugin), "cxx_echo", "1.0.0",
    echo_init,            echo_handle,       echo_fini,
};

} // namespace

const hs_plugin *halfsync_plugin_v1(void)
{
    return &echo_plugin;
}
