"""The kb-suggest stage: after a caller's message, store the articles most like the ticket's problem."""

from __future__ import annotations

import json
import logging

from aiokafka.structs import ConsumerRecord

from ticketing import kb
from workers.pipeline import bus
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)


def tickets_to_suggest(records: list[ConsumerRecord]) -> list[int]:
    """The tickets that got a caller's message in these events, each once, in order."""
    tickets: dict[int, None] = {}
    for record in records:
        try:
            event = json.loads(record.value or b"")
        except ValueError as exc:
            raise bus.PoisonMessage(f"event is not JSON: {exc}") from exc
        if not isinstance(event, dict):
            raise bus.PoisonMessage("event is not a JSON object")
        # A bounce is the mail system talking, not the caller: it says nothing about the problem.
        if (
            event.get("type") == "message"
            and event.get("direction") == "in"
            and event.get("outcome") != "bounce"
        ):
            ticket_id = event.get("ticket_id")
            if not isinstance(ticket_id, int):
                raise bus.PoisonMessage(f"message event without a ticket id: {event!r}"[:500])
            tickets.setdefault(ticket_id, None)
    return list(tickets)


def kb_suggest_handler(rt: Runtime) -> bus.BatchHandler:
    """EVENTS -> ticket_suggestions: off the hot path, one transaction per ticket."""

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        for ticket_id in tickets_to_suggest(records):
            async with rt.pool.acquire() as conn, conn.transaction():
                hits = await kb.suggest(conn, ticket_id)
                await kb.store_suggestions(conn, ticket_id, hits)
            log.debug("ticket %d: %d suggestions", ticket_id, len(hits))
        return []

    return handle
