/* The benchmark's payload: prints CLOCK_MONOTONIC in nanoseconds as it starts, so that
 * bench/start-latency can tell how long each runtime took from its command's start to the
 * payload's exec. Static, so that no dynamic loading sits between the exec and the clock. */
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    printf("%lld\n", (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
    return 0;
}
