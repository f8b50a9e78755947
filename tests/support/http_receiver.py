"""A real HTTP receiver for tests (http.server in a thread): records each POST and answers with the
statuses the test lines up (the last one repeats); the webhook check verifies the HMAC signature."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool | None = None


OUTCOME_422 = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "processing", "diagnostics": "Unknown subject identifier"}],
}


@dataclass
class HttpReceiver:
    statuses: list[int] = field(default_factory=lambda: [201])
    # For webhooks: (headers, body) -> signature valid?
    verify: Callable[[dict[str, str], bytes], bool] | None = None
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}  # names are case-insensitive
                req = Request(self.path, headers, body, time.monotonic())
                if receiver.verify is not None:
                    req.verified = receiver.verify(headers, body)
                receiver.requests.append(req)
                status = receiver.statuses[min(len(receiver.requests), len(receiver.statuses)) - 1]
                if receiver.verify is not None and not req.verified:
                    status = 401
                payload: dict[str, Any] = (
                    OUTCOME_422
                    if status in (400, 422)
                    else {"resourceType": "Bundle", "type": "transaction-response"}
                )
                out = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *_: Any) -> None:  # quiet
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
