"""`loket bench` against the test PostgreSQL server, its own broker and the session's Dovecot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import db
from tests.support.dovecot import DovecotServer

pytestmark = pytest.mark.slow

REQUIRED = ("messages", "seconds", "throughput", "p50_ms", "p95_ms", "p99_ms")


def bench(tmp_path: Path, *args: str, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `loket bench ... --json` on a fresh database of the test server; its JSON output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOKET_")}
    env |= {
        "LOKET_DATABASE_URL": db.SERVER_URL,
        "LOKET_DATA_DIR": str(tmp_path / "data"),
        "LOKET_PARTITIONS": "4",
        **(extra_env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", *args, "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout)
    for key in REQUIRED:
        assert isinstance(result[key], int | float), key
    return result


def bench_databases() -> set[str]:
    rows = db.fetch(
        db.SERVER_URL, "SELECT datname FROM pg_database WHERE datname LIKE 'loket_bench_%'"
    )
    return {r["datname"] for r in rows}


def test_bench_raw_topic_stores_every_message_once(tmp_path: Path) -> None:
    before = bench_databases()
    result = bench(tmp_path, "--messages", "2000", "--callers", "200")
    assert result["messages"] == 2000
    assert result["verified_rows"] == 2000
    assert result["distinct_keys"] == 2000
    assert result["callers_created"] == 200
    assert result["tickets"] == 200  # each caller's messages thread into one open ticket
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["stages"]["normalizer"]["records"] == 2000
    assert result["stages"]["ticketing"]["records"] == 2000
    assert result["stages"]["ticketing"]["shunted"] == 0
    assert result["rss_mb"]["start"] > 0 and result["rss_mb"]["end"] > 0
    assert "configured server" in result["database"]
    assert "embedded Tansu" in result["broker"]
    # The run's own database is gone afterwards.
    assert bench_databases() <= before


def test_bench_through_the_kannel_webhook(tmp_path: Path) -> None:
    result = bench(tmp_path, "--via", "webhook", "--messages", "300", "--callers", "50",
                   "--rate", "300", "--concurrency", "16")  # fmt: skip
    assert result["via"] == "webhook"
    assert result["messages"] == 300
    assert result["verified_rows"] == 300
    assert result["callers_created"] == 50
    assert result["stages"]["ticketing"]["records"] == 300


def test_bench_with_two_worker_processes_per_stage(tmp_path: Path) -> None:
    result = bench(tmp_path, "--processes", "2", "--messages", "1000", "--callers", "100")
    assert result["verified_rows"] == 1000
    assert result["distinct_keys"] == 1000
    assert result["stages"]["ticketing"]["records"] == 1000
    assert len(result["workers_rss_mb"]) == 4


def test_bench_reads_an_imap_backlog(tmp_path: Path, dovecot: DovecotServer) -> None:
    user = f"bench{uuid.uuid4().hex[:6]}"
    password = "bench-imap-secret-1"
    dovecot.add_user(user, password)
    result = bench(
        tmp_path, "--messages", "200", "--callers", "20", "--email", "150",
        "--imap-host", "127.0.0.1", "--imap-port", str(dovecot.port), "--imap-user", user,
        extra_env={"LOKET_BENCH_IMAP_PASSWORD": password},
    )  # fmt: skip
    assert result["verified_rows"] == 200
    email = result["email"]
    assert email["appended"] == 150
    assert email["messages"] == 150
    assert email["throughput"] > 0
    assert dovecot.count(user) == 150
    # A second run uses the backlog that is there instead of appending more.
    again = bench(
        tmp_path, "--messages", "10", "--callers", "5", "--email", "100",
        "--imap-host", "127.0.0.1", "--imap-port", str(dovecot.port), "--imap-user", user,
        extra_env={"LOKET_BENCH_IMAP_PASSWORD": password},
    )  # fmt: skip
    assert again["email"]["appended"] == 0
    assert again["email"]["messages"] == 150
