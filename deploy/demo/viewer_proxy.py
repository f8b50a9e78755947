#!/usr/bin/env python3
"""OHIF Viewer and Orthanc's DICOMweb on one origin (Orthanc sends no CORS headers), standard library only.

    python deploy/demo/viewer_proxy.py --ohif-dist build/ohif/dist --orthanc http://127.0.0.1:8042 --port 3000

- ``/dicom-web/…`` and ``/wado…`` go to Orthanc; bodies are streamed both ways (multipart answers can be
  hundreds of MB), status and the headers a viewer needs (type, length, ranges, caching) pass through.
- ``/app-config.js`` is ``app-config.js`` beside this script (``--app-config``), never the dist's own,
  which points at a public demo server.
- Everything else is a file of OHIF's prebuilt ``dist/``; unknown paths get ``index.html`` (OHIF routes
  in the browser: ``/viewer?StudyInstanceUIDs=…``).

Paths carry study UIDs, so the log holds method, status and size only (``--quiet``: nothing).
For a demo on a trusted host: no authentication, no TLS (deploy/demo/nginx.conf is the container twin).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import mimetypes
import shutil
import sys
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

PROXIED = ("/dicom-web/", "/dicom-web?", "/wado")
CHUNK = 256 * 1024
REQUEST_HEADERS = ("Accept", "Range", "If-Range", "If-None-Match", "If-Modified-Since", "Content-Type")
RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "Cache-Control",
    "ETag",
    "Last-Modified",
    "Location",
)
TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".html": "text/html; charset=utf-8",
}


class ViewerProxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: OHIF loads a few hundred files
    server_version = "cxr-viewer-proxy"
    dist: Path
    app_config: bytes
    upstream: urllib.parse.SplitResult
    quiet = False

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:  # STOW-RS and Orthanc's own POSTs under /dicom-web/
        self._route()

    def _route(self) -> None:
        if self.path.startswith(PROXIED) or self.path == "/dicom-web":
            self._proxy()
        elif self.command == "POST":
            self.close_connection = True  # its body stays unread
            self._answer(405, b"", "text/plain")
        elif urllib.parse.urlsplit(self.path).path == "/app-config.js":
            self._answer(200, self.app_config, TYPES[".js"], cache="no-cache")
        else:
            self._static()

    # ------------------------------------------------------------------ OHIF's files

    def _static(self) -> None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        target = (self.dist / rel).resolve()
        if not rel or not target.is_relative_to(self.dist) or not target.is_file():
            target = self.dist / "index.html"  # client-side routes (and anything unknown)
        kind = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        size = target.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(size))
        # Bundles have content hashes in their names; index.html and the service worker must not stick.
        hashed = ".bundle." in target.name or target.suffix == ".wasm"
        self.send_header("Cache-Control", "public, max-age=86400" if hashed else "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            with target.open("rb") as fh:
                shutil.copyfileobj(fh, self.wfile, CHUNK)
        self._log(200, size)

    # ------------------------------------------------------------------ Orthanc

    def _proxy(self) -> None:
        headers = {name: value for name in REQUEST_HEADERS if (value := self.headers.get(name))}
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            headers["Content-Length"] = str(length)
        base = self.upstream.path.rstrip("/")
        host, port = self.upstream.hostname or "127.0.0.1", self.upstream.port
        conn = http.client.HTTPConnection(host, port, timeout=300)
        try:
            conn.putrequest(self.command, base + self.path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            _copy(self.rfile, conn.send, length)
            upstream = conn.getresponse()
        except OSError:
            conn.close()
            self._answer(502, b"Orthanc is not reachable\n", "text/plain")
            return
        try:
            self.send_response(upstream.status, upstream.reason)
            for name in RESPONSE_HEADERS:
                if (value := upstream.getheader(name)) is not None:
                    self.send_header(name, value)
            # No length from Orthanc (it streams): send chunks, http.client has already de-chunked them.
            chunked = upstream.getheader("Content-Length") is None and self.command != "HEAD"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            size = 0
            while self.command != "HEAD" and (block := upstream.read(CHUNK)):
                size += len(block)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self._log(upstream.status, size)
        finally:
            conn.close()

    # ------------------------------------------------------------------ helpers

    def _answer(self, status: int, body: bytes, kind: str, cache: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if cache:
            self.send_header("Cache-Control", cache)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status, len(body))

    def _log(self, status: int, size: int) -> None:
        if not self.quiet:
            sys.stderr.write(f"{self.command} {status} {size}\n")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _log above, without the path

    def log_message(self, format: str, *args: object) -> None:
        pass  # http.server's messages quote the request line (UIDs)


def _copy(source: BinaryIO, send: Callable[[bytes], None], length: int) -> None:
    """Forward a request body of ``length`` bytes in chunks."""
    while length > 0 and (block := source.read(min(CHUNK, length))):
        send(block)
        length -= len(block)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A browser that drops a connection (navigation, cancelled image loads) is no error worth a trace.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            sys.stderr.write(f"viewer proxy: {sys.exc_info()[0].__name__} while answering a request\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ohif-dist", required=True, type=Path, help="OHIF's prebuilt dist/ folder")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's base URL")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--app-config", type=Path, default=Path(__file__).with_name("app-config.js"))
    parser.add_argument("--quiet", action="store_true", help="log nothing")
    args = parser.parse_args(argv)
    dist = args.ohif_dist.resolve()
    if not (dist / "index.html").is_file():
        parser.error(f"{dist} is not OHIF's dist/ (no index.html)")
    upstream = urllib.parse.urlsplit(args.orthanc)
    if upstream.scheme != "http":
        parser.error("--orthanc must be an http:// URL")
    handler = type(
        "Handler",
        (ViewerProxy,),
        {"dist": dist, "app_config": args.app_config.read_bytes(), "upstream": upstream, "quiet": args.quiet},
    )
    server = Server((args.host, args.port), handler)
    sys.stdout.write(f"OHIF on http://{args.host}:{server.server_port}/ , DICOMweb from {args.orthanc}\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
