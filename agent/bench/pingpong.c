// Context-switch workload for agent/bench/offcpu.sh: two threads hand a byte back and forth
// over two pipes, each blocking in read(2) until the other writes, so every hand-off is a
// switch-out and a switch-in. `-n` round trips, `-w` iterations of busy work per hand-off
// (sets the rate). Prints wall_s, cpu_s and the context switches per second.
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int ab[2], ba[2];
static long rounds = 100000, work = 2000;
static volatile uint64_t sink;

static void busy(void) {
    uint64_t x = 1;
    for (long i = 0; i < work; i++) x = x * 6364136223846793005ULL + 1;
    sink = x;
}

static void *pong(void *arg) {
    (void)arg;
    char c;
    for (long i = 0; i < rounds; i++) {
        if (read(ab[0], &c, 1) != 1) exit(1);
        busy();
        if (write(ba[1], &c, 1) != 1) exit(1);
    }
    return NULL;
}

static double now(clockid_t clk) {
    struct timespec t;
    clock_gettime(clk, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-n")) rounds = atol(argv[i + 1]);
        if (!strcmp(argv[i], "-w")) work = atol(argv[i + 1]);
    }
    if (pipe(ab) || pipe(ba)) return 1;
    double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
    pthread_t t;
    pthread_create(&t, NULL, pong, NULL);
    char c = 'x';
    for (long i = 0; i < rounds; i++) {
        if (write(ab[1], &c, 1) != 1) return 1;
        if (read(ba[0], &c, 1) != 1) return 1;
        busy();
    }
    pthread_join(t, NULL);
    double wall = now(CLOCK_MONOTONIC) - w0, cpu = now(CLOCK_PROCESS_CPUTIME_ID) - c0;
    // Each hand-off blocks the reader once: two switches per round trip.
    printf("wall_s=%.4f cpu_s=%.4f switches_per_s=%.0f\n", wall, cpu, 2.0 * rounds / wall);
    return 0;
}
