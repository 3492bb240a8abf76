"""The help-desk procedure against PostgreSQL: follow-up window, SLA escalation, open report, callers."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from rich.console import Console

from channels.types import Identity, InboundMessage, MatchedInbound, RawInbound
from normalizer.phone import normalize_phone
from ticketing import procedure
from ticketing.callers import IdentityTaken
from ticketing.db import create_pool, migrate
from ticketing.inbound import apply_matched
from ticketing.rules import TicketRules
from ticketing.states import TransitionError
from workers.ops.report import render
from workers.pipeline.scheduler import run_sla

RULES = TicketRules(followup_window=timedelta(days=7))


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(pg_url, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn:
        yield conn


def token() -> str:
    return uuid.uuid4().hex[:8]


def mobile() -> str:
    """A random Telkomsel-style number typed the national way."""
    return f"0812{uuid.uuid4().int % 10**8:08d}"


async def new_caller(
    conn: asyncpg.Connection, name: str, *identities: Identity, **fields: str
) -> int:
    return await procedure.register_caller(
        conn, procedure.CallerFields(name=name, **fields), identities, actor="tester", agent_id=None
    )


async def phone_ticket(
    conn: asyncpg.Connection, caller_id: int, subject: str = "Printer macet"
) -> int:
    async with conn.transaction():
        return await procedure.log_contact(
            conn, caller_id=caller_id, channel="phone", subject=subject,
            body="Printer di ruang TU tidak bisa mencetak.", actor="tester", agent_id=None, rules=RULES,
        )  # fmt: skip


async def act(
    conn: asyncpg.Connection, ticket_id: int, action: str, **kw: str
) -> procedure.Transitioned:
    async with conn.transaction():
        return await procedure.transition(
            conn, ticket_id, action, actor="tester", agent_id=None, rules=RULES, **kw
        )


def sms_from(number: str, text: str) -> MatchedInbound:
    raw = RawInbound(
        channel="sms", account="test", external_id=uuid.uuid4().hex, sender=number, body_text=text
    )
    message = InboundMessage(raw=raw, identity=normalize_phone(number), body_display=text)
    return MatchedInbound(message=message, caller_id=0)


async def deliver(conn: asyncpg.Connection, caller_id: int, number: str, text: str):  # type: ignore[no-untyped-def]
    matched = sms_from(number, text)
    matched.caller_id = caller_id
    async with conn.transaction():
        return await apply_matched(conn, matched, RULES)


# --- follow-up window ----------------------------------------------------------------------


async def test_message_within_followup_window_reopens_the_closed_ticket(
    conn: asyncpg.Connection,
) -> None:
    number = mobile()
    caller_id = await new_caller(conn, f"Pak Andi {token()}", normalize_phone(number))
    ticket_id = await phone_ticket(conn, caller_id)
    await act(
        conn, ticket_id, "close", reason="resolved", solution="Driver printer dipasang ulang."
    )
    await conn.execute(
        "UPDATE tickets SET closed_at = now() - interval '2 days' WHERE id = $1", ticket_id
    )

    applied = await deliver(conn, caller_id, number, "Printernya macet lagi.")

    assert applied.outcome == "reopen" and applied.ticket_id == ticket_id
    row = await conn.fetchrow(
        "SELECT status, close_reason, closed_at FROM tickets WHERE id = $1", ticket_id
    )
    assert (row["status"], row["close_reason"], row["closed_at"]) == ("open", None, None)
    # The reopened ticket goes on through the procedure like any open one.
    pended = await act(conn, ticket_id, "pend", note="menunggu teknisi")
    assert pended.after.status == "pending"


async def test_message_after_followup_window_opens_a_new_ticket_linked_to_the_old(
    conn: asyncpg.Connection,
) -> None:
    number = mobile()
    caller_id = await new_caller(conn, f"Bu Rina {token()}", normalize_phone(number))
    old_id = await phone_ticket(conn, caller_id)
    await act(
        conn, old_id, "close", reason="resolved", solution="Kertas yang tersangkut dikeluarkan."
    )
    await conn.execute(
        "UPDATE tickets SET closed_at = now() - interval '10 days' WHERE id = $1", old_id
    )

    applied = await deliver(conn, caller_id, number, "Printer macet lagi, sama seperti dulu.")

    assert applied.outcome == "new" and applied.ticket_id != old_id
    new = await conn.fetchrow(
        "SELECT status, tier, linked_ticket_id FROM tickets WHERE id = $1", applied.ticket_id
    )
    assert (new["status"], new["tier"], new["linked_ticket_id"]) == ("open", "agent", old_id)
    assert await conn.fetchval("SELECT status FROM tickets WHERE id = $1", old_id) == "closed"


async def test_message_after_spam_close_never_reopens(conn: asyncpg.Connection) -> None:
    number = mobile()
    caller_id = await new_caller(conn, f"Pengirim {token()}", normalize_phone(number))
    spam_id = await phone_ticket(conn, caller_id, subject="Promo pulsa")
    await act(conn, spam_id, "close", reason="spam")

    applied = await deliver(conn, caller_id, number, "Promo pulsa murah lagi")

    assert applied.outcome == "new" and applied.ticket_id != spam_id
    assert await conn.fetchval("SELECT status FROM tickets WHERE id = $1", spam_id) == "closed"


# --- transitions ---------------------------------------------------------------------------


async def test_resolving_twice_updates_one_draft_and_refusals_change_nothing(
    conn: asyncpg.Connection,
) -> None:
    caller_id = await new_caller(conn, f"Pak Joko {token()}", normalize_phone(mobile()))
    ticket_id = await phone_ticket(conn, caller_id, subject="Tidak bisa login Dapodik")
    first = await act(conn, ticket_id, "close", reason="resolved", solution="Kata sandi direset.")
    assert first.kb_article_id is not None
    await act(conn, ticket_id, "reopen", note="masih gagal")
    second = await act(
        conn, ticket_id, "close", reason="resolved", solution="Akun dibuka kuncinya oleh admin."
    )
    assert second.kb_article_id == first.kb_article_id
    article = await conn.fetchrow(
        "SELECT * FROM kb_articles WHERE source_ticket_id = $1", ticket_id
    )
    assert article["status"] == "draft"
    assert article["solution"] == "Akun dibuka kuncinya oleh admin."
    assert article["problem"].startswith("Tidak bisa login Dapodik\n\nPrinter di ruang TU")

    before = await conn.fetchrow("SELECT * FROM tickets WHERE id = $1", ticket_id)
    events_before = await conn.fetchval(
        "SELECT count(*) FROM ticket_events WHERE ticket_id = $1", ticket_id
    )
    with pytest.raises(TransitionError, match="closed ticket"):
        await act(conn, ticket_id, "pend")
    assert await conn.fetchrow("SELECT * FROM tickets WHERE id = $1", ticket_id) == before
    assert (
        await conn.fetchval("SELECT count(*) FROM ticket_events WHERE ticket_id = $1", ticket_id)
        == events_before
    )


async def test_assigning_a_ticket_records_who_gave_it_to_whom(conn: asyncpg.Connection) -> None:
    caller_id = await new_caller(conn, f"Bu Sari {token()}", normalize_phone(mobile()))
    ticket_id = await phone_ticket(conn, caller_id, subject="Internet sekolah putus")
    agents = {}
    for name, active in (("sari", True), ("budi", True), ("lama", False)):
        agents[name] = await conn.fetchval(
            "INSERT INTO agents (username, password_hash, role, active) VALUES ($1, 'x', 'agent', $2)"
            " RETURNING id",
            f"{name}-{token()}", active,
        )  # fmt: skip

    async def assign(to: int | None) -> int | None:
        async with conn.transaction():
            return await procedure.assign(
                conn, ticket_id, to, actor="sari", agent_id=agents["sari"]
            )

    async def assignee() -> int | None:
        return await conn.fetchval("SELECT assignee_id FROM tickets WHERE id = $1", ticket_id)

    taken = await assign(agents["sari"])
    assert taken is not None and await assignee() == agents["sari"]
    assert await assign(agents["sari"]) is None  # no change, no event
    handed = await assign(agents["budi"])
    assert await assignee() == agents["budi"]
    event = await conn.fetchrow(
        "SELECT actor, agent_id, kind, data FROM ticket_events WHERE id = $1", handed
    )
    assert (
        event["kind"] == "assigned"
        and event["actor"] == "sari"
        and event["agent_id"] == agents["sari"]
    )
    assert event["data"]["from"] == agents["sari"] and event["data"]["to"] == agents["budi"]
    assert event["data"]["to_username"].startswith("budi-")

    # An inactive or unknown agent cannot take it; nothing changes.
    for nobody in (agents["lama"], 10**15):
        with pytest.raises(procedure.AgentNotFound):
            await assign(nobody)
    assert await assignee() == agents["budi"]
    with pytest.raises(procedure.TicketNotFound):
        async with conn.transaction():
            await procedure.assign(conn, 10**15, agents["sari"], actor="sari", agent_id=None)

    released = await assign(None)
    assert released is not None and await assignee() is None
    kinds = await conn.fetch(
        "SELECT data->>'to' AS to FROM ticket_events WHERE ticket_id = $1 AND kind = 'assigned' ORDER BY id",
        ticket_id,
    )
    assert [r["to"] for r in kinds] == [str(agents["sari"]), str(agents["budi"]), None]


# --- SLA escalation ------------------------------------------------------------------------


async def ticket_with_due(
    conn: asyncpg.Connection, caller_id: int, *, status: str, tier: str, due: datetime
) -> int:
    closed = status == "closed"
    return await conn.fetchval(
        "INSERT INTO tickets (caller_id, subject, status, tier, close_reason, closed_at, channel,"
        " first_response_due, resolution_due, created_at, last_activity_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'phone', $7::timestamptz, $7::timestamptz,"
        " $7::timestamptz - interval '3 days', $7::timestamptz - interval '1 day')"
        " RETURNING id",
        caller_id, f"{status} at {tier}", status, tier, "withdrawn" if closed else None,
        due if closed else None, due,
    )  # fmt: skip


async def test_escalate_overdue_moves_each_late_ticket_one_tier_once(
    conn: asyncpg.Connection,
) -> None:
    now = datetime.now(UTC)
    caller_id = await new_caller(conn, f"Sekolah {token()}")
    late = now - timedelta(hours=5)
    agent_open = await ticket_with_due(conn, caller_id, status="open", tier="agent", due=late)
    support_pending = await ticket_with_due(
        conn, caller_id, status="pending", tier="support", due=late
    )
    management = await ticket_with_due(conn, caller_id, status="open", tier="management", due=late)
    closed = await ticket_with_due(conn, caller_id, status="closed", tier="agent", due=late)
    not_yet = await ticket_with_due(
        conn, caller_id, status="open", tier="agent", due=now + timedelta(hours=1)
    )

    escalated = await procedure.escalate_overdue(conn, RULES, now)

    mine = {agent_open, support_pending, management, closed, not_yet}
    assert sorted(set(escalated) & mine) == sorted([agent_open, support_pending])
    rows = {
        r["id"]: r
        for r in await conn.fetch("SELECT * FROM tickets WHERE id = ANY($1::bigint[])", list(mine))
    }
    assert (rows[agent_open]["status"], rows[agent_open]["tier"]) == ("open", "support")
    assert (rows[support_pending]["status"], rows[support_pending]["tier"]) == (
        "open",
        "management",
    )
    assert rows[management]["tier"] == "management" and rows[closed]["status"] == "closed"
    assert rows[not_yet]["tier"] == "agent"
    for ticket_id, tier in ((agent_open, "support"), (support_pending, "management")):
        assert rows[ticket_id]["resolution_due"] == RULES.due(now, tier)[1] > now
        [event] = await conn.fetch(
            "SELECT * FROM ticket_events WHERE ticket_id = $1 AND kind = 'escalated'", ticket_id
        )
        assert event["actor"] == "system" and event["agent_id"] is None
        assert event["to_tier"] == tier
        assert event["note"].startswith(f"overdue at {event['from_tier']} since ")
        assert late.astimezone(RULES.calendar.zone).strftime("%Y-%m-%d %H:%M") in event["note"]

    again = await procedure.escalate_overdue(conn, RULES, now)
    assert not set(again) & mine


async def test_two_schedulers_escalate_each_ticket_exactly_once(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        caller_id = await new_caller(conn, f"Dinas {token()}")
        ids = [
            await ticket_with_due(
                conn, caller_id, status="open", tier="agent", due=now - timedelta(minutes=i + 1)
            )
            for i in range(40)
        ]

    async def scheduler() -> list[int]:
        async with pool.acquire() as conn:
            return await procedure.escalate_overdue(conn, RULES, now, batch=3)

    first, second = await asyncio.gather(scheduler(), scheduler())

    mine = set(ids)
    assert not (set(first) & set(second) & mine)
    assert (set(first) | set(second)) & mine == mine
    async with pool.acquire() as conn:
        counts = await conn.fetch(
            "SELECT ticket_id, count(*) AS n FROM ticket_events WHERE kind = 'escalated'"
            " AND ticket_id = ANY($1::bigint[]) GROUP BY ticket_id",
            ids,
        )
        tiers = await conn.fetch(
            "SELECT DISTINCT tier FROM tickets WHERE id = ANY($1::bigint[])", ids
        )
    assert {r["ticket_id"]: r["n"] for r in counts} == {i: 1 for i in ids}
    assert [r["tier"] for r in tiers] == ["support"]


async def test_sla_task_escalates_when_enabled_and_stops_on_request(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        caller_id = await new_caller(conn, f"Madrasah {token()}")
        ticket_id = await ticket_with_due(
            conn,
            caller_id,
            status="pending",
            tier="agent",
            due=datetime.now(UTC) - timedelta(hours=1),
        )
    stop = asyncio.Event()
    task = asyncio.create_task(run_sla(pool, TicketRules(auto_escalate=True), stop, interval=0.1))
    deadline = asyncio.get_running_loop().time() + 10
    while await pool.fetchval("SELECT tier FROM tickets WHERE id = $1", ticket_id) != "support":
        assert asyncio.get_running_loop().time() < deadline, "the SLA task did not escalate"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_sla_task_leaves_tickets_alone_when_disabled(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        caller_id = await new_caller(conn, f"Sekolah {token()}")
        ticket_id = await ticket_with_due(
            conn, caller_id, status="open", tier="agent", due=datetime.now(UTC) - timedelta(hours=1)
        )
    stop = asyncio.Event()
    task = asyncio.create_task(run_sla(pool, TicketRules(auto_escalate=False), stop, interval=0.05))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert await pool.fetchval("SELECT tier FROM tickets WHERE id = $1", ticket_id) == "agent"


# --- the open report -----------------------------------------------------------------------


async def test_open_report_lists_every_ticket_not_closed_once_oldest_first(
    conn: asyncpg.Connection,
) -> None:
    now = datetime.now(UTC)
    name = f"Pelapor {token()}"
    caller_id = await new_caller(conn, name)
    older = await ticket_with_due(
        conn, caller_id, status="open", tier="agent", due=now + timedelta(days=1)
    )
    newer = await phone_ticket(conn, caller_id, subject="Jaringan lambat")
    stuck = await ticket_with_due(
        conn, caller_id, status="pending", tier="support", due=now - timedelta(days=2)
    )
    at_management = await ticket_with_due(
        conn, caller_id, status="pending", tier="management", due=now + timedelta(days=2)
    )
    closed = await ticket_with_due(
        conn, caller_id, status="closed", tier="agent", due=now - timedelta(days=1)
    )

    report = await procedure.open_report(conn, now)

    seen = [t.id for g in report.groups for t in g.tickets]
    assert len(seen) == len(set(seen)) == report.total
    assert closed not in seen
    where = {t.id: (g.tier, g.status) for g in report.groups for t in g.tickets}
    assert where[older] == where[newer] == ("agent", "open")
    assert where[stuck] == ("support", "pending")
    assert where[at_management] == ("management", "pending")
    [agent_open] = [g for g in report.groups if (g.tier, g.status) == ("agent", "open")]
    order = [t.id for t in agent_open.tickets if t.id in (older, newer)]
    assert order == [older, newer]
    for group in report.groups:
        created = [t.created_at for t in group.tickets]
        assert created == sorted(created)
    by_id = {t.id: t for g in report.groups for t in g.tickets}
    assert by_id[stuck].overdue and by_id[stuck].overdue_by is not None
    assert by_id[stuck].overdue_by >= timedelta(days=2)
    # ticket_with_due: created three days and last active one day before its due time.
    assert by_id[older].age == timedelta(days=2) and by_id[older].idle == timedelta(0)
    assert not by_id[at_management].overdue
    assert stuck in [t.id for t in report.stuck_pending]
    assert at_management not in [t.id for t in report.stuck_pending]

    out = io.StringIO()
    render(report, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert name in text and "Jaringan lambat" in text
    stuck_section = text.split("Pending at support or management past the deadline")[1]
    assert f" {stuck} " in stuck_section and "2d " in stuck_section
    assert f" {at_management} " not in stuck_section


# --- callers -------------------------------------------------------------------------------


async def test_duplicates_are_suggested_by_name_and_organization(conn: asyncpg.Connection) -> None:
    tag = token()
    me = await new_caller(conn, f"Ibu Siti Aminah{tag}", organization=f"SMPN 1 Bandung {tag}")
    same_name = await new_caller(conn, f"siti  aminah{tag}, S.Pd.")
    short_name_same_org = await new_caller(conn, "Siti", organization=f"smpn 1 bandung {tag}")
    other = await new_caller(conn, "Siti", organization=f"SDN 2 Garut {tag}")

    found = {d["id"]: d["reasons"] for d in await procedure.find_duplicates(conn, me)}

    assert found.get(same_name) == ["same name"]
    assert found.get(short_name_same_org) == ["similar name", "same organization"]
    assert other not in found and me not in found


async def test_merge_chains_redirect_to_the_last_survivor(conn: asyncpg.Connection) -> None:
    first_number, second_number = normalize_phone(mobile()), normalize_phone(mobile())
    a = await new_caller(conn, f"A {token()}", first_number)
    b = await new_caller(conn, f"B {token()}", second_number, region="Jawa Barat")
    c = await new_caller(conn, f"C {token()}")
    ticket_of_a = await phone_ticket(conn, a)
    async with conn.transaction():
        assert await procedure.merge_callers(conn, a, b, actor="tester", agent_id=None) == b
    async with conn.transaction():
        assert await procedure.merge_callers(conn, b, c, actor="tester", agent_id=None) == c

    assert await conn.fetchval("SELECT merged_into FROM callers WHERE id = $1", a) == c
    detail = await procedure.caller_detail(conn, a)
    assert detail["id"] == c and detail["merged_from"] == a and detail["merged_ids"] == [a, b]
    assert detail["region"] == "Jawa Barat"
    assert {i["value"] for i in detail["identities"]} == {first_number.value, second_number.value}
    assert [t["id"] for t in detail["tickets"]] == [ticket_of_a]
    assert [e["kind"] for e in detail["events"]].count("merged") == 2
    with pytest.raises(procedure.CallerConflict, match="already merged"):
        async with conn.transaction():
            await procedure.merge_callers(conn, a, c, actor="tester", agent_id=None)
    with pytest.raises(IdentityTaken) as taken:
        await new_caller(conn, "Someone else", first_number)
    assert taken.value.caller_id == c
