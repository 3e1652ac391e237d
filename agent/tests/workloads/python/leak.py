"""Threads a profiler must count and name: a pool of named workers, a function that starts a
new named thread every half second which then blocks forever (a leak), and threads that start
and exit at once. argv: output file. It runs until killed; every 0.2 s it rewrites the output
with its measured truth: its thread count (/proc/self/task) over time, how many threads it
created and how many exited, the names Python gives its threads and the leaked threads' ids."""
import json
import os
import sys
import threading
import time

OUT = sys.argv[1]
forever = threading.Event()
counts = {"created": 0, "exited": 0}
count_lock = threading.Lock()


def started():
    with count_lock:
        counts["created"] += 1


def work(n):
    while True:
        sum(i * i for i in range(n))  # L:pool_work
        time.sleep(0.01)


def blocked_forever():
    forever.wait()  # L:leaked_wait


def leak_one(i):
    t = threading.Thread(target=blocked_forever, name=f"leaked-{i}", daemon=True)
    started()
    t.start()  # L:leak_start
    return t


def leaker():
    i = 0
    while True:
        leaked.append(leak_one(i).native_id)
        i += 1
        time.sleep(0.5)


def flash():
    pass


def flasher():
    while True:
        for _ in range(5):
            t = threading.Thread(target=flash, name="flash")
            started()
            t.start()  # L:flash_start
            t.join()
            with count_lock:
                counts["exited"] += 1
        time.sleep(0.2)


leaked = []
pool = [threading.Thread(target=work, args=(2000,), name=f"pool-{i}", daemon=True) for i in range(3)]
pool.append(threading.Thread(target=work, args=(2000,), name="a-pool-worker-with-a-long-name-0123456789", daemon=True))
for t in pool:
    started()
    t.start()
for target in (leaker, flasher):
    started()
    threading.Thread(target=target, name=target.__name__, daemon=True).start()

samples = []
while True:
    with count_lock:
        c = dict(counts)
    samples.append({
        "t": time.monotonic(),
        "count": len(os.listdir("/proc/self/task")),
        **c,
    })
    names = {str(t.native_id): t.name for t in threading.enumerate() if t.name != "flash"}
    with open(OUT + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "samples": samples, "leaked": leaked, "names": names}, f)
    os.rename(OUT + ".tmp", OUT)
    time.sleep(0.2)
