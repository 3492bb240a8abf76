"""The role matrix: what an agent of each role may do, one permission per row."""

from __future__ import annotations

from dataclasses import dataclass

# Ordered as the procedure escalates: front-line agent, support team, management; admins run
# the installation. Each role may do everything the roles before it may.
ROLES: tuple[str, ...] = ("agent", "support", "manager", "admin")


@dataclass(frozen=True)
class Permission:
    name: str
    least_role: str  # the first role in ROLES that may do it; the later ones may too
    what: str

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[ROLES.index(self.least_role) :]


PERMISSIONS: dict[str, Permission] = {
    p.name: p
    for p in (
        Permission("tickets.read", "agent", "the queue, a ticket with its messages and events, attachments, live updates"),
        Permission("tickets.create", "agent", "open a ticket for a call or a visit"),
        Permission("tickets.reply", "agent", "answer the caller on a channel"),
        Permission("tickets.note", "agent", "add an internal note"),
        Permission("tickets.transition", "agent", "pend, resume, escalate, reopen; close as resolved, withdrawn or duplicate"),
        Permission("tickets.assign", "agent", "take a ticket or give it to an agent"),
        Permission("tickets.close_spam", "support", "close a ticket as spam (a later message opens a new ticket)"),
        Permission("callers.read", "agent", "find callers, a caller's card and history, possible duplicates"),
        Permission("callers.write", "agent", "register a caller, give a caller another identity"),
        Permission("callers.remove_identity", "support", "take an identity away from a caller"),
        Permission("callers.merge", "support", "merge two callers into one"),
        Permission("kb.read", "agent", "search and read the knowledge base, a ticket's suggestions"),
        Permission("kb.write", "agent", "write, edit and publish articles, record that one helped"),
        Permission("kb.retire", "manager", "retire an article, or bring a retired one back"),
        Permission("reports.read", "manager", "the open report and the knowledge-base report"),
        Permission("ops.read", "agent", "the ops summary and message traces"),
        Permission("ops.shunt", "manager", "the shunted records"),
        Permission("agents.own_password", "agent", "change one's own password (with the current one)"),
        Permission("agents.password", "admin", "set another agent's password"),
    )
}  # fmt: skip


class UnknownPermission(KeyError):
    """A permission name that is not in the matrix: a typo in a route, caught at import."""


def permission(name: str) -> Permission:
    try:
        return PERMISSIONS[name]
    except KeyError:
        raise UnknownPermission(name) from None


def allows(role: str, name: str) -> bool:
    """Whether an agent with `role` may do `name`; unknown roles may do nothing."""
    return role in permission(name).roles


def refusal(name: str) -> str:
    """The message for a refused action: what it needs."""
    wanted = permission(name)
    *first, last = wanted.roles
    who = f"{', '.join(first)} and {last}" if first else last
    return f"not allowed: {wanted.what} ({name}) is for {who}"
