"""Wall-clock truth: one named worker thread cycles through CPU work, a timed sleep, a blocking
read of a pipe and a wait on a queue, timing each phase itself (time.monotonic). A feeder thread
answers the read and the queue after a delay. At the end the worker writes its native thread id
and the seconds of each phase as JSON to the file given (argv[2]); argv[1] is the run time.
"""
import json
import os
import queue
import sys
import threading
import time

RUN = float(sys.argv[1])
OUT = sys.argv[2]

r, w = os.pipe()
q = queue.Queue()
want_read = threading.Event()
want_item = threading.Event()
stop = threading.Event()


def feeder():
    while not stop.is_set():
        if not want_read.wait(0.5):
            continue
        want_read.clear()
        time.sleep(0.03)
        os.write(w, b"x")
        want_item.wait()
        want_item.clear()
        time.sleep(0.05)
        q.put(1)


def burn(seconds):
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1
    return x


def worker():
    phases = {"cpu": 0.0, "sleep": 0.0, "read": 0.0, "queue": 0.0}
    deadline = time.monotonic() + RUN
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        burn(0.05)
        t1 = time.monotonic()
        time.sleep(0.04)
        t2 = time.monotonic()
        want_read.set()
        os.read(r, 1)
        t3 = time.monotonic()
        want_item.set()
        q.get()
        t4 = time.monotonic()
        phases["cpu"] += t1 - t0
        phases["sleep"] += t2 - t1
        phases["read"] += t3 - t2
        phases["queue"] += t4 - t3
    stop.set()
    with open(OUT + ".tmp", "w") as f:
        json.dump({"tid": threading.get_native_id(), "phases": phases}, f)
    os.rename(OUT + ".tmp", OUT)


threading.Thread(target=feeder, name="feeder", daemon=True).start()
t = threading.Thread(target=worker, name="mixer")
t.start()
t.join()
