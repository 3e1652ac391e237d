"""Bad cases for the off-CPU source: a thread that exits while others wait, waiters that are
killed mid-wait by an exec, and the new image running on. argv: output file; writes the native
ids of the waiters killed by the exec before it."""
import json
import os
import sys
import threading
import time

OUT = sys.argv[1]
forever = threading.Event()
lock = threading.Lock()


def short_wait():
    with lock:
        pass


lock.acquire()
short = threading.Thread(target=short_wait, name="short")
short.start()
time.sleep(0.5)
lock.release()
short.join()  # exited after waiting half a second

ids = []
for i in range(3):
    t = threading.Thread(target=forever.wait, name=f"forever-{i}", daemon=True)
    t.start()
    ids.append(t.native_id)
time.sleep(1.5)
with open(OUT, "w") as f:
    json.dump({"killed": ids, "short": short.native_id}, f)
# The exec ends the waiting threads mid-wait; the same process then runs new code.
os.execv(sys.executable, [sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
