"""The test bed's default Python workload: a tiny HTTP server.

Env: PORT (default 8080), BIND (default 0.0.0.0; set it to the pod IP via the downward API),
MESSAGE (added to every answer). Logs one line per request to stdout.
"""
import http.server
import os
import socket
import sys

PORT = int(os.environ.get("PORT", "8080"))
BIND = os.environ.get("BIND", "0.0.0.0")
MESSAGE = os.environ.get("MESSAGE", "")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"kprof-testbed ok path={self.path} host={socket.gethostname()} {MESSAGE}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"request {self.command} {self.path} from {self.client_address[0]}", flush=True)


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer((BIND, PORT), Handler)
    print(f"kprof-testbed app listening on {BIND}:{PORT} (python {sys.version.split()[0]})", flush=True)
    server.serve_forever()
