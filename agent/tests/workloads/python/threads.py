"""Known-stack workload for the Python walker tests (agent/tests/python_walker.rs).

Lines are located by the `# L:<name>` markers: the tests read this file to learn the expected
line numbers, so reflowing is safe as long as the markers move with their lines.

Threads (OS thread names set with prctl so the profiler can show them):
  main       blocked in Thread.join
  py-busy    pure Python busy loop: busy -> K.meth -> leaf
  py-zlib    zlib.compress in a loop (releases the GIL, on CPU in libz)
  py-deep    recursion 60 deep, then sleeps (GIL released, off CPU)
"""
import ctypes
import os
import sys
import threading
import time
import zlib

DEPTH = 60


def set_os_thread_name(name):
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


def leaf(n):
    x = 0
    while True: x += n  # L:leaf


class K:
    def meth(self):
        leaf(1)  # L:meth


def busy():
    set_os_thread_name("py-busy")
    K().meth()  # L:busy


def compress_loop():
    set_os_thread_name("py-zlib")
    data = os.urandom(1 << 15) * 8
    while True:
        zlib.compress(data, 6)  # L:compress


def recurse(n):
    if n == 0:
        while True:
            time.sleep(1)  # L:sleep
    return recurse(n - 1)  # L:recurse


def deep():
    set_os_thread_name("py-deep")
    recurse(DEPTH)  # L:deep


threads = [
    threading.Thread(target=busy, name="py-busy", daemon=True),
    threading.Thread(target=compress_loop, name="py-zlib", daemon=True),
    threading.Thread(target=deep, name="py-deep", daemon=True),
]
for t in threads:
    t.start()
print("READY", os.getpid(), flush=True)
duration = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
threads[0].join(duration)  # L:join
