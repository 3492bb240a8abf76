"""A running loket for end-to-end tests: real processes against the test servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from .ports import free_port


class LoketStack:
    """`loket up` or separate `loket worker` processes sharing one database and broker."""

    def __init__(
        self,
        *,
        database_url: str,
        bootstrap: str,
        config_text: str,
        workdir: Path,
        extra_env: dict[str, str] | None = None,
    ):
        self.database_url = database_url
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "loket.toml"
        self.config_path.write_text(config_text)
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "LOKET_DATABASE_URL": database_url,
            "LOKET_KAFKA_BOOTSTRAP": bootstrap,
            "LOKET_CONFIG": str(self.config_path),
            "LOKET_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "LOKET_DATA_DIR": str(workdir / "data"),
            "LOKET_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            "LOKET_IMAP_POLL_SECONDS": "5",
            "LOKET_PARTITIONS": "4",
            "LOKET_KAFKA_IDEMPOTENCE": "false",
            **(extra_env or {}),
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `loket ARGS...` as process `name`, its output in `<workdir>/<name>.log`."""
        with open(self.log_path(name), "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def up(self) -> LoketStack:
        self.start("up", "up")
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"loket {name} exited: {self.log_path(name).read_text()[-3000:]}"
                    )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(f"loket not ready: {last}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            process.wait(timeout=20)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def add_agent(
        self, username: str, role: str = "agent", password: str = "rahasia-loket-123"
    ) -> str:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "agent",
                "add",
                username,
                "--role",
                role,
                "--password",
                password,
            ],
            env=self.env,
            check=True,
            capture_output=True,
        )
        return password

    def client(self, username: str | None = None, role: str = "agent") -> httpx.Client:
        """An HTTP client logged in as a fresh agent with `role`."""
        username = username or f"{role}-{uuid.uuid4().hex[:8]}"
        password = self.add_agent(username, role)
        client = httpx.Client(base_url=self.url, timeout=30)
        response = client.post("/api/login", json={"username": username, "password": password})
        response.raise_for_status()
        client.headers["Authorization"] = f"Bearer {response.json()['token']}"
        return client


def wait_until(
    predicate: Any, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)
