"""The HTTP server: uvicorn that trusts only listed proxies, closes slow clients and caps connections."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from workers.runtime.settings import Settings

log = logging.getLogger(__name__)


def server_config(
    app: ASGIApp, settings: Settings, host: str, port: int, **options: Any
) -> uvicorn.Config:
    """uvicorn's configuration for the loket app: every server loket starts is made here.

    Forwarded headers (`X-Forwarded-For`, `X-Forwarded-Proto`) count only from the proxies in
    `LOKET_TRUSTED_PROXIES`; uvicorn's own default would trust any local client. Logging is
    left to loket's handlers (log_config=None), so uvicorn's lines are formatted and redacted
    like every other.
    """
    proxies = settings.trusted_proxy_list()
    limits = {
        "header_timeout": settings.http_header_timeout,
        "body_timeout": settings.http_body_timeout,
        "max_connections": settings.http_max_connections,
    }
    defaults: dict[str, Any] = {
        "log_config": None, "log_level": "warning", "access_log": False, "lifespan": "off",
        # At stop, requests still running get this long before they are cut (Ctrl-C < 3 s).
        "timeout_graceful_shutdown": 1.5,
    }  # fmt: skip
    return uvicorn.Config(
        QuietDisconnects(app),
        host=host,
        port=port,
        http=type("LoketHttpProtocol", (GuardedHttpToolsProtocol,), limits),
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
        **(defaults | options),
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines and a connection cap.

    uvicorn has a keep-alive timeout but nothing for a client that opens a connection and
    sends its headers or body a byte at a time, no bound on the size of the headers, and it
    refuses no connection (it answers 503 once a request's headers are in, which a slow
    client never sends). The header deadline runs from the connection, or from the first byte
    of the next request on it, to the end of the headers; the body deadline from there to the
    end of the body.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    max_header_bytes = 64 * 1024
    _refused_since_report = 0
    _last_refusal_report = 0.0

    _deadline: asyncio.TimerHandle | None = None
    _awaiting_headers = True
    _request_begun = False
    _header_bytes = 0
    _closed_by_us = False  # whatever else arrives is ignored

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._request_begun and not self._awaiting_headers and not self._closed_by_us:
            # One line, whatever the app makes of the missing body (QuietDisconnects).
            log.info("client %s disconnected before sending the whole request: %s %s",
                     self._peer(), self.scope["method"], self.scope["path"])  # fmt: skip
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed_by_us:
            return
        super().data_received(data)
        if self._awaiting_headers and not self._closed_by_us:
            # Counted after parsing: a chunk that ends inside the headers is all header bytes.
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                log.warning("closed the connection from %s: request headers over %d bytes",
                            self._peer(), self.max_header_bytes)  # fmt: skip
                self._answer_and_close(431, b"Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if not self._awaiting_headers:  # a keep-alive connection's next request
            self._awaiting_headers, self._header_bytes = True, 0
            self._arm(self.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        if self._closed_by_us:
            return
        self._awaiting_headers = False
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            self._arm(self.body_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        if not self._closed_by_us:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._closed_by_us:
            return
        self._disarm()
        self._request_begun = False
        super().on_message_complete()

    def _arm(self, seconds: float, expired: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _peer(self) -> str:
        return self.client[0] if self.client else "-"

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._request_begun:  # an idle connection (a browser's preconnect, say)
            log.debug(
                "closed an idle connection from %s after %g s", self._peer(), self.header_timeout
            )
            self._closed_by_us = True
            self.transport.close()
            return
        log.warning("closed the connection from %s: request headers not complete within %g s",
                    self._peer(), self.header_timeout)  # fmt: skip
        self._answer_and_close(408, b"Request Timeout")

    def _body_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        log.warning("closed the connection from %s: request body of %s %s not complete within %g s",
                    self._peer(), self.scope["method"], self.scope["path"], self.body_timeout)  # fmt: skip
        # The app reads no more of this request and cannot answer it: it sees a disconnect.
        cycle.disconnected = True
        cycle.message_event.set()
        self._answer_and_close(408, b"Request Timeout")

    def _answer_and_close(self, status: int, reason: bytes) -> None:
        """Answer `status` when nothing else is on its way to the client, then close."""
        self._closed_by_us = True
        self._disarm()
        cycle = self.cycle  # before the headers are in: the previous request's
        if self._awaiting_headers:
            wire_free = cycle is None or cycle.response_complete
        else:
            wire_free = not self.pipeline and not cycle.response_started
        if wire_free:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, reason, len(reason), reason)
            )
        self.transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 at once and close: the server holds `max_connections` already."""
        self.transport = transport
        self._answer_and_close(503, b"Service Unavailable")
        cls = type(self)
        cls._refused_since_report += 1
        now = time.monotonic()
        if now - cls._last_refusal_report >= 10:  # one line per 10 s, however many are refused
            log.warning("refused %d connection(s): %d open, the limit (LOKET_HTTP_MAX_CONNECTIONS)",
                        cls._refused_since_report, len(self.connections))  # fmt: skip
            cls._refused_since_report = 0
            cls._last_refusal_report = now


class QuietDisconnects:
    """A client that went away before its body was read is not an error of the app's.

    Starlette raises ClientDisconnect where the body is read (the webhooks, the console's
    forms) and uvicorn would log it as an 80-line traceback; the protocol above has already
    said in one line that the client hung up, or that it was cut off for being slow.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            return  # nobody is left to answer
