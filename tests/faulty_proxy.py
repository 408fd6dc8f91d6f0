"""A loopback HTTP proxy that answers 503 to (or drops) a share of requests, for storage faults,
(``rate``) throttles every byte it carries to one shared link of that many bytes per second, and
(``stall``/``resume``) holds every request without an answer until resumed, as a stalled network
path does."""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import sys
import threading
import time
from urllib.parse import urlsplit


class FaultyProxy:
    """Forwards to ``upstream``; request n fails when ``n % every == 0``: a 503, a dropped socket,
    or (``mixed``) the two in turn."""

    def __init__(self, upstream: str, every: int = 3, mode: str = "503", rate: float | None = None):
        self.upstream = urlsplit(upstream)
        self.every, self.mode, self.rate = every, mode, rate
        self.link_free_at = 0.0  # the shared link: when it has carried every byte booked so far
        self.count = self.failed = 0
        self.lock = threading.Lock()
        self.flowing = threading.Event()
        self.flowing.set()
        self.in_flight = 0  # requests past the gate and not yet answered
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()  # no Nagle: headers and body go out as separate writes
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.carry(len(body))
                proxy.flowing.wait()  # a stalled path: the request waits, unanswered
                with proxy.lock:
                    proxy.in_flight += 1
                try:
                    self._forward(body)
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def _forward(self, body: bytes):
                with proxy.lock:
                    proxy.count += 1
                    fail = proxy.every > 0 and proxy.count % proxy.every == 0
                    if fail:
                        proxy.failed += 1
                    drop = proxy.mode == "drop" or (proxy.mode == "mixed" and proxy.failed % 2 == 0)
                if fail and drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fail:
                    msg = b'{"error": {"code": 503, "message": "injected"}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                proxy.carry(len(data))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                if isinstance(sys.exc_info()[1], ConnectionError):  # a killed client: expected here
                    return
                super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def carry(self, nbytes: int) -> None:
        """Hold a transfer of ``nbytes`` for its share of the shared link's time (``rate``)."""
        if not self.rate or not nbytes:
            return
        with self.lock:
            start = max(time.monotonic(), self.link_free_at)
            self.link_free_at = start + nbytes / self.rate
            done = self.link_free_at
        time.sleep(max(0.0, done - time.monotonic()))

    def stall(self) -> None:
        """Hold every request (those in flight and new ones) unanswered until :meth:`resume`."""
        self.flowing.clear()

    def settled(self) -> bool:
        """Stalled, and no request that passed the gate before the stall is still under way:
        from now on nothing reaches the upstream until :meth:`resume`."""
        with self.lock:
            return not self.flowing.is_set() and self.in_flight == 0

    def resume(self) -> None:
        self.flowing.set()

    def stop(self) -> None:
        self.flowing.set()
        self.server.shutdown()
        self.server.server_close()
