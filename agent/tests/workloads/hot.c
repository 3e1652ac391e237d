/* CPU workload with known hot functions for the kernel tests of kprof-agent.
 * usage: hot SECONDS       run for a time (tests)
 *        hot SECONDS exec PROGRAM [ARGS...]   then replace itself with PROGRAM (exec tests)
 *        hot -n ROUNDS     run a fixed amount of work and print "wall_s=… cpu_s=…" (benchmark)
 * Spends about 2/3 of its time in burn_alpha and 1/3 in burn_beta (same work per call, called
 * 2:1), both reached from main through run. Built with -O1 -fno-omit-frame-pointer -g. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t sink;

__attribute__((noinline)) uint64_t burn_alpha(uint64_t n) {
    uint64_t x = n;
    for (uint64_t i = 0; i < 2000000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}

__attribute__((noinline)) uint64_t burn_beta(uint64_t n) {
    uint64_t x = n;
    for (uint64_t i = 0; i < 2000000; i++) x = x * 2862933555777941757ULL + 3037000493ULL;
    return x;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void run(double seconds) {
    double end = now() + seconds;
    uint64_t i = 0;
    while (now() < end) {
        sink += burn_alpha(i++);
        sink += burn_alpha(i++);
        sink += burn_beta(i++);
    }
}

__attribute__((noinline)) void run_rounds(long rounds) {
    for (long i = 0; i < rounds; i++) {
        sink += burn_alpha(3 * i);
        sink += burn_alpha(3 * i + 1);
        sink += burn_beta(3 * i + 2);
    }
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "-n") == 0) {
        double start = now();
        run_rounds(atol(argv[2]));
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        printf("wall_s=%.6f cpu_s=%.6f\n", now() - start,
               ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                   ru.ru_stime.tv_usec / 1e6);
        return 0;
    }
    run(argc > 1 ? atof(argv[1]) : 5.0);
    if (argc > 3 && strcmp(argv[2], "exec") == 0) {
        execv(argv[3], argv + 3);
        perror("execv");
        return 1;
    }
    return 0;
}
