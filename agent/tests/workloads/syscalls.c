/* Syscall-heavy workload: read(2) from /dev/zero in a loop, so most samples are in the kernel
 * (the read path) under user frames do_reads -> main.  usage: syscalls SECONDS */
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 16];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void do_reads(double seconds) {
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0) exit(1);
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < 64; i++)
            if (read(fd, buf, sizeof buf) < 0) exit(2);
    }
    close(fd);
}

int main(int argc, char **argv) {
    do_reads(argc > 1 ? atof(argv[1]) : 5.0);
    return 0;
}
