"""GIL truth: N threads run pure Python for a while, so they take turns with the GIL. Each
measures its own CPU time (time.thread_time) and wall time over its loop; argv: seconds,
threads, output file (JSON: {"window": seconds, "threads": [{"tid", "cpu", "wall"}]}).
"""
import json
import os
import sys
import threading
import time

RUN = float(sys.argv[1])
N = int(sys.argv[2])
OUT = sys.argv[3]
results = []
start = threading.Barrier(N + 1)


def spin():
    start.wait()
    w0, c0 = time.monotonic(), time.thread_time()
    deadline = w0 + RUN
    x = 0
    while time.monotonic() < deadline:
        for _ in range(200):
            x += 1
    results.append(
        {
            "tid": threading.get_native_id(),
            "cpu": time.thread_time() - c0,
            "wall": time.monotonic() - w0,
        }
    )


threads = [threading.Thread(target=spin, name=f"spin-{i}") for i in range(N)]
for t in threads:
    t.start()
w0 = time.monotonic()
start.wait()
for t in threads:
    t.join()
with open(OUT + ".tmp", "w") as f:
    json.dump({"window": time.monotonic() - w0, "threads": results}, f)
os.rename(OUT + ".tmp", OUT)
