"""Python calling into native libraries built without frame pointers, for the native-unwinding
kernel tests (agent/tests/native_unwind.rs, issue #15).

Every round gives two phases a fixed slice of this thread's CPU time (time.thread_time):

  compress_loop  40 %  zlib.compress of a 256 KiB buffer (the distribution's libz.so.1)
  numpy_loop     60 %  sorting 2^20 doubles (NumPy's manylinux wheel: _multiarray_umath)

and measures what each got. NumPy comes from the directory the test puts on PYTHONPATH
(e2e/testbed/install-pylibs.sh, run by `make deps`).

usage: [KPROF_PHASES=compress_loop] native_libs.py SECONDS TRUTH_FILE
Prints `READY <pid>` when it starts; writes JSON to TRUTH_FILE at the end:
  {"compress_loop": cpu_s, "numpy_loop": cpu_s, "rounds": n, "numpy": "<version>",
   "numpy_dir": "<package directory>", "zlib": "<runtime version>"}
"""
import json
import os
import random
import sys
import time
import zlib

# One BLAS thread: NumPy's import would otherwise start an idle OpenBLAS pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

clock = time.thread_time
SLICE = 0.200  # CPU seconds per round
SHARES = {"compress_loop": 0.40, "numpy_loop": 0.60}
# KPROF_PHASES=compress_loop runs one phase only (the benchmark's Python + libz + libc stack).
ONLY = [p for p in os.environ.get("KPROF_PHASES", "").split(",") if p]

# Compressible but not trivial: words from a small vocabulary, so deflate searches for matches.
_rng = random.Random(15)
_words = [bytes(_rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=_rng.randint(2, 9))) for _ in range(512)]
DATA = b" ".join(_rng.choice(_words) for _ in range(60_000))[: 1 << 18]
ARRAY = np.random.default_rng(15).random(1 << 20)
SCRATCH = np.empty_like(ARRAY)
used = {name: 0.0 for name in SHARES}


def compress_loop(until):
    n = 0
    while clock() < until:
        zlib.compress(DATA, 6)  # L:compress
        n += 1
    return n


def numpy_loop(until):
    n = 0
    while clock() < until:
        np.copyto(SCRATCH, ARRAY)
        SCRATCH.sort()  # L:sort
        n += 1
    return n


def run(seconds):
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        for name, phase in (("compress_loop", compress_loop), ("numpy_loop", numpy_loop)):
            if ONLY and name not in ONLY:
                continue
            c = clock()
            phase(c + SLICE * SHARES[name])
            used[name] += clock() - c
        rounds += 1
    return rounds


def main():
    seconds = float(sys.argv[1])
    out = sys.argv[2]
    print("READY", os.getpid(), flush=True)
    rounds = run(seconds)
    truth = dict(used)
    truth.update(
        rounds=rounds,
        numpy=np.__version__,
        numpy_dir=os.path.dirname(os.path.realpath(np.__file__)),
        zlib=zlib.ZLIB_RUNTIME_VERSION,
    )
    with open(out + ".tmp", "w") as f:
        json.dump(truth, f)
    os.rename(out + ".tmp", out)
    print("truth", json.dumps(truth), flush=True)


if __name__ == "__main__":
    main()
