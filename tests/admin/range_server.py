"""A loopback HTTP file server with Range support, throttling and scripted failures.

Used to pull models in the admin tests: ``RangeServer(path, rate=...)`` serves ``path`` at
``server.url``; ``drop_after`` cuts the first response after that many bytes (to test
resuming), ``ignore_range`` answers every request with the whole file.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["RangeServer"]


class RangeServer:
    def __init__(
        self,
        path: Path,
        *,
        rate: float = 0.0,
        drop_after: int = 0,
        ignore_range: bool = False,
        status: int = 200,
    ) -> None:
        self.path = path
        self.rate = rate
        self.drop_after = drop_after
        self.ignore_range = ignore_range
        self.status = status
        self.ranges: list[str | None] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/files/{self.path.name}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = owner.path.read_bytes()
                wanted = self.headers.get("Range")
                owner.ranges.append(wanted)
                if owner.status != 200:
                    self.send_response(owner.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
                if match and not owner.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                drop = owner.drop_after if len(owner.ranges) == 1 else 0
                sent, step = 0, 16 * 1024
                for offset in range(start, len(data), step):
                    chunk = data[offset : offset + step]
                    if drop and sent + len(chunk) > drop:
                        self.wfile.write(chunk[: drop - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        return  # cut: fewer bytes than Content-Length promised
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    sent += len(chunk)
                    if owner.rate:
                        time.sleep(len(chunk) / owner.rate)

        return Handler
