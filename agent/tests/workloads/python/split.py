"""CPU split between known functions, for attribution tests and the benchmark.

Every round gives each category a fixed slice of this thread's CPU time (time.thread_time, so
preemption by other processes does not skew the split):

  recursive  40 %  spin_recursive  (recursion 20 deep, hot line L:rec_hot)
  method     25 %  Shape.method_work -> closure  (hot line L:closure_hot)
  generator  15 %  generator_work -> gen  (hot line L:gen_hot)
  compress   20 %  compress_work -> zlib.compress  (GIL released, hot line L:compress_hot)

usage: split.py [seconds] [--mp N]   (--mp: N multiprocessing workers run the same split)
Prints `READY <pid>` when it starts and `WORK <units> <seconds>` at the end (throughput).
"""
import os
import sys
import time
import zlib

clock = time.thread_time
SHARES = {"recursive": 0.40, "method": 0.25, "generator": 0.15, "compress": 0.20}
SLICE = 0.100  # CPU seconds per round
DATA = os.urandom(1 << 13) * 2


def spin_recursive(depth, deadline):
    if depth:
        return spin_recursive(depth - 1, deadline)  # L:rec_call
    x = 0
    while clock() < deadline: x += 1  # L:rec_hot
    return x


class Shape:
    def __init__(self):
        self.k = 0

    def method_work(self, deadline):
        self.k = 0

        def closure():
            while clock() < deadline: self.k += 1  # L:closure_hot
        closure()  # L:closure_call
        return self.k


def gen(deadline):
    while clock() < deadline: yield 1  # L:gen_hot


def generator_work(deadline):
    n = 0
    for _ in gen(deadline): n += 1  # L:gen_consume
    return n


def compress_work(deadline):
    n = 0
    while clock() < deadline:
        zlib.compress(DATA, 6)  # L:compress_hot
        n += 1
    return n * 100


def run(seconds):
    """Run the split for `seconds` of wall time; returns work units done (for throughput)."""
    end = time.time() + seconds
    shape = Shape()
    work = 0
    while time.time() < end:
        work += spin_recursive(20, clock() + SLICE * SHARES["recursive"])
        work += shape.method_work(clock() + SLICE * SHARES["method"])
        work += generator_work(clock() + SLICE * SHARES["generator"])
        work += compress_work(clock() + SLICE * SHARES["compress"])
    return work


def worker(seconds):
    run(seconds)
    return os.getpid()


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    if "--mp" in sys.argv:
        import multiprocessing as mp
        n = int(sys.argv[sys.argv.index("--mp") + 1])
        ctx = mp.get_context("fork")
        with ctx.Pool(n) as pool:
            print("READY", os.getpid(), flush=True)
            pids = pool.map(worker, [seconds] * n)  # L:mp_wait
        print("WORKERS", *pids, flush=True)
    else:
        print("READY", os.getpid(), flush=True)
        t0 = time.time()
        work = run(seconds)  # L:main_run
        print("WORK", work, time.time() - t0, flush=True)


if __name__ == "__main__":
    main()
