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
    samples = result["memory_samples"]
    assert samples and all(sample["rss_mb"] > 0 for sample in samples)
    assert samples[-1]["stored"] <= 2000 and samples[-1]["workers_rss_mb"] == []
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
    assert result["scale"] == ["normalizer", "ticketing"]
    assert result["verified_rows"] == 1000
    assert result["distinct_keys"] == 1000
    assert result["stages"]["ticketing"]["records"] == 1000
    assert len(result["workers_rss_mb"]) == 4
    # Every memory sample covers all four worker processes.
    assert all(len(sample["workers_rss_mb"]) == 4 for sample in result["memory_samples"])
    assert all(rss > 0 for sample in result["memory_samples"] for rss in sample["workers_rss_mb"])


def test_bench_with_two_ticketing_processes_behind_one_normalizer(tmp_path: Path) -> None:
    result = bench(tmp_path, "--processes", "2", "--scale", "ticketing",
                   "--messages", "2000", "--callers", "200")  # fmt: skip
    assert result["scale"] == ["ticketing"]
    assert len(result["workers_rss_mb"]) == 3
    assert result["verified_rows"] == 2000
    assert result["distinct_keys"] == 2000
    assert result["callers_created"] == 200
    assert result["stages"]["normalizer"]["records_per_process"] == [2000]
    # Both ticketing processes took part, and between them handled each record once.
    shares = result["stages"]["ticketing"]["records_per_process"]
    assert len(shares) == 2 and all(share > 0 for share in shares)
    assert sum(shares) >= 2000  # a record redone after a rebalance is counted twice, stored once


def test_bench_refuses_an_unknown_stage_to_scale(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "--processes", "2", "--scale", "relay"],
        env={**os.environ, "LOKET_DATABASE_URL": db.SERVER_URL}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--scale names one or more of: normalizer, ticketing" in done.stderr


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


# -- the batched writes the benchmark drove: same decisions as one message at a time ----------


def _matched(caller_id: int, external_id: str, subject: str | None = None) -> Any:
    from channels.types import InboundMessage, MatchedInbound, RawInbound

    raw = RawInbound(channel="sms", account="batch", external_id=external_id, sender="+6281299990000",
                     body_text=f"pesan {external_id}", subject=subject)  # fmt: skip
    return MatchedInbound(message=InboundMessage(raw=raw, identity=None, body_display=raw.body_text),
                          caller_id=caller_id)  # fmt: skip


async def test_batched_ticketing_decides_like_one_at_a_time(pg_url: str) -> None:
    from channels.types import Identity
    from ticketing import callers
    from ticketing.db import create_pool, migrate
    from ticketing.inbound import apply_matched_batch, open_ticket
    from ticketing.rules import TicketRules

    rules = TicketRules.from_config(7.0, {})
    tag = uuid.uuid4().hex[:8]
    pool = await create_pool(pg_url, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            made = await callers.create_with_identities(
                conn, [(Identity("phone", f"+62812{tag}{n}"), None) for n in range(3)]
                + [(Identity("phone", f"+62812{tag}0"), "twice")]
            )  # fmt: skip
            assert len(made) == 3 and all(created for _, created in made.values())
            again = await callers.create_with_identities(
                conn, [(Identity("phone", f"+62812{tag}0"), None)]
            )
            assert again == {
                ("phone", f"+62812{tag}0"): (made[("phone", f"+62812{tag}0")][0], False)
            }
            fresh, resolved, spam = (made[("phone", f"+62812{tag}{n}")][0] for n in range(3))
            closed = {}
            for caller_id, reason in ((resolved, "resolved"), (spam, "spam")):
                ticket = await open_ticket(conn, caller_id=caller_id, subject="lama", channel="sms",
                                           account="batch", rules=rules)  # fmt: skip
                await conn.execute(
                    "UPDATE tickets SET status = 'closed', close_reason = $2, solution = 'selesai',"
                    " closed_at = now() - interval '1 hour' WHERE id = $1", ticket, reason,
                )  # fmt: skip
                closed[reason] = ticket
            batch = [
                _matched(fresh, f"{tag}-1"), _matched(fresh, f"{tag}-2"), _matched(fresh, f"{tag}-1"),
                _matched(resolved, f"{tag}-3"), _matched(resolved, f"{tag}-4"),
                _matched(spam, f"{tag}-5"),
                # A subject token threads into the caller's own ticket, one at a time.
                _matched(spam, f"{tag}-6", subject=f"Re: [#{closed['spam']}]"),
                _matched(spam, f"{tag}-7"),
            ]  # fmt: skip
            async with conn.transaction():
                results = await apply_matched_batch(conn, batch, rules)
            outcomes = [r.outcome if r else None for r in results]
            assert outcomes == ["new", "append", None, "reopen", "append", "new", "new", "append"]
            assert results[0].ticket_id == results[1].ticket_id
            assert results[3].ticket_id == results[4].ticket_id == closed["resolved"]
            # Spam is never reopened: a new ticket, linked to it; the token names the spam ticket,
            # which stays closed, so that message opens another new ticket.
            assert results[5].ticket_id != closed["spam"]
            assert results[7].ticket_id == results[6].ticket_id
            linked = await conn.fetchval(
                "SELECT linked_ticket_id FROM tickets WHERE id = $1", results[5].ticket_id
            )
            assert linked == closed["spam"]
            assert (
                await conn.fetchval("SELECT status FROM tickets WHERE id = $1", closed["resolved"])
                == "open"
            )
            rows = await conn.fetch(
                "SELECT external_id, ticket_id, problems, meta FROM messages WHERE account = 'batch'"
                " AND external_id LIKE $1 ORDER BY id", f"{tag}-%",
            )  # fmt: skip
            assert [r["external_id"] for r in rows] == [f"{tag}-{n}" for n in (1, 2, 3, 4, 5, 6, 7)]
            events = await conn.fetch(
                "SELECT ticket_id, kind FROM ticket_events WHERE ticket_id = ANY($1::bigint[]) ORDER BY id",
                list({r.ticket_id for r in results if r}),
            )  # fmt: skip
            kinds = [e["kind"] for e in events if e["ticket_id"] == closed["resolved"]]
            assert kinds == ["created", "reopened", "message", "message"]
            # Applying the same batch again changes nothing.
            async with conn.transaction():
                assert await apply_matched_batch(conn, batch, rules) == [None] * len(batch)
    finally:
        await pool.close()


def test_bench_idle_measures_an_embedded_loket_up_and_its_floor(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOKET_")}
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "--idle", "3", "--json"],
        env=env | {"TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert set(result["cpu_percent"]) == {"loket", "broker", "postgres"}
    assert result["cpu_percent"]["loket"] > 0 and result["floor_cpu_percent_bare_broker"] >= 0
    assert len(result["first_message_seconds"]) == 3
    assert all(0 < seconds < 30 for seconds in result["first_message_seconds"])
    assert result["floor_first_message_median_seconds"] > 0
    assert result["stopped_cleanly"] is True
    assert not list(tmp_path.glob("loket-idle-*"))  # its data directory is gone with it
