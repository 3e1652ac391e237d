"""Deep recursion, then a busy loop: tests the 128-frame budget of the kernel walker.

usage: deep.py DEPTH SECONDS
"""
import os
import sys
import time


def spin(seconds):
    end = time.time() + seconds
    x = 0
    while time.time() < end: x += 1  # L:spin


def down(n, seconds):
    if n == 0:
        return spin(seconds)  # L:bottom
    return down(n - 1, seconds)  # L:down


if __name__ == "__main__":
    depth, seconds = int(sys.argv[1]), float(sys.argv[2])
    print("READY", os.getpid(), flush=True)
    down(depth, seconds)
