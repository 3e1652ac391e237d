"""A small checkout web service with a known hot path, for the kprof demo.

GET /checkout prices a cart (most of the CPU), renders a receipt (about a third as much),
archives it with zlib (the GIL is released inside zlib.compress) and reserves stock under a
lock held across a slow inventory call (the lock the wall and lock profiles show). Every receipt
is also kept in memory, up to a bound: a leak the memory profile shows. The receipts are kept in
native buffers the shop reports to tracemalloc (PyTraceMalloc_Track), as NumPy does for its
arrays: the memory profile's allocation probes see them. Two load
threads call the service on 127.0.0.1, so requests overlap and the demo needs no traffic from
outside the pod.
"""

import ctypes
import http.client
import http.server
import json
import os
import threading
import time
import zlib

PORT = int(os.environ.get("PORT", "8765"))


def price_cart(items):
    """The hot function: prices every item with a tax and discount rule."""
    total = 0.0
    for _ in range(100):
        for sku, qty in items:
            price = (sku * 7919) % 1000 / 10.0
            if qty > 3:
                price *= 0.9
            total += price * qty * 1.2
    return total


def render_receipt(items, total):
    lines = []
    for _ in range(12):
        lines = [f"{sku:>8} x{qty:<3} {((sku * 7919) % 1000) / 10.0:>8.2f}" for sku, qty in items]
    lines.append(f"TOTAL {total:.2f}")
    return "\n".join(lines)


# Every receipt ever rendered, kept "for auditing": the service's memory grows with its traffic
# (bounded here so a demo left running stays small).
RECEIPTS = []
MAX_RECEIPTS = 20_000
# Each kept in a native buffer reported to tracemalloc, the way extensions report theirs.
TRACK = ctypes.pythonapi.PyTraceMalloc_Track
TRACK.argtypes = [ctypes.c_uint, ctypes.c_size_t, ctypes.c_size_t]
ARCHIVE_DOMAIN = 0x5C0B


def archive_receipt(receipt):
    if len(RECEIPTS) < MAX_RECEIPTS:
        kept = ctypes.create_string_buffer(receipt.encode())
        TRACK(ARCHIVE_DOMAIN, ctypes.addressof(kept), ctypes.sizeof(kept))
        RECEIPTS.append(kept)
    return zlib.compress((receipt * 16).encode(), 9)


STOCK_LOCK = threading.Lock()
# Checkouts served (GET /stats), for benchmarks.
SERVED = [0]
SERVED_LOCK = threading.Lock()


def reserve_stock(items):
    """Holds the stock lock across a (simulated) inventory call: concurrent checkouts queue here."""
    with STOCK_LOCK:
        time.sleep(0.002)
        return len(items)


def checkout():
    items = [(sku, sku % 5 + 1) for sku in range(1, 400)]
    total = price_cart(items)
    receipt = render_receipt(items, total)
    archived = archive_receipt(receipt)
    reserve_stock(items)
    return {"total": round(total, 2), "archived_bytes": len(archived)}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok"
        elif self.path == "/checkout":
            body = json.dumps(checkout()).encode()
            with SERVED_LOCK:
                SERVED[0] += 1
        elif self.path == "/stats":
            body = json.dumps({"checkouts": SERVED[0]}).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def generate_load():
    time.sleep(1)
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
            while True:
                conn.request("GET", "/checkout")
                conn.getresponse().read()
        except OSError:
            time.sleep(0.5)


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    for i in range(2):
        threading.Thread(target=generate_load, name=f"load-{i}", daemon=True).start()
    print(f"shop listening on 127.0.0.1:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
