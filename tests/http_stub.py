"""A loopback HTTP server for tests: routes are plain functions of (method, path, body)."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Route = Callable[[str, str, bytes, dict], tuple[int, bytes, dict]]
CUT = "x-stub-cut"  # a route's extra header: send only this many bytes of the body, then close the connection


class StubServer:
    """Serves ``handler`` on 127.0.0.1 (a free port) in a thread; records every request."""

    def __init__(self, handler: Route):
        self.handler = handler
        self.requests: list[tuple[str, str, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.requests.append((method, self.path, headers))
                status, payload, extra = stub.handler(method, self.path, body, headers)
                cut = extra.pop(CUT, None)  # a body broken mid-transfer: the full length announced, part sent
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload if cut is None else payload[:cut])
                if cut is not None:
                    self.close_connection = True

            def do_GET(self):  # noqa: N802
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
