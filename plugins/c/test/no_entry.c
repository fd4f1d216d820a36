/* A shared object that is not a halfsync plugin at all. */
int not_a_halfsync_plugin(int x);

int not_a_halfsync_plugin(int x)
{
    return x + 1;
}
