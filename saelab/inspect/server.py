"""Serve a feature browser on http://127.0.0.1:<port>/: its static files, and with a `LiveModel` the text box's
API (the static site works without it, from disk or served).

    GET  /api/info    {"live": bool, ...}
    POST /api/run     {"text": str, "latent": int | null} -> `LiveModel.run` (400 with {"error": ...} on bad input)

Requests are not logged unless `log_requests` (the page loads hundreds of small data files).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
from pathlib import Path
from typing import Any

from saelab.inspect.live import LiveModel

#: Largest request body accepted (bytes).
MAX_BODY = 1 << 16


class InspectServer(http.server.ThreadingHTTPServer):
    """The HTTP server, holding the live model (or None) and whether to log requests."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, live: LiveModel | None, log_requests: bool):
        super().__init__(address, handler)
        self.live, self.log_requests = live, log_requests


class InspectHandler(http.server.SimpleHTTPRequestHandler):
    server: InspectServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.log_requests:
            super().log_message(format, *args)

    def _json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/api/info":
            live = self.server.live
            self._json(200, live.info() if live is not None else {"live": False})
            return
        super().do_GET()

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/api/run":
            self._json(404, {"error": f"no such API: {self.path}"})
            return
        if self.server.live is None:
            self._json(
                404, {"error": "this server has no model: serve with a model and an SAE for the text box."}
            )
            return
        try:
            request = self._read_request()
            self._json(200, self.server.live.run(request["text"], request["latent"]))
        except ValueError as err:
            self._json(400, {"error": str(err)})

    def _read_request(self) -> dict[str, Any]:
        """The checked JSON body: text (non-empty string), latent (int or null)."""
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise ValueError(f"the request body must hold 1 to {MAX_BODY} bytes of JSON, got {length}.")
        try:
            body = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as err:
            raise ValueError(f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise ValueError('the request body must be a JSON object {"text": ..., "latent": ...}.')
        text, latent = body.get("text"), body.get("latent")
        if not isinstance(text, str) or not text.strip():
            raise ValueError('"text" must be a non-empty string.')
        if latent is not None and (isinstance(latent, bool) or not isinstance(latent, int)):
            raise ValueError(f'"latent" must be a latent id (an integer) or null, got {latent!r}.')
        return {"text": text, "latent": latent}


def make_server(
    site: str | Path, port: int = 8000, live: LiveModel | None = None, log_requests: bool = False
) -> InspectServer:
    """An HTTP server for the site folder bound to 127.0.0.1:<port> (0: any free port); not yet serving."""
    handler = functools.partial(InspectHandler, directory=str(site))
    return InspectServer(("127.0.0.1", port), handler, live, log_requests)


def serve(
    site: str | Path, port: int = 8000, live: LiveModel | None = None, log_requests: bool = False
) -> None:
    """Serve the site until interrupted (Ctrl-C)."""
    with make_server(site, port, live, log_requests) as server:
        host, bound = server.server_address[:2]
        extra = " with the text box" if live is not None else ""
        print(f"serving {site} on http://{host}:{bound}/{extra} (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
