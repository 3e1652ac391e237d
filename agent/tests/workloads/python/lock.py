"""Lock truth: two locks, each held by a holder thread that sleeps while holding it, and waiter
threads that block on them at two distinct sites (`wait_for_orders`, `wait_for_stock`). Every
waiter times its own acquire calls (time.monotonic). argv: seconds, output file (JSON:
{"sites": {site: waited seconds}, "waiters": {site: [native thread ids]}}).
"""
import json
import os
import sys
import threading
import time

RUN = float(sys.argv[1])
OUT = sys.argv[2]
orders, stock = threading.Lock(), threading.Lock()
stop = threading.Event()
waited = {"wait_for_orders": 0.0, "wait_for_stock": 0.0}
tids = {"wait_for_orders": [], "wait_for_stock": []}
count = threading.Lock()


def hold(lock, seconds):
    while not stop.is_set():
        with lock:
            time.sleep(seconds)
        time.sleep(0.001)


def wait_for_orders():
    t0 = time.monotonic()
    orders.acquire()
    return time.monotonic() - t0


def wait_for_stock():
    t0 = time.monotonic()
    stock.acquire()
    return time.monotonic() - t0


def waiter(site, lock):
    with count:
        tids[site.__name__].append(threading.get_native_id())
    total = 0.0
    while not stop.is_set():
        total += site()
        lock.release()
        time.sleep(0.002)
    with count:
        waited[site.__name__] += total


holders = [
    threading.Thread(target=hold, args=(orders, 0.03), daemon=True),
    threading.Thread(target=hold, args=(stock, 0.01), daemon=True),
]
waiters = [threading.Thread(target=waiter, args=(wait_for_orders, orders)) for _ in range(2)]
waiters += [threading.Thread(target=waiter, args=(wait_for_stock, stock)) for _ in range(2)]
for t in holders + waiters:
    t.start()
time.sleep(RUN)
stop.set()
for t in waiters:
    t.join()
with open(OUT + ".tmp", "w") as f:
    json.dump({"sites": waited, "waiters": tids}, f)
os.rename(OUT + ".tmp", OUT)
