"""`loket up` with nothing configured: embedded PostgreSQL and broker, clean stop on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.stack import wait_until

pytestmark = pytest.mark.slow


def test_up_with_embedded_defaults(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOKET_")}
    env |= {"LOKET_DATA_DIR": str(tmp_path / "data"), "LOKET_HTTP_ADDR": f"127.0.0.1:{port}"}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=90, what="embedded loket ready")
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "agent",
                "add",
                "sari",
                "--role",
                "agent",
                "--password",
                "kopi-susu-pagi-1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        login = httpx.post(
            f"http://127.0.0.1:{port}/api/login",
            json={"username": "sari", "password": "kopi-susu-pagi-1"},
            timeout=10,
        )
        assert login.status_code == 200
        token = login.json()["token"]
        tickets = httpx.get(
            f"http://127.0.0.1:{port}/api/tickets",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert tickets.status_code == 200 and tickets.json()["total"] == 0
        assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert process.returncode == 0, output
    assert "started database: embedded PostgreSQL" in output
    assert "started broker: embedded Tansu broker" in output
    assert "loket stopped" in output
