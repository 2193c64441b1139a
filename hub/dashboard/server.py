"""The dashboard's HTTP server: ``http.server.ThreadingHTTPServer`` in a daemon thread of the hub process.

Endpoints (GET and HEAD only; everything is read-only):

=================  ==========================================================================
``/``              the dashboard page (``static/index.html``; script and style from ``/static/``)
``/static/<f>``    ``app.js``, ``style.css`` (shipped in the package: works offline, no CDN)
``/api/state``     the fleet as JSON (``FleetReader.snapshot``); the page polls it every 2 s
``/metrics``       Prometheus text format (``metrics.render``)
``/healthz``       ``ok``
=================  ==========================================================================

With a token every request must carry it: ``Authorization: Bearer <token>``, ``?token=<token>`` (the page
then gets a same-site, HTTP-only cookie so that its script, style and polls carry it too), else 401. A server
on a non-loopback address refuses to start without a token.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from functools import cache
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from fedge.hub.dashboard.listen import MIN_TOKEN_CHARS, is_loopback, parse_listen, valid_token
from fedge.hub.dashboard.snapshot import FleetReader, PresenceBook
from fedge.protocol.errors import ConfigError, FedgeError

log = logging.getLogger("fedge.hub.http")

COOKIE = "fedge_dashboard_token"
STATIC: dict[str, str] = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
                          "index.html": "text/html; charset=utf-8"}
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # a ?token= URL never leaks through a Referer header
    "Cache-Control": "no-store",
}


@cache
def static_file(name: str) -> bytes:
    return (resources.files("fedge.hub.dashboard") / "static" / name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server_version = "fedge-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may sit idle or half-sent before its thread lets it go
    dashboard: ClassVar[DashboardServer]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    # -- authorization ----------------------------------------------------------------------------
    def _presented(self, query: dict[str, list[str]]) -> tuple[str | None, bool]:
        """The token the request carries and whether it came in the query string."""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), False
        if "token" in query:
            return query["token"][0], True
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
        except CookieError:
            morsel = None
        return (None if morsel is None else morsel.value), False

    # -- routing ------------------------------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        dash = self.dashboard
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        extra: dict[str, str] = {}
        if dash.token:
            given, in_query = self._presented(query)
            if given is None or not hmac.compare_digest(given.encode(), dash.token.encode()):
                self._send(HTTPStatus.UNAUTHORIZED, b"401: this dashboard needs its token (?token=... or "
                           b"Authorization: Bearer ...)\n", "text/plain; charset=utf-8",
                           extra={"WWW-Authenticate": 'Bearer realm="fedge"'}, body=body)
                return
            if in_query:
                extra["Set-Cookie"] = f"{COOKIE}={dash.token}; Path=/; HttpOnly; SameSite=Strict"
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, static_file("index.html"), STATIC["index.html"], extra=extra, body=body)
            elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC:
                name = path.removeprefix("/static/")
                self._send(HTTPStatus.OK, static_file(name), STATIC[name], extra=extra, body=body)
            elif path == "/api/state":
                data = json.dumps(dash.reader.snapshot(), separators=(",", ":")).encode()
                self._send(HTTPStatus.OK, data, "application/json", extra=extra, body=body)
            elif path == "/metrics":
                self._metrics(body, extra)
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8", extra=extra, body=body)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"404: not found\n", "text/plain; charset=utf-8", body=body)
        except Exception:
            log.exception("dashboard: %s failed", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"500: see the hub's log\n", "text/plain; charset=utf-8",
                       body=body)

    def _metrics(self, body: bool, extra: dict[str, str]) -> None:
        try:
            from fedge.hub.dashboard.metrics import render
        except ImportError:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"503: /metrics needs prometheus-client "
                       b"(pip install 'fedge[hub]')\n", "text/plain; charset=utf-8", body=body)
            return
        data, content_type = render(self.dashboard.reader)
        self._send(HTTPStatus.OK, data, content_type, extra=extra, body=body)

    def _send(self, status: HTTPStatus, data: bytes, content_type: str, *, extra: dict[str, str] | None = None,
              body: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class DashboardServer:
    """The read-only dashboard and ``/metrics`` of one hub store, served from a daemon thread.

    ``start()`` binds (a ``FedgeError`` names the address when it cannot) and serves; ``stop()`` shuts the
    server down and joins its thread. ``url`` is the address to open (with the real port when 0 was asked).
    """

    def __init__(self, reader: FleetReader, host: str = "127.0.0.1", port: int = 0, token: str = "") -> None:
        if not token and not is_loopback(host):
            raise ConfigError("http.token", f"is required when the dashboard listens on {host}, not a loopback "
                              "address")
        if token and not valid_token(token):
            raise ConfigError("http.token", f"must be at least {MIN_TOKEN_CHARS} of [A-Za-z0-9._~-]")
        self.reader, self.host, self.port, self.token = reader, host, port, token
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        handler = type("DashboardHandler", (_Handler,), {"dashboard": self})
        server_cls = _Server6 if ":" in self.host else ThreadingHTTPServer
        try:
            httpd = server_cls((self.host, self.port), handler)
        except OSError as exc:
            raise FedgeError(f"the dashboard cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="fedge-dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard on %s%s", self.url, " (token required)" if self.token else "")

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> DashboardServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_for_hub(cfg: Any, transport: Any | None = None) -> DashboardServer:
    """Start the dashboard of a hub (``cfg``: a HubConfig with ``http.listen`` set). With the hub's transport
    (before it connects) the devices' presences are watched too, for the model version each device holds."""
    from fedge.hub.config import HubConfig
    from fedge.protocol.topics import Topics

    if not isinstance(cfg, HubConfig) or not cfg.http.listen:
        raise ConfigError("http.listen", "is not set")
    host, port = parse_listen(cfg.http.listen)
    presence = None
    if transport is not None:
        presence = PresenceBook(cfg.fleet)
        transport.subscribe(Topics(cfg.fleet).presence_all, presence.on_presence)
    reader = FleetReader(cfg.state_dir / "hub.sqlite", fleet=cfg.fleet, privacy=cfg.privacy, presence=presence)
    server = DashboardServer(reader, host, port, cfg.http.token)
    server.start()
    return server


__all__ = ["COOKIE", "DashboardServer", "start_for_hub", "static_file"]
