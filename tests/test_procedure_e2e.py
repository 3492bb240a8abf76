"""The help-desk procedure through the HTTP API of a running loket, call by call."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.support import db
from tests.support.stack import LoketStack

pytestmark = pytest.mark.slow


def suffix() -> str:
    """Eight random digits, so reruns against one database do not collide."""
    return f"{uuid.uuid4().int % 10**8:08d}"


def ok(response: httpx.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def transition(agent: httpx.Client, ticket_id: int, action: str, **fields: str) -> httpx.Response:
    return agent.post(f"/api/tickets/{ticket_id}/transitions", json={"action": action, **fields})


def register(agent: httpx.Client, name: str, **fields: object) -> dict:
    return ok(agent.post("/api/callers", json={"name": name, **fields}), 201)


def test_help_desk_procedure(stack: LoketStack, pg_url: str) -> None:
    username = f"siti-{uuid.uuid4().hex[:6]}"
    agent = stack.client(username)
    digits = suffix()
    typed = f"0812-{digits[:4]}-{digits[4:]}"
    e164 = f"+62812{digits}"

    # 1. A person calls; the number is unknown.
    assert ok(agent.get("/api/callers", params={"phone": typed})) == []

    # 2. Register the caller.
    caller = register(
        agent, "Ibu Ratna Dewi", phone=f"0812 {digits[:4]} {digits[4:]}",
        organization="SMPN 1 Bandung", organization_code="20219151", region="Jawa Barat",
    )  # fmt: skip
    caller_id = caller["id"]
    assert [(i["kind"], i["value"], i["valid"]) for i in caller["identities"]] == [
        ("phone", e164, True)
    ]
    assert caller["tickets"] == [] and caller["organization"] == "SMPN 1 Bandung"

    # 4. No ticket yet: open one from the call and record the problem.
    started = time.perf_counter()
    ticket = ok(
        agent.post(
            "/api/tickets",
            json={
                "caller_id": caller_id, "channel": "phone", "subject": "Dapodik tidak bisa sinkron",
                "body": "Sinkronisasi Dapodik gagal sejak pagi, muncul pesan koneksi terputus.",
            },
        ),
        201,
    )  # fmt: skip
    open_ms = (time.perf_counter() - started) * 1000
    ticket_id = ticket["id"]
    assert (ticket["status"], ticket["tier"], ticket["channel"]) == ("open", "agent", "phone")
    assert ticket["caller_id"] == caller_id and ticket["resolution_due"] is not None
    [call] = ticket["messages"]
    assert (call["direction"], call["channel"], call["sender"]) == ("in", "phone", e164)
    assert call["external_id"] is None and "koneksi terputus" in call["body_display"]
    created = [e for e in ticket["events"] if e["kind"] == "created"]
    assert created and created[0]["actor"] == username

    # Known number, typed another way: the caller and the status of their tickets.
    for form in (f"+62 812 {digits[:4]} {digits[4:]}", f"62812{digits}", typed):
        [found] = ok(agent.get("/api/callers", params={"phone": form}))
        assert found["id"] == caller_id and found["name"] == "Ibu Ratna Dewi"
        assert [(t["id"], t["status"], t["tier"]) for t in found["tickets"]] == [
            (ticket_id, "open", "agent")
        ]
        assert found["tickets"][0]["subject"] == "Dapodik tidak bisa sinkron"
    assert [c["id"] for c in ok(agent.get("/api/callers", params={"q": "smpn 1 bandung"}))].count(
        caller_id
    ) == 1
    assert [c["id"] for c in ok(agent.get("/api/callers", params={"q": digits[2:]}))] == [caller_id]

    # 6. Cannot solve it now → pending; 3. support, then management.
    pended = ok(transition(agent, ticket_id, "pend", note="Menunggu pengecekan server"))
    assert pended["status"] == "pending"
    at_support = ok(transition(agent, ticket_id, "escalate", note="Perlu tim support"))
    assert (at_support["status"], at_support["tier"]) == ("open", "support")
    assert at_support["resolution_due"] != pended["resolution_due"]
    at_management = ok(transition(agent, ticket_id, "escalate", note="Support tidak bisa"))
    assert at_management["tier"] == "management"
    refused = transition(agent, ticket_id, "escalate")
    assert refused.status_code == 409 and "beyond management" in refused.json()["detail"]
    refused = transition(agent, ticket_id, "close", reason="resolved")
    assert refused.status_code == 409 and "solution" in refused.json()["detail"]
    assert transition(agent, ticket_id, "close", reason="fixed", solution="x").status_code == 422

    # 7. Solved: closed with its solution, which feeds the knowledge base.
    solution = "Sertifikat server Dapodik diperbarui; sinkronisasi berhasil."
    closed = ok(transition(agent, ticket_id, "close", reason="resolved", solution=solution))
    assert (closed["status"], closed["close_reason"], closed["solution"]) == (
        "closed",
        "resolved",
        solution,
    )
    assert closed["closed_at"] is not None
    path = [
        (e["kind"], e["from_status"], e["to_status"], e["from_tier"], e["to_tier"], e["actor"])
        for e in closed["events"]
        if e["kind"] in ("pended", "escalated", "closed")
    ]
    assert path == [
        ("pended", "open", "pending", "agent", "agent", username),
        ("escalated", "pending", "open", "agent", "support", username),
        ("escalated", "open", "open", "support", "management", username),
        ("closed", "open", "closed", "management", "management", username),
    ]
    agent_id = db.fetchval(pg_url, "SELECT id FROM agents WHERE username = $1", username)
    assert {
        r["agent_id"]
        for r in db.fetch(
            pg_url, "SELECT agent_id FROM ticket_events WHERE ticket_id = $1", ticket_id
        )
    } == {agent_id}
    [article] = db.fetch(pg_url, "SELECT * FROM kb_articles WHERE source_ticket_id = $1", ticket_id)
    assert article["status"] == "draft" and article["solution"] == solution
    assert article["problem"].startswith("Dapodik tidak bisa sinkron\n\nSinkronisasi Dapodik gagal")
    refused = transition(agent, ticket_id, "pend")
    assert refused.status_code == 409 and "closed ticket" in refused.json()["detail"]

    # 5. A second call; the caller decides not to report after all.
    second = ok(
        agent.post(
            "/api/tickets",
            json={"caller_id": caller_id, "channel": "phone", "subject": "Akun guru terkunci",
                  "body": "Akun SIMPKB terkunci."},
        ),
        201,
    )  # fmt: skip
    withdrawn = ok(
        transition(agent, second["id"], "close", reason="withdrawn", note="Penelepon membatalkan")
    )
    assert (withdrawn["status"], withdrawn["close_reason"], withdrawn["solution"]) == (
        "closed",
        "withdrawn",
        None,
    )
    assert (
        db.fetch(pg_url, "SELECT 1 FROM kb_articles WHERE source_ticket_id = $1", second["id"])
        == []
    )
    [found] = ok(agent.get("/api/callers", params={"phone": e164}))
    assert {(t["id"], t["status"]) for t in found["tickets"]} == {
        (ticket_id, "closed"),
        (second["id"], "closed"),
    }

    # A number that someone already has: 409 naming who.
    taken = agent.post("/api/callers", json={"name": "Orang Lain", "phone": f"62812{digits}"})
    assert taken.status_code == 409, taken.text
    assert taken.json()["detail"]["caller"] == {"id": caller_id, "name": "Ibu Ratna Dewi"}
    assert (
        db.fetch(pg_url, "SELECT 1 FROM callers WHERE name = 'Orang Lain' AND id > $1", caller_id)
        == []
    )

    # The same person registered twice: duplicates are suggested, merged only on request.
    email = f"ratna.{uuid.uuid4().hex[:8]}@smpn1bdg.sch.id"
    twin = register(agent, "Ratna Dewi, S.Pd.", email=email.upper())
    assert twin["identities"][0]["value"] == email
    twin_ticket = ok(
        agent.post("/api/tickets", json={"caller_id": twin["id"], "channel": "walk_in",
                                         "subject": "Lupa NUPTK", "body": "Datang langsung ke loket."}),
        201,
    )  # fmt: skip
    suggested = ok(agent.get(f"/api/callers/{twin['id']}/duplicates"))
    assert caller_id in [d["id"] for d in suggested]
    assert ok(agent.get(f"/api/callers/{twin['id']}"))["id"] == twin["id"]

    # Merging is for the support team and up (the role matrix); the front-line agent asks.
    refused = agent.post(f"/api/callers/{twin['id']}/merge", json={"into": caller_id})
    assert refused.status_code == 403, refused.text
    supervisor_name = f"yuni-{uuid.uuid4().hex[:6]}"
    supervisor = stack.client(supervisor_name, role="support")
    merged = ok(supervisor.post(f"/api/callers/{twin['id']}/merge", json={"into": caller_id}))
    assert merged["id"] == caller_id and merged["merged_from"] == twin["id"]
    redirected = ok(agent.get(f"/api/callers/{twin['id']}"))
    assert redirected["id"] == caller_id and redirected["merged_from"] == twin["id"]
    assert twin["id"] in redirected["merged_ids"]
    assert {t["id"] for t in redirected["tickets"]} == {ticket_id, second["id"], twin_ticket["id"]}
    assert {(i["kind"], i["value"]) for i in redirected["identities"]} == {
        ("phone", e164),
        ("email", email),
    }
    merge_events = [e for e in redirected["events"] if e["kind"] == "merged"]
    assert merge_events and merge_events[-1]["actor"] == supervisor_name
    assert ok(agent.get(f"/api/tickets/{twin_ticket['id']}"))["caller_id"] == caller_id
    assert [c["id"] for c in ok(agent.get("/api/callers", params={"email": email}))] == [caller_id]
    assert twin["id"] not in [
        c["id"] for c in ok(agent.get("/api/callers", params={"q": "Ratna Dewi"}))
    ]
    again = supervisor.post(f"/api/callers/{twin['id']}/merge", json={"into": caller_id})
    assert again.status_code == 409

    # Identities added and removed by hand.
    fax = ok(
        agent.post(
            f"/api/callers/{caller_id}/identities",
            json={"kind": "fax", "value": f"022-7{digits[:6]}"},
        ),
        201,
    )
    [fax_identity] = [i for i in fax["identities"] if i["kind"] == "fax"]
    assert fax_identity["value"] == f"+62227{digits[:6]}"
    assert [
        c["id"] for c in ok(agent.get("/api/callers", params={"phone": f"(022) 7{digits[:6]}"}))
    ] == [caller_id]
    removing = f"/api/callers/{caller_id}/identities/{fax_identity['id']}"
    assert agent.delete(removing).status_code == 403
    after = ok(supervisor.delete(removing))
    assert "fax" not in [i["kind"] for i in after["identities"]]

    # 8. Nothing missed: the open report shows the open walk-in ticket, not the closed ones.
    assert agent.get("/api/reports/open").status_code == 403
    report = ok(stack.client(role="manager").get("/api/reports/open"))
    listed = [t["id"] for g in report["groups"] for t in g["tickets"]]
    assert twin_ticket["id"] in listed and ticket_id not in listed and second["id"] not in listed
    assert len(listed) == len(set(listed)) == report["total"]
    cli = subprocess.run(
        [sys.executable, "-m", "workers.cli", "report", "open", "--json"],
        env=stack.env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert twin_ticket["id"] in [
        t["id"] for g in json.loads(cli.stdout)["groups"] for t in g["tickets"]
    ]
    table = subprocess.run(
        [sys.executable, "-m", "workers.cli", "report", "open"],
        env={**stack.env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "Lupa NUPTK" in table.stdout and "agent / open" in table.stdout

    print(f"\nopening a ticket from a call: {open_ms:.1f} ms")


def test_transitions_need_a_login_and_an_existing_ticket(stack: LoketStack) -> None:
    anonymous = httpx.Client(base_url=stack.url, timeout=10)
    assert anonymous.post("/api/tickets/1/transitions", json={"action": "pend"}).status_code == 401
    assert anonymous.get("/api/callers", params={"phone": "0812"}).status_code == 401
    agent = stack.client()
    assert transition(agent, 2**40, "pend").status_code == 404
    assert agent.get("/api/callers").status_code == 422
    assert agent.get("/api/callers/999999999").status_code == 404
    missing = agent.post("/api/tickets", json={"caller_id": 2**40, "channel": "phone", "body": "x"})
    assert missing.status_code == 404


def test_tickets_are_taken_and_the_queue_filters_by_owner(stack: LoketStack) -> None:
    sari_name = f"sari-{uuid.uuid4().hex[:6]}"
    sari = stack.client(sari_name)
    budi = stack.client()
    login = httpx.post(f"{stack.url}/api/login", timeout=10,
                       json={"username": sari_name, "password": "rahasia-loket-123"})  # fmt: skip
    sari_id = ok(login)["agent"]["id"]
    caller = register(sari, "Pak Anwar", phone=f"0813{suffix()}")
    tickets = [
        ok(sari.post("/api/tickets", json={"caller_id": caller["id"], "channel": "phone",
                                           "subject": f"Soal {n}", "body": "Printer macet"}), 201)["id"]
        for n in range(2)
    ]  # fmt: skip
    assert all(ok(sari.get(f"/api/tickets/{t}"))["assignee_id"] is None for t in tickets)

    def listed(client: httpx.Client, assignee: str) -> set[int]:
        page = ok(client.get("/api/tickets", params={"assignee": assignee, "limit": 1000}))
        return {t["id"] for t in page["tickets"]}

    # Sari takes the first ticket: it is hers, and an event says who gave it to whom.
    taken = ok(sari.post(f"/api/tickets/{tickets[0]}/assignee", json={"agent_id": sari_id}))
    assert (taken["assignee_id"], taken["assignee"]) == (sari_id, sari_name)
    [event] = [e for e in taken["events"] if e["kind"] == "assigned"]
    assert event["actor"] == sari_name and event["data"]["to_username"] == sari_name
    assert tickets[0] in listed(sari, "me") and tickets[1] not in listed(sari, "me")
    assert tickets[0] not in listed(budi, "me")
    assert tickets[0] in listed(budi, str(sari_id))
    assert tickets[1] in listed(budi, "none") and tickets[0] not in listed(budi, "none")

    # Released again, it is nobody's.
    released = ok(budi.post(f"/api/tickets/{tickets[0]}/assignee", json={"agent_id": None}))
    assert released["assignee_id"] is None and tickets[0] in listed(budi, "none")

    # Refusals: an unknown agent, an unknown ticket, a malformed filter.
    refused = sari.post(f"/api/tickets/{tickets[1]}/assignee", json={"agent_id": 2**40})
    assert refused.status_code == 422, refused.text
    assert sari.post(f"/api/tickets/{2**40}/assignee", json={"agent_id": None}).status_code == 404
    assert sari.get("/api/tickets", params={"assignee": "somebody"}).status_code == 422
    assert ok(sari.get(f"/api/tickets/{tickets[1]}"))["assignee_id"] is None
