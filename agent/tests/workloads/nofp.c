/* Workload without frame pointers for the native-unwinding kernel tests (agent/tests/
 * native_unwind.rs, issue #15). Built with `cc -O2 -fomit-frame-pointer` and no -g, as
 * distributions and wheels build their code: only .eh_frame tells a caller from a callee.
 *
 * usage: nofp SECONDS TRUTH_FILE            main -> run -> spin_syscalls | spin_math
 *        nofp SECONDS TRUTH_FILE THREADS    main starts THREADS threads, each
 *                                           start_thread -> thread_main -> run -> ...; main
 *                                           waits in pthread_join
 *
 * run() alternates two phases, each given a fixed slice of the thread's CPU time:
 *   spin_syscalls  getppid() in a loop: the time is in libc's syscall wrapper and the kernel
 *                  under it (~25 %)
 *   spin_math      pure computation in this file (~75 %)
 * and measures what it got (CLOCK_THREAD_CPUTIME_ID around each phase). At exit the truth is
 * written to TRUTH_FILE and stdout, as shares of the process's CPU time (CLOCK_PROCESS_CPUTIME_ID,
 * start-up and exit included):
 *   truth spin_syscalls=0.251 spin_math=0.747 cpu=6.01 threads=0
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* Keep every function of the chain a real call with its own symbol: no inlining, no
 * `.constprop`/`.isra` clones, no interprocedural shortcuts. */
#if defined(__clang__)
#define KEEP __attribute__((noinline, used))
#else
#define KEEP __attribute__((noipa, used))
#endif

#define SLICE_S 0.040 /* CPU seconds per round */
#define SYSCALL_SHARE 0.25

static volatile uint64_t sink;

static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double process_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

KEEP void spin_syscalls(double until) {
    do {
        for (int i = 0; i < 64; i++) sink += (uint64_t)getppid();
    } while (thread_cpu() < until);
}

KEEP void spin_math(double until) {
    uint64_t x = sink | 1;
    do {
        for (int i = 0; i < 200000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        sink += x;
    } while (thread_cpu() < until);
}

/* CPU seconds spent in each phase, summed over the threads. */
static pthread_mutex_t truth_lock = PTHREAD_MUTEX_INITIALIZER;
static double t_syscalls, t_math;

KEEP void run(double seconds) {
    double end = wall() + seconds, sys = 0, math = 0;
    while (wall() < end) {
        double t0 = thread_cpu();
        spin_syscalls(t0 + SLICE_S * SYSCALL_SHARE);
        double t1 = thread_cpu();
        spin_math(t1 + SLICE_S * (1 - SYSCALL_SHARE));
        double t2 = thread_cpu();
        sys += t1 - t0;
        math += t2 - t1;
    }
    pthread_mutex_lock(&truth_lock);
    t_syscalls += sys;
    t_math += math;
    pthread_mutex_unlock(&truth_lock);
}

static double seconds_arg;

KEEP void *thread_main(void *arg) {
    (void)arg;
    run(seconds_arg);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: nofp SECONDS TRUTH_FILE [THREADS]\n");
        return 2;
    }
    seconds_arg = atof(argv[1]);
    int threads = argc > 3 ? atoi(argv[3]) : 0;
    if (threads > 0) {
        pthread_t tid[64];
        if (threads > 64) threads = 64;
        for (int i = 0; i < threads; i++)
            if (pthread_create(&tid[i], NULL, thread_main, NULL) != 0) {
                perror("pthread_create");
                return 1;
            }
        for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
    } else {
        run(seconds_arg);
    }
    double cpu = process_cpu();
    char line[160];
    snprintf(line, sizeof line, "truth spin_syscalls=%.4f spin_math=%.4f cpu=%.3f threads=%d\n",
             t_syscalls / cpu, t_math / cpu, cpu, threads);
    fputs(line, stdout);
    FILE *f = fopen(argv[2], "w");
    if (!f || fputs(line, f) < 0 || fclose(f) != 0) {
        perror(argv[2]);
        return 1;
    }
    return 0;
}
