"""`loket up --demo`: sample Indonesian traffic through each channel's real inbound path, a demo
login that stays the same across restarts, and demo sinks that answer the agents' replies.

Calls are logged through the help-desk procedure like an agent logs them. Everything is
marked demo; nothing here runs without `--demo`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path

import asyncpg

from ticketing import agents, procedure
from ticketing.callers import IdentityTaken
from workers.runtime.runtime import Runtime
from workers.tools.demo.content import CALLS, EMAILS, FACEBOOK, SMS, TELEGRAM, TRICKLE, TWITTER
from workers.tools.demo.inbound import (
    DemoAccounts,
    send_email,
    send_facebook,
    send_sms,
    send_telegram,
    send_twitter,
)
from workers.tools.demo.sinks import DemoSinks

log = logging.getLogger(__name__)

DEMO_USER = "demo"
LOGIN_FILE = "demo-login.json"
# After the first burst, a new message every so often for a while, so the queue visibly lives.
TRICKLE_EVERY_SECONDS = 30.0
TRICKLE_COUNT = 10


# --- calls ---------------------------------------------------------------------------------


async def log_calls(conn: asyncpg.Connection, rt: Runtime, agent_id: int) -> list[int]:
    """Phone calls as an agent logs them, left at each tier and status of the procedure."""
    ticket_ids = []
    for name, organization, phone, problem, outcome in CALLS:
        identity = procedure.identity_from_input("phone", phone)
        try:
            caller_id = await procedure.register_caller(
                conn, procedure.CallerFields(name=name, organization=organization), [identity],
                actor=DEMO_USER, agent_id=agent_id,
            )  # fmt: skip
        except IdentityTaken as exc:
            caller_id = exc.caller_id
        await conn.execute("UPDATE callers SET is_demo = true WHERE id = $1", caller_id)
        async with conn.transaction():
            ticket_id = await procedure.log_contact(
                conn, caller_id=caller_id, channel="phone", subject="", body=problem,
                actor=DEMO_USER, agent_id=agent_id, rules=rt.rules,
            )  # fmt: skip
            await conn.execute("UPDATE tickets SET is_demo = true WHERE id = $1", ticket_id)
            steps: list[tuple[str, dict[str, str]]] = {
                "open": [],
                "pend": [("pend", {"note": "menunggu dokumen dari pusat"})],
                "support": [("escalate", {"note": "perlu akses basis data Dapodik"})],
                "management": [("escalate", {}), ("escalate", {"note": "butuh keputusan pimpinan"})],
                "resolved": [("close", {"reason": "resolved",
                                        "solution": "Kata sandi Info GTK direset; penelepon sudah bisa masuk."})],
                "withdrawn": [("close", {"reason": "withdrawn"})],
            }[outcome]  # fmt: skip
            for action, fields in steps:
                await procedure.transition(
                    conn, ticket_id, action, actor=DEMO_USER, agent_id=agent_id, rules=rt.rules,
                    note=fields.get("note"), solution=fields.get("solution"), reason=fields.get("reason"),
                )  # fmt: skip
        ticket_ids.append(ticket_id)
    return ticket_ids


async def _mark_demo_callers(conn: asyncpg.Connection) -> None:
    """Callers the pipeline created for demo messages: demo too, unless they have real tickets."""
    await conn.execute(
        "UPDATE callers c SET is_demo = true WHERE NOT c.is_demo"
        " AND EXISTS (SELECT 1 FROM tickets t WHERE t.caller_id = c.id AND t.is_demo)"
        " AND NOT EXISTS (SELECT 1 FROM tickets t WHERE t.caller_id = c.id AND NOT t.is_demo)"
    )


# --- the demo ------------------------------------------------------------------------------


async def _first_burst(rt: Runtime, accounts: DemoAccounts) -> None:
    for name, address, subject, body, extra in EMAILS:
        await send_email(rt, name, address, subject, body, extra)
    for number, text in SMS:
        await send_sms(rt, accounts, number, text)
    for user_id, first, last, text in TELEGRAM:
        await send_telegram(rt, accounts, user_id, first, last, text)
    for psid, text in FACEBOOK:
        await send_facebook(rt, accounts, psid, text)
    for x_user_id, name, handle, text in TWITTER:
        await send_twitter(rt, accounts, x_user_id, name, handle, text)


async def _trickle(rt: Runtime, accounts: DemoAccounts) -> None:
    for i in range(TRICKLE_COUNT):
        await asyncio.sleep(TRICKLE_EVERY_SECONDS)
        channel, sender, text = TRICKLE[i % len(TRICKLE)]
        if channel == "sms":
            await send_sms(rt, accounts, sender, text)
        elif channel == "telegram":
            await send_telegram(rt, accounts, int(sender), "Warga", "Demo", text)
        elif channel == "facebook":
            await send_facebook(rt, accounts, sender, text)
        else:
            await send_email(rt, "Kepala Sekolah", sender, "Surat edaran libur semester", text)
        async with rt.pool.acquire() as conn:
            await _mark_demo_callers(conn)


async def demo_login(rt: Runtime) -> tuple[int, str]:
    """The demo agent and its password, kept in the data directory (mode 0600) so the login
    a person noted still works after a restart; made again when the database lost it."""
    path = Path(rt.settings.data_dir) / LOGIN_FILE
    password = None
    try:
        password = json.loads(path.read_text(encoding="utf-8"))["password"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if password is not None:
        found = await agents.authenticate(rt.pool, DEMO_USER, password)
        if found is not None:
            return int(found["id"]), password
    password = password or secrets.token_urlsafe(12)
    async with rt.pool.acquire() as conn:
        agent_id = await agents.add_agent(conn, DEMO_USER, password, "admin", display_name="Demo")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"username": DEMO_USER, "password": password}, out)
    return agent_id, password


async def run_demo(rt: Runtime) -> None:
    """Print the demo login, then send the sample traffic once per database."""
    try:
        agent_id, password = await demo_login(rt)
        async with rt.pool.acquire() as conn:
            already = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tickets WHERE is_demo)")
        print(f"demo: log in at {rt.settings.public_base()}/login as {DEMO_USER!r} with password"
              f" {password!r}; replies on demo tickets are answered by the demo", flush=True)  # fmt: skip
        if already:
            print(
                "demo: sample traffic is already in this database; not sending it again", flush=True
            )
            return
        sinks: DemoSinks = rt.demo
        accounts = sinks.accounts
        async with rt.pool.acquire() as conn:
            calls = await log_calls(conn, rt, agent_id)
        await _first_burst(rt, accounts)
        print(f"demo: {len(calls)} phone calls logged; e-mail, SMS, Telegram, Facebook and X messages"
              " sent through their inbound paths", flush=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with rt.pool.acquire() as conn:
                channels = await conn.fetchval(
                    "SELECT count(DISTINCT channel) FROM tickets WHERE is_demo AND channel <> 'phone'"
                )
                await _mark_demo_callers(conn)
            if channels >= 5:
                break
            await asyncio.sleep(0.5)
        await _trickle(rt, accounts)
    except asyncio.CancelledError:
        raise
    except Exception:
        # The demo is an extra: its failure is logged and never takes the running system down.
        log.exception("demo traffic failed")
