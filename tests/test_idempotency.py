"""Idempotency-Key through the running loket: double submits of the API and the console do nothing twice."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import asyncpg
import httpx
import pytest

from tests.support import db
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack
from ticketing import idempotency as store
from workers.web import idempotency

pytestmark = pytest.mark.slow


def key() -> str:
    return str(uuid.uuid4())


def at_once(agent: httpx.Client, count: int, send: Callable[[httpx.Client], httpx.Response]
            ) -> list[httpx.Response]:  # fmt: skip
    """`count` requests of `agent` released together, each on its own connection."""
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=agent.base_url, headers=agent.headers, timeout=30) as client:
            client.get("/healthz")  # the connection is open before the barrier
            barrier.wait()
            return send(client)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.fixture
def agent(stack: LoketStack) -> httpx.Client:
    return stack.client()


def new_caller(agent: httpx.Client, **fields: object) -> dict:
    email = f"idem-{uuid.uuid4().hex[:10]}@sekolah.example.id"
    response = agent.post("/api/callers", json={"name": "Ibu Idem", "email": email, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def new_ticket(agent: httpx.Client, caller_id: int) -> dict:
    response = agent.post(
        "/api/tickets", json={"caller_id": caller_id, "body": "Rapor tidak bisa dicetak."}
    )
    assert response.status_code == 201, response.text
    return response.json()


def same_answers(responses: list[httpx.Response], status: int) -> None:
    assert [r.status_code for r in responses] == [status] * len(responses), [
        r.text for r in responses
    ]
    assert len({r.content for r in responses}) == 1, "the answers differ"
    replayed = [r.headers.get(idempotency.REPLAYED_HEADER) for r in responses]
    assert replayed.count(None) == 1 and replayed.count("true") == len(responses) - 1, replayed


# --- the API -------------------------------------------------------------------------------


def test_three_simultaneous_tickets_with_one_key_open_one(agent: httpx.Client, pg_url: str) -> None:
    caller = new_caller(agent)
    once = key()
    body = {
        "caller_id": caller["id"],
        "channel": "phone",
        "subject": "Dapodik",
        "body": "Gagal sinkron.",
    }
    answers = at_once(
        agent, 3, lambda c: c.post("/api/tickets", json=body, headers={"Idempotency-Key": once}),
    )  # fmt: skip
    same_answers(answers, 201)
    assert (
        db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE caller_id = $1", caller["id"]) == 1
    )
    assert answers[0].json()["caller_id"] == caller["id"]
    # Later, the key and the same body (other spacing and key order) still answer the first ticket.
    again = agent.post(
        "/api/tickets", content=json.dumps(dict(reversed(body.items())), indent=2),
        headers={"Idempotency-Key": once, "Content-Type": "application/json"},
    )  # fmt: skip
    assert again.status_code == 201 and again.content == answers[0].content
    assert again.headers[idempotency.REPLAYED_HEADER] == "true"


def test_same_key_with_another_body_is_refused(agent: httpx.Client, pg_url: str) -> None:
    caller = new_caller(agent)
    once = key()
    first = agent.post("/api/tickets", json={"caller_id": caller["id"], "body": "Satu"},
                       headers={"Idempotency-Key": once})  # fmt: skip
    assert first.status_code == 201, first.text
    other = agent.post("/api/tickets", json={"caller_id": caller["id"], "body": "Dua"},
                       headers={"Idempotency-Key": once})  # fmt: skip
    assert other.status_code == 409, other.text
    assert "another request" in other.json()["detail"]
    # Another route with the key is another request too.
    elsewhere = agent.post(f"/api/tickets/{first.json()['id']}/transitions", json={"action": "pend"},
                           headers={"Idempotency-Key": once})  # fmt: skip
    assert elsewhere.status_code == 409, elsewhere.text
    assert (
        db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE caller_id = $1", caller["id"]) == 1
    )
    assert (
        db.fetchval(pg_url, "SELECT status FROM tickets WHERE id = $1", first.json()["id"])
        == "open"
    )


def test_without_a_key_nothing_changes(agent: httpx.Client, pg_url: str) -> None:
    caller = new_caller(agent)
    body = {"caller_id": caller["id"], "body": "Dua kali dikirim, dua tiket."}
    first, second = (agent.post("/api/tickets", json=body) for _ in range(2))
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]
    assert idempotency.REPLAYED_HEADER not in second.headers
    assert (
        db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE caller_id = $1", caller["id"]) == 2
    )
    pended = agent.post(f"/api/tickets/{first.json()['id']}/transitions", json={"action": "pend"})
    assert pended.status_code == 200 and pended.json()["status"] == "pending"
    again = agent.post(f"/api/tickets/{first.json()['id']}/transitions", json={"action": "pend"})
    assert again.status_code == 409, again.text


def test_two_simultaneous_replies_with_one_key_send_one_mail(
    agent: httpx.Client, pg_url: str, smtp: SmtpServer
) -> None:
    caller = new_caller(agent)
    address = caller["identities"][0]["value"]
    ticket = new_ticket(agent, caller["id"])
    once = key()
    reply = {"body": "Silakan coba cetak ulang rapor.", "channel": "email"}
    answers = at_once(
        agent, 2, lambda c: c.post(f"/api/tickets/{ticket['id']}/replies", json=reply,
                            headers={"Idempotency-Key": once}),
    )  # fmt: skip
    same_answers(answers, 201)
    out = db.fetch(pg_url, "SELECT id FROM messages WHERE ticket_id = $1 AND direction = 'out'",
                   ticket["id"])  # fmt: skip
    assert [m["id"] for m in out] == [answers[0].json()["id"]]
    smtp.wait_for(lambda m: address in m.rcpt_tos, timeout=30)
    time.sleep(2)  # a second mail, if there were one, would be out by now
    assert len([m for m in smtp.received if address in m.rcpt_tos]) == 1


def test_simultaneous_transitions_with_one_key_move_once(agent: httpx.Client, pg_url: str) -> None:
    ticket = new_ticket(agent, new_caller(agent)["id"])
    once = key()
    answers = at_once(
        agent, 3, lambda c: c.post(f"/api/tickets/{ticket['id']}/transitions",
                            json={"action": "escalate", "note": "butuh dukungan"},
                            headers={"Idempotency-Key": once}),
    )  # fmt: skip
    same_answers(answers, 200)
    assert answers[0].json()["tier"] == "support"
    escalations = db.fetchval(pg_url, "SELECT count(*) FROM ticket_events WHERE ticket_id = $1"
                                      " AND kind = 'escalated'", ticket["id"])  # fmt: skip
    assert escalations == 1
    assert db.fetchval(pg_url, "SELECT tier FROM tickets WHERE id = $1", ticket["id"]) == "support"


def test_simultaneous_registrations_with_one_key_make_one_caller(
    agent: httpx.Client, pg_url: str
) -> None:
    email = f"idem-{uuid.uuid4().hex[:10]}@sekolah.example.id"
    once = key()
    answers = at_once(
        agent, 3, lambda c: c.post("/api/callers", json={"name": "Pak Satu Kali", "email": email},
                            headers={"Idempotency-Key": once}),
    )  # fmt: skip
    same_answers(answers, 201)
    holders = db.fetch(pg_url, "SELECT caller_id FROM identities WHERE kind = 'email' AND value = $1",
                       email)  # fmt: skip
    assert [h["caller_id"] for h in holders] == [answers[0].json()["id"]]
    # Without the key, the repeat is a second registration and the address is taken: 409.
    taken = agent.post("/api/callers", json={"name": "Pak Satu Kali", "email": email})
    assert (
        taken.status_code == 409
        and taken.json()["detail"]["caller"]["id"] == answers[0].json()["id"]
    )


def test_a_refusal_is_answered_again_and_changes_nothing(agent: httpx.Client, pg_url: str) -> None:
    ticket = new_ticket(agent, new_caller(agent)["id"])
    once = key()
    close = {"action": "close", "reason": "resolved"}  # resolved needs the solution: 409
    first, second = (
        agent.post(f"/api/tickets/{ticket['id']}/transitions", json=close,
                   headers={"Idempotency-Key": once})
        for _ in range(2)
    )  # fmt: skip
    assert (first.status_code, second.status_code) == (409, 409), first.text
    assert first.content == second.content and second.headers[idempotency.REPLAYED_HEADER] == "true"
    assert db.fetchval(pg_url, "SELECT status FROM tickets WHERE id = $1", ticket["id"]) == "open"


def test_keys_are_per_agent(stack: LoketStack, agent: httpx.Client, pg_url: str) -> None:
    caller = new_caller(agent)
    other = stack.client()
    once = key()
    body = {"caller_id": caller["id"], "body": "Dua agen, satu kunci."}
    mine = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": once})
    theirs = other.post("/api/tickets", json=body, headers={"Idempotency-Key": once})
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]
    assert idempotency.REPLAYED_HEADER not in theirs.headers


def test_malformed_keys_are_400_and_anonymous_calls_still_401(
    stack: LoketStack, agent: httpx.Client, pg_url: str
) -> None:
    caller = new_caller(agent)
    body = {"caller_id": caller["id"], "body": "Kunci yang salah."}
    for bad in ("", "x" * 256, "dua kata", "a,b", "kunci;1", '"unterminated', "é".encode()):
        response = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": bad})
        assert response.status_code == 400, (bad, response.status_code, response.text)
    twice = agent.post("/api/tickets", json=body,
                       headers=[("Idempotency-Key", "satu"), ("Idempotency-Key", "dua")])  # fmt: skip
    assert twice.status_code == 400, twice.text
    assert (
        db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE caller_id = $1", caller["id"]) == 0
    )
    # The longest key, and a structured-field string in quotes, which is the same key unquoted.
    longest = "k" * 255
    assert (
        agent.post("/api/tickets", json=body, headers={"Idempotency-Key": longest}).status_code
        == 201
    )
    quoted = key()
    first = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": f'"{quoted}"'})
    second = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": quoted})
    assert first.status_code == 201 and second.content == first.content
    anonymous = httpx.post(
        f"{stack.url}/api/tickets", json=body, headers={"Idempotency-Key": "x y"}
    )
    assert anonymous.status_code == 401


async def test_a_request_waits_for_the_one_holding_its_key(
    stack: LoketStack, agent: httpx.Client, pg_url: str
) -> None:
    """Held by an uncommitted transaction, the key makes a request wait: for the result when
    the holder commits, for at most the bounded wait otherwise (409 "in progress")."""
    caller = new_caller(agent)
    # The agent's id: the one who registered the caller.
    agent_id = db.fetchval(pg_url, "SELECT agent_id FROM caller_events WHERE caller_id = $1"
                                   " AND kind = 'created'", caller["id"])  # fmt: skip
    body = {"caller_id": caller["id"], "body": "Ditahan."}
    fingerprint = idempotency.fingerprint("POST", "/api/tickets", body)
    async with httpx.AsyncClient(base_url=stack.url, headers=agent.headers, timeout=30) as client:
        holder = await asyncpg.connect(pg_url)
        try:
            # 1. The holder commits a response while the request waits: the request answers it.
            held = key()
            hold = holder.transaction()
            await hold.start()
            await holder.execute(
                "INSERT INTO idempotency_keys (agent_id, key, fingerprint, method, path, status,"
                " headers, body) VALUES ($1, $2, $3, 'POST', '/api/tickets', 201, $4, $5)",
                agent_id, held, fingerprint, json.dumps({"content-type": "application/json"}),
                b'{"held":true}',
            )  # fmt: skip
            waiting = asyncio.create_task(
                client.post("/api/tickets", json=body, headers={"Idempotency-Key": held})
            )
            await asyncio.sleep(1.0)
            assert not waiting.done()
            await hold.commit()
            answer = await waiting
            assert answer.status_code == 201 and answer.json() == {"held": True}, answer.text
            assert answer.headers[idempotency.REPLAYED_HEADER] == "true"

            # 2. The holder never finishes: 409 "in progress" after the bounded wait.
            stuck = key()
            hold = holder.transaction()
            await hold.start()
            await holder.execute(
                "INSERT INTO idempotency_keys (agent_id, key, fingerprint, method, path)"
                " VALUES ($1, $2, $3, 'POST', '/api/tickets')",
                agent_id, stuck, fingerprint,
            )  # fmt: skip
            started = time.monotonic()
            busy = await client.post("/api/tickets", json=body, headers={"Idempotency-Key": stuck})
            waited = time.monotonic() - started
            assert busy.status_code == 409 and "in progress" in busy.json()["detail"], busy.text
            assert int(busy.headers["Retry-After"]) >= 1
            assert idempotency.WAIT_SECONDS - 0.5 <= waited < idempotency.WAIT_SECONDS + 5
            # The holder gives up (a crash, say): the key is free and the request does the work.
            await hold.rollback()
            done = await client.post("/api/tickets", json=body, headers={"Idempotency-Key": stuck})
            assert done.status_code == 201 and done.json()["caller_id"] == caller["id"], done.text
        finally:
            await holder.close()
    assert (
        db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE caller_id = $1", caller["id"]) == 1
    )


def test_keys_expire_after_24_hours_and_are_pruned(agent: httpx.Client, pg_url: str) -> None:
    caller = new_caller(agent)
    once = key()
    body = {"caller_id": caller["id"], "body": "Kemarin lusa."}
    first = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": once})
    assert first.status_code == 201
    db.fetchval(pg_url, "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
                        " WHERE key = $1 RETURNING 1", once)  # fmt: skip
    # An expired key is a new request: the work is done again, and the key is taken anew.
    later = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": once})
    assert later.status_code == 201 and later.json()["id"] != first.json()["id"]
    assert idempotency.REPLAYED_HEADER not in later.headers
    again = agent.post("/api/tickets", json=body, headers={"Idempotency-Key": once})
    assert again.content == later.content
    old = key()
    agent.post("/api/tickets", json=body, headers={"Idempotency-Key": old})
    db.fetchval(pg_url, "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
                        " WHERE key = $1 RETURNING 1", old)  # fmt: skip

    async def prune() -> tuple[int, list[str]]:
        conn = await asyncpg.connect(pg_url)
        try:
            removed = await store.prune(conn, batch=1)
            kept = await conn.fetch("SELECT key FROM idempotency_keys WHERE key = ANY($1::text[])",
                                    [once, old])  # fmt: skip
        finally:
            await conn.close()
        return removed, [r["key"] for r in kept]

    removed, kept = asyncio.run(prune())
    assert removed >= 1 and kept == [once]
    assert store.TTL == timedelta(hours=24)


# --- the console ---------------------------------------------------------------------------


def console(stack: LoketStack) -> httpx.Client:
    """An httpx client logged in through the console's login form."""
    username = f"konsol-{uuid.uuid4().hex[:8]}"
    password = stack.add_agent(username, "agent")
    client = httpx.Client(base_url=stack.url, timeout=30)
    client.get("/login")
    csrf = client.cookies["loket_csrf"]
    logged_in = client.post(
        "/login", data={"username": username, "password": password, "csrf": csrf}
    )
    assert logged_in.status_code == 303, logged_in.text
    return client


