"""`loket up` on the embedded defaults: no LOKET_DATABASE_URL, no LOKET_KAFKA_BOOTSTRAP, a data
directory of its own; and `loket` commands beside it, as a new user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.ports import free_port
from tests.support.stack import wait_until
from workers.runtime import installation


def clean_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOKET_")}
    return env | {"LOKET_DATA_DIR": str(data_dir), "LOKET_HTTP_ADDR": f"127.0.0.1:{port}"} | extra


def loket(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], env=env, capture_output=True, text=True,
        timeout=120, input=stdin if stdin is not None else "",
    )  # fmt: skip


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    data_dir: Path
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> float:
        """SIGINT, as Ctrl-C sends it; the seconds until every process of the group is gone."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.wait(timeout=60)
        wait_until(lambda: not _group_alive(self.process.pid), timeout=30, what="group gone")
        return time.monotonic() - started


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_up(tmp_path: Path, name: str, *args: str, **extra: str) -> Up:
    """`loket up ARGS` on the embedded defaults in `tmp_path/name`, `extra` added to its
    environment; returned once /readyz answers 200."""
    port = free_port()
    data_dir = tmp_path / name
    env = clean_env(data_dir, port, **extra)
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "up", *args], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    up = Up(process, env, data_dir, port, log_path)

    def ready() -> bool:
        assert process.poll() is None, up.output()
        try:
            return httpx.get(f"{up.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=120, what=f"loket up ({name}) ready")
    return up


def database_url(up: Up) -> str:
    """The embedded database of a running `up`, as its runtime file names it."""
    found = installation.running(up.data_dir)
    assert found is not None, up.output()
    return found.database_url


def add_agent(up: Up, username: str, role: str, password: str) -> None:
    added = loket(up.env, "agent", "add", username, "--role", role, "--password", password)
    assert added.returncode == 0, added.stderr
