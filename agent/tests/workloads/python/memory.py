"""Memory a profiler must tell apart, with the truth measured by the program itself (its
anonymous resident memory, /proc/self/status RssAnon, before and after each part): a function
that builds a large cache and keeps it, one that keeps large byte buffers, one that allocates
and frees far more in short-lived objects, and one that leaks a little at a time. argv: output
file. It runs until killed; it rewrites the output with its truth every 0.2 s, with its
anonymous memory read before, during and after each round (it comes and goes with the
churner), pymalloc's arena count with it (sys._debugmallocstats), and the CLOCK_MONOTONIC time
of each reading."""
import json
import os
import re
from array import array
import sys
import time

OUT = sys.argv[1]
CACHE = {}
BUFFERS = []
LEAKED = []
truth = {"build_cache": 0, "keep_buffers": 0, "leak_step": 0, "churn_rounds": 0}
# The last readings, in place: an object kept while the churner's objects live would keep
# their arenas from being given back (a real effect, but not what this program shows).
KEEP = 300
reading_at = array("d", [0.0] * KEEP)
reading_anon = array("q", [0] * KEEP)
reading_arenas = array("q", [0] * KEEP)
readings = [0]
STATS = OUT + ".mallocstats"
ARENAS = re.compile(r"# arenas allocated current\s*=\s*([\d,]+)")


def arenas_now():
    """pymalloc's arena count, as the interpreter prints it (sys._debugmallocstats)."""
    fd = os.open(STATS, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    os.lseek(fd, 0, 0)
    text = os.read(fd, 1 << 20).decode()
    os.close(fd)
    m = ARENAS.search(text)
    return int(m.group(1).replace(",", "")) if m else -1


def read_now():
    i = readings[0] % KEEP
    reading_at[i] = time.monotonic()
    reading_anon[i] = rss_anon()
    reading_arenas[i] = arenas_now()
    readings[0] += 1


def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def build_cache(n):
    for i in range(n):
        CACHE[i] = ("entry-%08d" % i) * 4  # L:cache_entry


def keep_buffers(count, size):
    for i in range(count):
        BUFFERS.append(bytes([i + 1]) * size)  # L:buffer


def churn(objects):
    # Short-lived objects, many at once (a chain of small tuples: no one large array), dropped
    # at the end of the round: their arenas are given back and taken again every round.
    chain = None
    for i in range(objects):
        chain = (chain, ("tmp-%d" % i) * 8)  # L:churn_chain
    read_now()  # the most it holds
    return chain is not None


def leak_step(size):
    LEAKED.append(bytes([7]) * size)  # L:leak


def measured(name, fn, *args):
    before = rss_anon()
    fn(*args)
    truth[name] += rss_anon() - before


def write_truth():
    out = dict(truth)
    out["readings"] = [
        (reading_at[i], reading_anon[i], reading_arenas[i])
        for i in range(min(readings[0], KEEP))
    ]
    out["arena_bytes"] = (256 << 10) if sys.version_info < (3, 10) else (1 << 20)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, OUT)


measured("build_cache", build_cache, 500_000)
measured("keep_buffers", keep_buffers, 16, 4 << 20)
write_truth()
print("READY", flush=True)
last = time.monotonic()
while True:
    read_now()
    churn(100_000)
    read_now()
    truth["churn_rounds"] += 1
    measured("leak_step", leak_step, 256 << 10)
    time.sleep(0.02)
    if time.monotonic() - last >= 0.2:
        write_truth()
        last = time.monotonic()
