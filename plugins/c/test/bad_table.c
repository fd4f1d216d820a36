/* The entry function returns NULL instead of a table. */
#include "halfsync_plugin.h"

const hs_plugin *halfsync_plugin_v1(void)
{
    return 0;
}
