"""An aiosmtpd server for tests that records what it receives and can refuse on demand."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from .ports import free_port


@dataclass(frozen=True)
class ReceivedMail:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    received_at: float = field(default_factory=time.time)


@dataclass
class _Refusal:
    remaining: int
    code: int
    text: str
    to: str | None = None  # only mail for this recipient


class RecordingHandler:
    """aiosmtpd handler: stores accepted mail, answers refusals queued by `fail_next`."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._received: list[ReceivedMail] = []
        self._refusals: list[_Refusal] = []
        self.refused = 0

    def fail_next(
        self, count: int, code: int = 451, text: str | None = None, *, to: str | None = None
    ) -> None:
        """Answer the next `count` DATA commands (for recipient `to`, if given) with `code`."""
        if not 400 <= code <= 599:
            raise ValueError("a refusal needs a 4xx or 5xx code")
        if text is None:
            text = "4.3.0 Try again later" if code < 500 else "5.7.1 Message rejected"
        with self._lock:
            self._refusals.append(_Refusal(count, code, text, to.lower() if to else None))

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        recipients = {address.lower() for address in envelope.rcpt_tos}
        with self._lock:
            self._refusals = [r for r in self._refusals if r.remaining > 0]
            refusal = next((r for r in self._refusals if r.to is None or r.to in recipients), None)
            if refusal is not None:
                refusal.remaining -= 1
                self.refused += 1
                return f"{refusal.code} {refusal.text}"
        raw = bytes(envelope.original_content or envelope.content)
        parsed = BytesParser(policy=policy.default).parsebytes(raw)
        mail = ReceivedMail(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            message=parsed,  # type: ignore[arg-type]  # policy.default yields EmailMessage
        )
        with self._lock:
            self._received.append(mail)
            self._lock.notify_all()
        return "250 2.0.0 OK queued"

    @property
    def received(self) -> list[ReceivedMail]:
        """A snapshot of the accepted messages, oldest first."""
        with self._lock:
            return list(self._received)

    def clear(self) -> None:
        """Forget received messages and pending refusals."""
        with self._lock:
            self._received.clear()
            self._refusals.clear()
            self.refused = 0

    def _first(self, predicate: Callable[[ReceivedMail], bool]) -> ReceivedMail | None:
        return next((mail for mail in self._received if predicate(mail)), None)

    def wait_for(
        self, predicate: Callable[[ReceivedMail], bool] = lambda _: True, timeout: float = 10.0
    ) -> ReceivedMail:
        """Block until a received message matches `predicate`; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (found := self._first(predicate)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching mail within {timeout:.1f}s ({len(self._received)} received)"
                    )
                self._lock.wait(remaining)
            return found

    async def wait_for_async(
        self,
        predicate: Callable[[ReceivedMail], bool] = lambda _: True,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> ReceivedMail:
        """Like `wait_for`, without blocking the caller's event loop (the sender may share it)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = self._first(predicate)
                count = len(self._received)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching mail within {timeout:.1f}s ({count} received)")
            await asyncio.sleep(0.02)


class _Authenticator:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user
            and auth_data.password == self.password
        )
        return AuthResult(success=ok, handled=False)


class SmtpServer:
    """An SMTP server on a loopback port, run by aiosmtpd in its own thread."""

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, auth: tuple[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.handler = RecordingHandler()
        server_kwargs: dict[str, Any] = {"enable_SMTPUTF8": True}
        if auth is not None:
            # Plain-text AUTH is acceptable on loopback; production relays use TLS.
            server_kwargs |= {
                "authenticator": _Authenticator(*auth),
                "auth_required": True,
                "auth_require_tls": False,
            }
        self._controller = Controller(
            self.handler, hostname=self.host, port=self.port, **server_kwargs
        )

    @classmethod
    def start(cls, auth: tuple[str, str] | None = None) -> SmtpServer:
        """Start a server on a free port; `auth=(user, password)` makes AUTH mandatory."""
        server = cls(auth=auth)
        server._controller.start()
        return server

    def stop(self) -> None:
        """Stop the server thread."""
        self._controller.stop()

    def fail_next(
        self, count: int, code: int = 451, text: str | None = None, *, to: str | None = None
    ) -> None:
        """Answer the next `count` DATA commands (for recipient `to`, if given) with `code`
        (4xx temporary, 5xx permanent)."""
        self.handler.fail_next(count, code, text, to=to)

    @property
    def received(self) -> list[ReceivedMail]:
        """A snapshot of the accepted messages, oldest first."""
        return self.handler.received

    def wait_for(
        self, predicate: Callable[[ReceivedMail], bool] = lambda _: True, timeout: float = 10.0
    ) -> ReceivedMail:
        """Block until a received message matches `predicate`; raise TimeoutError otherwise."""
        return self.handler.wait_for(predicate, timeout)

    async def wait_for_async(
        self,
        predicate: Callable[[ReceivedMail], bool] = lambda _: True,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> ReceivedMail:
        """`wait_for` for async tests whose event loop also runs the sender."""
        return await self.handler.wait_for_async(predicate, timeout)

    def __enter__(self) -> SmtpServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
