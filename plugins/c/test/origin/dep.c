/* A library a plugin ships beside itself (see plugin.c). */
const char *origin_dep_greeting(void)
{
    return "from libdep";
}
