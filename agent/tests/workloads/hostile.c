/* Workload for the hostile-unwind-data kernel tests (agent/tests/native_unwind.rs, issue #15):
 * its hot loop runs in a shared library whose `.eh_frame` the test breaks after linking
 * (garbage, lengths past the end), or which is changed on disk while the process maps it.
 *
 * One file, three builds, all `-O2 -fomit-frame-pointer` and no -g:
 *   cc ... -shared -fPIC -DHOSTILE_LIB -o libhostile.so hostile.c    the library
 *   cc ... -shared -fPIC -DHOSTILE_LIB -DHOSTILE_KICK -o libkick.so hostile.c
 *                                     the same with another build ID, for KICK below
 *   cc ... -pthread -o hostile hostile.c -ldl                        the program
 *
 * usage: hostile LIB SECONDS
 *            main -> drive -> lib_run -> lib_spin (in LIB, dlopen'ed), in the main thread
 *        hostile LIB SECONDS rename|rewrite NEW KICK
 *            the same for SECONDS/2; then LIB's file changes under the process, which keeps
 *            it mapped: `rename` renames NEW over LIB's path (LIB's inode lives on, deleted),
 *            `rewrite` writes NEW's bytes (the same size) into LIB's file in place. Then KICK
 *            (another build of the library) is loaded and run briefly — code in a new mapping,
 *            so the agent reads the process's mappings again and meets the changed file — and
 *            the second half runs in a new thread: start_thread -> after_change -> drive ->
 *            lib_run -> lib_spin (in LIB's mapping).
 */
#include <stdint.h>
#include <time.h>

#if defined(__clang__)
#define KEEP __attribute__((noinline, used))
#else
#define KEEP __attribute__((noipa, used))
#endif

#ifdef HOSTILE_LIB

static double thread_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static volatile uint64_t sink;

/* The hot function: a leaf, pure computation. */
KEEP void lib_spin(double until) {
    uint64_t x = sink | 1;
    do {
        for (int i = 0; i < 200000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        sink += x;
    } while (thread_cpu() < until);
}

#ifdef HOSTILE_KICK
/* Another build ID than the library's: the profile tells the two apart. */
KEEP const char *lib_name(void) { return "kick"; }
#endif

/* Spins for `seconds` of wall time; the CPU seconds it got. */
KEEP double lib_run(double seconds) {
    double end = wall() + seconds, t0 = thread_cpu();
    while (wall() < end) lib_spin(thread_cpu() + 0.040);
    return thread_cpu() - t0;
}

#else /* the program */

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef double (*run_fn)(double);

static run_fn lib_run;
static double half;

static void *open_lib(const char *path, run_fn *run) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        exit(1);
    }
    *run = (run_fn)dlsym(h, "lib_run");
    if (!*run) {
        fprintf(stderr, "dlsym lib_run in %s: %s\n", path, dlerror());
        exit(1);
    }
    return h;
}

/* Not a tail call: `drive` keeps a frame of its own under lib_run. */
KEEP double drive(double seconds) {
    double cpu = lib_run(seconds);
    __asm__ volatile("" ::: "memory");
    return cpu;
}

KEEP void *after_change(void *arg) {
    (void)arg;
    double cpu = drive(half);
    printf("after the change: %.2f CPU s\n", cpu);
    return NULL;
}

/* Writes NEW's bytes over LIB's, in place (same inode, same size, no truncation: a mapped file
 * cut short would SIGBUS its mappers). Only the bytes that differ are written. */
static void rewrite(const char *lib, const char *new_path) {
    FILE *n = fopen(new_path, "rb"), *o = fopen(lib, "rb");
    if (!n || !o) {
        perror("rewrite: open");
        exit(1);
    }
    struct stat sn, so;
    if (fstat(fileno(n), &sn) || fstat(fileno(o), &so) || sn.st_size != so.st_size) {
        fprintf(stderr, "rewrite: %s and %s differ in size\n", new_path, lib);
        exit(1);
    }
    char *a = malloc(sn.st_size), *b = malloc(sn.st_size);
    if (!a || !b || fread(a, 1, sn.st_size, n) != (size_t)sn.st_size ||
        fread(b, 1, sn.st_size, o) != (size_t)sn.st_size) {
        fprintf(stderr, "rewrite: read failed\n");
        exit(1);
    }
    fclose(n);
    fclose(o);
    int fd = open(lib, O_WRONLY);
    if (fd < 0) {
        perror("rewrite: open for writing");
        exit(1);
    }
    long changed = 0;
    for (off_t i = 0; i < sn.st_size;) {
        if (a[i] == b[i]) {
            i++;
            continue;
        }
        off_t j = i;
        while (j < sn.st_size && a[j] != b[j]) j++;
        if (pwrite(fd, a + i, j - i, i) != j - i) {
            perror("rewrite: pwrite");
            exit(1);
        }
        changed += j - i;
        i = j;
    }
    close(fd);
    free(a);
    free(b);
    printf("rewrote %ld bytes of %s in place\n", changed, lib);
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 6) {
        fprintf(stderr, "usage: hostile LIB SECONDS [rename|rewrite NEW KICK]\n");
        return 2;
    }
    double seconds = atof(argv[2]);
    open_lib(argv[1], &lib_run);
    if (argc == 3) {
        printf("%.2f CPU s\n", drive(seconds));
        return 0;
    }
    half = seconds / 2;
    printf("before the change: %.2f CPU s\n", drive(half));
    fflush(stdout);
    if (strcmp(argv[3], "rename") == 0) {
        if (rename(argv[4], argv[1]) != 0) {
            perror("rename");
            return 1;
        }
        printf("renamed %s over %s\n", argv[4], argv[1]);
    } else if (strcmp(argv[3], "rewrite") == 0) {
        rewrite(argv[1], argv[4]);
    } else {
        fprintf(stderr, "unknown change %s\n", argv[3]);
        return 2;
    }
    run_fn kick;
    open_lib(argv[5], &kick);
    kick(0.3);
    pthread_t t;
    if (pthread_create(&t, NULL, after_change, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    pthread_join(t, NULL);
    return 0;
}

#endif
