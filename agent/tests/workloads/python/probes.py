"""Allocations reported to CPython's PyTraceMalloc_Track, the call NumPy makes for every array
it allocates, with the truth counted by the program itself. argv: output file, seconds.

After a second of idling (so that the profiler has attached its probes), for `seconds`:
`keep_blocks` reports 64 KiB blocks at fresh addresses and never frees them; `churn_blocks`
reports 16 KiB blocks and frees each at once (through ctypes, so on every interpreter); with
NumPy importable, `keep_arrays` allocates 256 KiB arrays and keeps them, `churn_arrays`
allocates and drops 64 KiB ones. Then it writes the bytes each function reported (and what it
still holds) as JSON, prints DONE and idles."""
import ctypes
import json
import sys
import time

OUT = sys.argv[1]
SECONDS = float(sys.argv[2])
DOMAIN = 389047  # NumPy's tracemalloc domain; any unsigned int will do

track = ctypes.pythonapi.PyTraceMalloc_Track
track.argtypes = [ctypes.c_uint, ctypes.c_size_t, ctypes.c_size_t]
untrack = ctypes.pythonapi.PyTraceMalloc_Untrack
untrack.argtypes = [ctypes.c_uint, ctypes.c_size_t]

try:
    import numpy as np
except ImportError:
    np = None

truth = {"keep_blocks": 0, "churn_blocks": 0, "keep_arrays": 0, "churn_arrays": 0,
         "numpy": np is not None and np.__version__}
KEPT = []
next_block = [0x100000000]


def keep_blocks(n):
    for _ in range(n):
        track(DOMAIN, next_block[0], 65536)  # L:keep_block
        next_block[0] += 65536
    truth["keep_blocks"] += n * 65536


def churn_blocks(n):
    for i in range(n):
        at = 0x7000_0000_0000 + (i % 64) * 16384
        track(DOMAIN, at, 16384)  # L:churn_block
        untrack(DOMAIN, at)
    truth["churn_blocks"] += n * 16384


def keep_arrays(n):
    for _ in range(n):
        a = np.ones(32768)  # 256 KiB  L:keep_array
        KEPT.append(a)
        truth["keep_arrays"] += a.nbytes


def churn_arrays(n):
    for _ in range(n):
        a = np.ones(8192)  # 64 KiB  L:churn_array
        truth["churn_arrays"] += a.nbytes
        del a


time.sleep(1.0)
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    keep_blocks(20)
    churn_blocks(80)
    if np is not None and len(KEPT) < 400:  # 100 MiB kept at most
        keep_arrays(2)
        churn_arrays(8)
with open(OUT + ".tmp", "w") as f:
    json.dump(truth, f)
import os  # noqa: E402

os.replace(OUT + ".tmp", OUT)
print("DONE", flush=True)
time.sleep(60)
