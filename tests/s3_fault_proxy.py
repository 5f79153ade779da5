"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server (tests and benchmarks/chaos.py).

Every request is forwarded to the upstream endpoint unless a fault is chosen for it:
- `503`: an S3 `SlowDown` error answer (what a throttled or overloaded store sends);
- `500`: an S3 `InternalError` answer;
- `reset`: the connection is closed without an answer (a dropped connection / reset);
- `slow`: the answer comes after `slow_s` seconds;
- `403` / `expired`: `AccessDenied` / `ExpiredToken` answers (credential failures; only by rule).

Faults come from `rules` (method + path substring -> kind, for a time window or a number of hits) and
otherwise at random, each kind at its rate, from a seeded generator. Counters per kind are kept. A test
double of the network between the trainer and the store, not of the store: the S3 server behind it is real.
"""
from __future__ import annotations

import http.client
import http.server
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

_S3_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
    "expired": (400, "ExpiredToken", "The provided token has expired."),
}


@dataclass
class Rule:
    kind: str
    method: str = ""  # "" = any
    path: str = ""  # substring of the request path; "" = any
    until: float = float("inf")  # time.monotonic() deadline
    hits: int = -1  # remaining hits; -1 = unlimited (until the deadline)


@dataclass
class FaultProxy:
    upstream: str
    seed: int = 0
    rates: dict = field(default_factory=dict)  # kind -> probability per request (503, 500, reset, slow)
    slow_s: float = 1.0
    rules: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    requests: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        up = urlparse(self.upstream)
        self._up = (up.hostname, up.port)
        self._server: Optional[http.server.ThreadingHTTPServer] = None

    # ------------------------------------------------------------------------------------------- control
    def add_rule(self, kind: str, method: str = "", path: str = "", seconds: float = float("inf"),
                 hits: int = -1) -> None:
        with self._lock:
            self.rules.append(Rule(kind, method, path, time.monotonic() + seconds, hits))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _choose(self, method: str, path: str) -> Optional[str]:
        with self._lock:
            self.requests += 1
            now = time.monotonic()
            for r in list(self.rules):
                if now > r.until or r.hits == 0:
                    self.rules.remove(r)
                    continue
                if (not r.method or r.method == method) and r.path in path:
                    if r.hits > 0:
                        r.hits -= 1
                    return self._count(r.kind)
            x = self._rng.random()
            for kind, rate in sorted(self.rates.items()):
                if x < rate:
                    return self._count(kind)
                x -= rate
        return None

    def _count(self, kind: str) -> str:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return kind

    # -------------------------------------------------------------------------------------------- server
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                fault = proxy._choose(self.command, self.path)
                if fault == "reset":
                    self.close_connection = True
                    try:
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if fault in _S3_ERRORS:
                    status, code, msg = _S3_ERRORS[fault]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}'
                           f'</Message><RequestId>fault</RequestId></Error>').encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",
                                                                                      "connection", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy._up, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
