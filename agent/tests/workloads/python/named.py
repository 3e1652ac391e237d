"""Named-thread workload for agent/tests/python_threads.rs.

Usage: named.py <truth.json> [seconds] [--bare | --churn]

Starts idle threads with names of every storage kind CPython has (ASCII, latin-1, UCS-2,
UCS-4), a 40-character name, a thread renamed after it started, one with the default name, and
two whose attributes left the compact per-type storage (`__dict__` materialised; 40 extra
attributes). Once every thread is in `threading._active`, writes what Python itself sees —
`{"threading_imported": bool, "threads": [{"native_id", "ident", "name"}]}` — to <truth.json>,
then prints READY and idles for [seconds].

With --bare, never imports threading (start-up code still may: "threading_imported" says) and
writes no threads. With --churn, keeps starting short-lived threads and renaming a long-lived
one, so that the reader meets `_active` and thread attributes mid-mutation.
"""
import json
import os
import sys
import time

PATH = sys.argv[1]
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0


def report(truth):
    with open(PATH + ".tmp", "w", encoding="utf-8") as f:
        json.dump(truth, f)
    os.replace(PATH + ".tmp", PATH)
    print("READY", os.getpid(), flush=True)


if "--bare" in sys.argv:
    report({"threading_imported": "threading" in sys.modules, "threads": []})
    time.sleep(SECONDS)
    sys.exit(0)

import threading  # noqa: E402

NAMES = [
    "worker-0",
    "worker-1",
    "worker-2",
    "long-name-" + "x" * 30,  # 40 characters
    "wörker-ü",  # latin-1
    "поток-7",  # UCS-2
    "🧵-spool",  # UCS-4
]

stop = threading.Event()
started = threading.Barrier(len(NAMES) + 3)


def idle():
    started.wait()
    stop.wait()


threads = [threading.Thread(target=idle, name=n, daemon=True) for n in NAMES]
renamed = threading.Thread(target=idle, name="to-be-renamed", daemon=True)
unnamed = threading.Thread(target=idle, daemon=True)
threads += [renamed, unnamed]
for t in threads:
    t.start()
# A thread runs its target only once it is in threading._active.
started.wait()
renamed.name = "renamed"
threads[1].__dict__["extra"] = 1
for i in range(40):
    setattr(threads[2], "attr%d" % i, i)

if "--churn" in sys.argv:
    report({"threading_imported": True, "threads": []})
    deadline = time.monotonic() + SECONDS
    n = 0
    while time.monotonic() < deadline:
        n += 1
        renamed.name = "renamed-%d" % n
        short = [
            threading.Thread(target=len, args=("x",), name="short-%d" % n)
            for _ in range(4)
        ]
        for t in short:
            t.start()
        for t in short:
            t.join()
    sys.exit(0)

report(
    {
        "threading_imported": True,
        "threads": [
            {"native_id": t.native_id, "ident": t.ident, "name": t.name}
            for t in threading.enumerate()
        ],
    }
)
stop.wait(SECONDS)