def form_fields(html: str, action: str, occurrence: int = 0) -> dict[str, str]:
    """The hidden fields of the `occurrence`-th form posting to `action`."""
    forms = re.findall(
        rf'<form method="post" action="{re.escape(action)}"[^>]*>(.*?)</form>', html, re.S
    )
    assert len(forms) > occurrence, f"no form for {action}"
    return dict(
        re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', forms[occurrence])
    )


def posted_together(client: httpx.Client, path: str, data: dict[str, str], count: int = 2
                    ) -> list[httpx.Response]:  # fmt: skip
    """A double click: the same rendered form posted `count` times at once."""
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=str(client.base_url), cookies=client.cookies, timeout=30) as c:
            c.get("/healthz")
            barrier.wait()
            return c.post(path, data=data)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_console_double_submits_are_done_once(
    stack: LoketStack, agent: httpx.Client, pg_url: str
) -> None:
    client = console(stack)
    # Register a caller: the registration form, sent twice.
    phone = f"0813{uuid.uuid4().int % 10**8:08d}"
    page = client.get("/callers", params={"phone": phone})
    fields = form_fields(page.text, "/callers")
    assert fields.keys() >= {"csrf", "idempotency_key"}
    again = form_fields(client.get("/callers", params={"phone": phone}).text, "/callers")
    assert again["idempotency_key"] != fields["idempotency_key"], "one key per rendering"
    answers = posted_together(client, "/callers", {**fields, "phone": phone, "name": "Bu Dobel"})
    assert [a.status_code for a in answers] == [303, 303], [a.text for a in answers]
    assert len({a.headers["location"] for a in answers}) == 1
    caller_id = int(answers[0].headers["location"].rsplit("/", 1)[1])
    assert db.fetchval(pg_url, "SELECT count(*) FROM callers WHERE name = 'Bu Dobel' AND id >= $1",
                       caller_id) == 1  # fmt: skip

    # Open a ticket for the call: the form, sent twice.
    page = client.get(f"/callers/{caller_id}")
    fields = form_fields(page.text, f"/callers/{caller_id}/tickets")
    answers = posted_together(client, f"/callers/{caller_id}/tickets",
                              {**fields, "channel": "phone", "subject": "Dobel", "body": "Klik dua kali."})  # fmt: skip
    assert [a.status_code for a in answers] == [303, 303], [a.text for a in answers]
    assert len({a.headers["location"] for a in answers}) == 1
    ticket_id = int(answers[0].headers["location"].rsplit("/", 1)[1])
    assert db.fetchval(pg_url, "SELECT count(*) FROM tickets WHERE caller_id = $1", caller_id) == 1

    # Reply: two posts of the same rendered form send one reply.
    page = client.get(f"/tickets/{ticket_id}")
    fields = form_fields(page.text, f"/tickets/{ticket_id}/reply")
    reply = {**fields, "channel": "phone", "body": "Sudah kami catat."}
    answers = posted_together(client, f"/tickets/{ticket_id}/reply", reply)
    assert [a.status_code for a in answers] == [303, 303], [a.text for a in answers]
    assert {a.headers["location"] for a in answers} == {f"/tickets/{ticket_id}#reply"}
    replies = db.fetchval(pg_url, "SELECT count(*) FROM messages WHERE ticket_id = $1 AND direction = 'out'",
                          ticket_id)  # fmt: skip
    assert replies == 1
    # The same form sent once more later, with other words: refused, nothing sent.
    changed = client.post(f"/tickets/{ticket_id}/reply", data={**reply, "body": "Lain."})
    assert changed.status_code == 409 and "isian lain" in changed.text
    assert "Lain." in changed.text  # the draft is kept
    assert db.fetchval(pg_url, "SELECT count(*) FROM messages WHERE ticket_id = $1 AND direction = 'out'",
                       ticket_id) == 1  # fmt: skip

    # Move the ticket: the transition form, sent twice, escalates once.
    page = client.get(f"/tickets/{ticket_id}")
    fields = form_fields(page.text, f"/tickets/{ticket_id}/transition")
    answers = posted_together(client, f"/tickets/{ticket_id}/transition",
                              {**fields, "action": "escalate", "note": ""})  # fmt: skip
    assert [a.status_code for a in answers] == [303, 303], [a.text for a in answers]
    kinds = [r["kind"] for r in db.fetch(pg_url, "SELECT kind FROM ticket_events WHERE ticket_id = $1"
                                                 " ORDER BY id", ticket_id)]  # fmt: skip
    assert kinds.count("escalated") == 1, kinds
    assert db.fetchval(pg_url, "SELECT tier FROM tickets WHERE id = $1", ticket_id) == "support"

    # A form without a key (an old page) still works as before.
    plain = client.post(f"/tickets/{ticket_id}/reply",
                        data={"csrf": fields["csrf"], "channel": "phone", "body": "Tanpa kunci."})  # fmt: skip
    assert plain.status_code == 303
    bad = client.post(f"/tickets/{ticket_id}/reply",
                      data={"csrf": fields["csrf"], "idempotency_key": "bukan kunci", "body": "x"})  # fmt: skip
    assert bad.status_code == 400
