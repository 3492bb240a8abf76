"""`loket up --demo`: sample traffic through every inbound path of a fresh install, and a demo login."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.embedded import Up, database_url, start_up
from tests.support.stack import LoketStack, wait_until
from workers.tools.demo.content import ANSWERS

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoketStack]:
    """A fresh database and broker of its own, no channel configured."""
    url = db.create_database("loket_demo")
    broker = TansuBroker.start(log_dir=tmp_path_factory.mktemp("demo-tansu"))
    stack = LoketStack(database_url=url, bootstrap=broker.bootstrap, config_text="",
                       workdir=tmp_path_factory.mktemp("loket-demo"))  # fmt: skip
    yield stack
    stack.stop()
    broker.stop()
    db.drop_database(url)


def demo_password(stack: LoketStack, after: int = 0) -> str | None:
    log = stack.log_path("up").read_text(errors="replace")[after:]
    found = re.search(r"as 'demo' with password '([^']+)'", log)
    return found.group(1) if found else None


def console_login(stack: LoketStack, password: str) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        client.post("/login", data={"username": "demo", "password": password, "csrf": csrf})
        return client.get("/?status=all")


def test_demo_fills_a_fresh_install(fresh: LoketStack) -> None:
    fresh.start("up", "up", "--demo")
    fresh.wait_ready()
    password = wait_until(lambda: demo_password(fresh), what="demo login printed")
    url = fresh.database_url

    def channels() -> set[str]:
        rows = db.fetch(url, "SELECT DISTINCT channel FROM tickets WHERE is_demo")
        return {r["channel"] for r in rows}

    wanted = {"email", "sms", "telegram", "facebook", "twitter", "phone"}
    wait_until(lambda: channels() >= wanted, timeout=60, what=f"demo tickets on {wanted}")

    # Everything is marked demo, callers too; calls sit at every tier and status.
    assert db.fetchval(url, "SELECT count(*) FROM tickets WHERE NOT is_demo") == 0
    wait_until(
        lambda: db.fetchval(url, "SELECT count(*) FROM callers WHERE NOT is_demo") == 0,
        what="demo callers marked",
    )
    states = db.fetch(url, "SELECT DISTINCT status, tier FROM tickets WHERE channel = 'phone'")
    assert {(s["status"], s["tier"]) for s in states} >= {
        ("open", "agent"), ("pending", "agent"), ("open", "support"), ("open", "management"),
        ("closed", "agent"),
    }  # fmt: skip
    # Messages came in through the real parsers: the e-mail with attachments kept them.
    assert (
        db.fetchval(
            url,
            "SELECT count(*) FROM attachments a JOIN messages m ON m.id = a.message_id"
            " WHERE m.channel = 'email' AND a.sha256 <> ''",
        )
        >= 2
    )
    assert db.fetchval(url, "SELECT count(*) FROM messages WHERE meta->>'demo' = '1'") >= 11

    # The printed login works, through the API and the console.
    with httpx.Client(base_url=fresh.url, timeout=30) as client:
        response = client.post("/api/login", json={"username": "demo", "password": password})
        assert response.status_code == 200, response.text
        listed = client.get("/api/tickets", params={"limit": 100}).json()
        assert {t["channel"] for t in listed["tickets"]} >= wanted
    queue = console_login(fresh, password)
    assert queue.status_code == 200 and "Antrean tiket" in queue.text
    assert "Dana BOS tahap 2 belum masuk rekening" in queue.text

    # A second `--demo` on the same database renews the login, not the sample traffic.
    calls = db.fetchval(url, "SELECT count(*) FROM tickets WHERE channel = 'phone'")
    fresh.stop()
    offset = fresh.log_path("up").stat().st_size
    fresh.start("up", "up", "--demo")
    fresh.wait_ready()
    renewed = wait_until(lambda: demo_password(fresh, offset), what="demo login printed again")
    assert renewed == password  # kept in the data directory: the login a person noted still works
    login_file = fresh.workdir / "data" / "demo-login.json"
    assert login_file.stat().st_mode & 0o777 == 0o600
    assert "already in this database" in fresh.log_path("up").read_text()[offset:]
    assert db.fetchval(url, "SELECT count(*) FROM tickets WHERE channel = 'phone'") == calls
    assert console_login(fresh, renewed).status_code == 200


def test_no_sample_data_without_demo(stack: LoketStack, pg_url: str) -> None:
    assert db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE is_demo") == 0
    assert db.fetchval(pg_url, "SELECT count(*) FROM agents WHERE username = 'demo'") == 0
    assert "demo:" not in Path(stack.log_path("up")).read_text()


def test_a_reply_on_every_demo_channel_is_sent_delivered_and_answered(tmp_path: Path) -> None:
    """On the embedded defaults, as `loket up --demo` runs on a new machine."""
    up = start_up(tmp_path, "data", "--demo")
    try:
        answered_on_every_channel(up)
    finally:
        up.stop()


def answered_on_every_channel(up: Up) -> None:
    found = wait_until(lambda: re.search(r"as 'demo' with password '([^']+)'", up.output()),
                       what="demo login printed")  # fmt: skip
    password = found.group(1)
    url = database_url(up)
    wanted = ("email", "sms", "telegram", "facebook", "twitter", "phone")

    def first_ticket_by_channel() -> dict[str, int] | None:
        rows = db.fetch(url, "SELECT channel, min(id) AS id FROM tickets WHERE is_demo"
                             " AND status <> 'closed' GROUP BY channel")  # fmt: skip
        found = {r["channel"]: r["id"] for r in rows}
        return found if set(wanted) <= set(found) else None

    tickets = wait_until(first_ticket_by_channel, timeout=60, what="a demo ticket per channel")
    with httpx.Client(base_url=up.url, timeout=30) as client:
        token = client.post("/api/login", json={"username": "demo", "password": password}).json()
        headers = {"Authorization": f"Bearer {token['token']}"}
        replies = {}
        for channel, ticket_id in tickets.items():
            sent = client.post(f"/api/tickets/{ticket_id}/replies", headers=headers,
                               json={"body": f"Sudah kami bantu lewat {channel}."})  # fmt: skip
            assert sent.status_code == 201, (channel, sent.text)
            replies[channel] = sent.json()["id"]
    # A call's caller is answered on the channel of their phone number: SMS.
    assert db.fetchval(url, "SELECT channel FROM messages WHERE id = $1", replies["phone"]) == "sms"

    def statuses() -> dict[str, str]:
        rows = db.fetch(url, "SELECT id, status FROM messages WHERE id = ANY($1::bigint[])",
                        list(replies.values()))  # fmt: skip
        by_id = {r["id"]: r["status"] for r in rows}
        return {channel: by_id[mid] for channel, mid in replies.items()}

    wait_until(lambda: set(statuses().values()) == {"delivered"}, timeout=60,
               what=f"every demo reply delivered: {statuses()}")  # fmt: skip

    def answered() -> bool:
        for channel, ticket_id in tickets.items():
            text = ANSWERS["sms" if channel == "phone" else channel]
            times = db.fetchval(
                url, "SELECT count(*) FROM messages WHERE ticket_id = $1 AND direction = 'in'"
                " AND body_text LIKE $2 AND id > $3", ticket_id, f"%{text}%", replies[channel],
            )  # fmt: skip
            if times != 1:
                return False
        return True

    wait_until(answered, timeout=60, what="the person's answer on the same ticket, once")
    assert db.fetchval(url, "SELECT count(*) FROM tickets WHERE NOT is_demo") == 0
