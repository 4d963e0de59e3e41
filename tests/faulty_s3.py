"""A fault-injecting HTTP proxy in front of an S3 API (moto's server in the tests).

It forwards each request to the upstream endpoint unchanged, except those its
`FaultPlan` picks: answered `503 SlowDown` (S3's throttling reply), reset (the
connection closed with a TCP RST and no answer), or stalled (held `stall_s` seconds
before being forwarded, so a client with a shorter read timeout gives up and
retries). An outage (`outage_for`) fails every request for a while. Which requests
fail is decided by their number, so a run is repeatable; `counts` says how many of
each fault were injected.

    proxy = FaultyS3Proxy("http://127.0.0.1:5000")
    proxy.plan = FaultPlan(slowdown_every=7, reset_every=11, stall_every=23, stall_s=3)
    endpoint = proxy.start()  # point storage_options' endpoint_url here
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>faulty-s3-proxy</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class FaultPlan:
    """Every n-th request gets that fault (0: never); checked in this order."""

    slowdown_every: int = 0
    reset_every: int = 0
    stall_every: int = 0
    stall_s: float = 0.0
    outage_kind: str = "slowdown"  # what an outage answers: "slowdown" or "reset"


class FaultyS3Proxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.plan = FaultPlan()
        self.counts: Counter[str] = Counter()
        self._requests = 0
        self._outage_until = 0.0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- control ----------------------------------------------------------------------

    def start(self) -> str:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def outage_for(self, seconds: float) -> None:
        """Fail every request (as `plan.outage_kind`) for the next `seconds`."""
        self._outage_until = time.monotonic() + seconds

    def end_outage(self) -> None:
        self._outage_until = 0.0

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self._requests = 0

    # --- deciding ---------------------------------------------------------------------

    def fault_for_next(self) -> str | None:
        """The fault for the next request, counted: slowdown, reset, stall or None."""
        with self._lock:
            self._requests += 1
            self.counts["requests"] += 1
            number, plan = self._requests, self.plan
            if time.monotonic() < self._outage_until:
                fault = f"outage-{plan.outage_kind}"
            elif plan.slowdown_every and number % plan.slowdown_every == 0:
                fault = "slowdown"
            elif plan.reset_every and number % plan.reset_every == 0:
                fault = "reset"
            elif plan.stall_every and number % plan.stall_every == 0:
                fault = "stall"
            else:
                return None
            self.counts[fault] += 1
            return fault


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultyS3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" is answered

    def log_message(self, format: str, *args) -> None:
        return  # quiet

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if not size:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Close with a TCP RST and no answer: what a dropped connection looks like."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _slow_down(self) -> None:
        self.send_response(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(SLOW_DOWN)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(SLOW_DOWN)

    def _forward(self, body: bytes) -> None:
        connection = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers.pop("Expect", None)
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        self.send_response(response.status, response.reason)
        head = self.command == "HEAD"  # its Content-Length is the object's, with no body
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and (head or key.lower() != "content-length"):
                self.send_header(key, value)
        if not head:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _handle(self) -> None:
        fault = self.owner.fault_for_next()
        try:
            body = self._body()
            if fault in ("reset", "outage-reset"):
                self._reset()
                return
            if fault in ("slowdown", "outage-slowdown"):
                self._slow_down()
                return
            if fault == "stall":
                time.sleep(self.owner.plan.stall_s)
            self._forward(body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True  # the client gave up (a stalled request timed out)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
