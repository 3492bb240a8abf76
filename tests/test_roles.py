"""The role matrix: the table itself, the README's copy, every route naming a permission, and
every row enforced through the running API (allowed → answered, not allowed → 403)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.stack import LoketStack
from ticketing import roles

README = Path(__file__).resolve().parent.parent / "README.md"
# Routes any caller may use, or that check their permission inside (own password or anyone's).
UNGUARDED = {("POST", "/api/login"), ("POST", "/api/logout"), ("POST", "/api/agents/{agent_id}/password")}  # fmt: skip


# --- the table -----------------------------------------------------------------------------


def test_each_role_may_do_what_the_roles_before_it_may() -> None:
    for name, permission in roles.PERMISSIONS.items():
        assert permission.name == name
        assert permission.roles == roles.ROLES[roles.ROLES.index(permission.least_role) :]
        assert roles.allows("admin", name)
        assert not roles.allows("visitor", name)
    assert not roles.allows("agent", "callers.merge") and roles.allows("support", "callers.merge")
    with pytest.raises(roles.UnknownPermission):
        roles.allows("admin", "tickets.close_spamm")
    assert "support, manager and admin" in roles.refusal("tickets.close_spam")


def test_readme_table_is_the_matrix() -> None:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- role-matrix")[1].split("<!-- /role-matrix -->")[0]
    rows = {}
    for line in block.splitlines():
        found = re.match(r"\| `([a-z_.]+)` \| (.+?) \|((?: [✓–] \|){4})$", line)
        if found:
            marks = tuple(mark.strip() == "✓" for mark in found[3].strip(" |").split("|"))
            rows[found[1]] = (found[2], marks)
    assert set(rows) == set(roles.PERMISSIONS), "README role table and ticketing/roles.py differ"
    for name, (what, marks) in rows.items():
        permission = roles.PERMISSIONS[name]
        assert what == permission.what, name
        assert marks == tuple(role in permission.roles for role in roles.ROLES), name


def test_every_api_route_names_its_permission() -> None:
    from workers.web.api import auth, desk, kb, ops, tickets

    unguarded = []
    routers = (auth.router, tickets.router, desk.router, kb.router, ops.router)
    for route in [route for router in routers for route in router.routes]:
        named = [getattr(d.call, "permission", None) for d in route.dependant.dependencies]  # type: ignore[attr-defined]
        for method in route.methods:  # type: ignore[attr-defined]
            key = (method, route.path)  # type: ignore[attr-defined]
            if key not in UNGUARDED and not any(named):
                unguarded.append(key)
    assert not unguarded, f"routes without require(permission): {unguarded}"


# Console routes before a login: the login form, leaving, the language switch, static files.
CONSOLE_OPEN = {("GET", "/login"), ("POST", "/login"), ("POST", "/logout"), ("POST", "/lang"),
                ("GET", "/static/{name}")}  # fmt: skip
_CHECKS = re.compile(r"await (?:login_required|session_agent)\(request, \"([a-z_.]+)\"\)")


def console_routes() -> dict[tuple[str, str], Callable[..., object]]:
    from workers.web.console import pages

    return {
        (method, route.path): route.endpoint  # type: ignore[attr-defined]
        for router in pages.ROUTERS
        for route in router.routes
        for method in route.methods  # type: ignore[attr-defined]
    }


def test_every_console_route_checks_a_permission_of_the_matrix() -> None:
    import inspect

    unchecked, unknown = [], []
    for key, endpoint in console_routes().items():
        named = _CHECKS.findall(inspect.getsource(endpoint))
        if key in CONSOLE_OPEN:
            assert not named, f"{key} is open and yet checks {named}"
        elif not named:
            unchecked.append(key)
        unknown += [(key, name) for name in named if name not in roles.PERMISSIONS]
    assert not unchecked, f"console routes that check no permission: {unchecked}"
    assert not unknown, unknown
    assert len(console_routes()) > len(CONSOLE_OPEN) + 10  # the routes were found at all


def test_no_console_route_answers_before_a_login(stack: LoketStack) -> None:
    anonymous = httpx.Client(base_url=stack.url, timeout=30)
    anonymous.get("/login")
    csrf = anonymous.cookies["loket_csrf"]
    answers = {}
    for method, path in console_routes():
        if (method, path) in CONSOLE_OPEN:
            continue
        url = re.sub(r"\{[a-z_]+\}", "1", path)
        response = anonymous.request(method, url, data={"csrf": csrf} if method == "POST" else None)
        answers[(method, path)] = response.status_code
        if response.status_code == 303:
            assert response.headers["location"].startswith("/login?next="), (path, response.headers)
    # A page sends the browser to the login form; what a page fetches (a stream, a file) is 401.
    assert set(answers.values()) <= {303, 401}, answers


# --- through the running API ---------------------------------------------------------------


def _digits() -> str:
    return str(uuid.uuid4().int)[:8]


def _caller(admin: httpx.Client, **fields: object) -> dict:
    response = admin.post("/api/callers", json={"name": "Ibu Matriks", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def _ticket(admin: httpx.Client) -> int:
    caller = _caller(admin, phone=f"0812{_digits()}")
    response = admin.post(
        "/api/tickets", json={"caller_id": caller["id"], "body": "Printer di ruang TU macet."}
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _article(admin: httpx.Client) -> int:
    response = admin.post(
        "/api/kb",
        json={"problem": f"Printer macet {_digits()}", "solution": "Matikan, cabut kertas."},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


Action = Callable[[LoketStack, httpx.Client, httpx.Client, str], httpx.Response]


def _console(stack: LoketStack, client: httpx.Client) -> httpx.Client:
    """A console (cookie) session for the same agent as `client`, with its CSRF token."""
    console = httpx.Client(base_url=stack.url, timeout=30)
    console.cookies.set("loket_session", client.headers["Authorization"].split()[1])
    console.get("/login")
    return console


def _note(stack: LoketStack, admin: httpx.Client, client: httpx.Client, _: str) -> httpx.Response:
    ticket_id = _ticket(admin)
    console = _console(stack, client)
    data = {"note": "Sudah dicek", "csrf": console.cookies["loket_csrf"]}
    return console.post(f"/tickets/{ticket_id}/notes", data=data)


def _remove_identity(
    stack: LoketStack, admin: httpx.Client, client: httpx.Client, _: str
) -> httpx.Response:
    caller = _caller(admin, phone=f"0812{_digits()}", email=f"m{_digits()}@example.org")
    identity = next(i for i in caller["identities"] if i["kind"] == "email")
    return client.delete(f"/api/callers/{caller['id']}/identities/{identity['id']}")


def _merge(stack: LoketStack, admin: httpx.Client, client: httpx.Client, _: str) -> httpx.Response:
    first, second = _caller(admin), _caller(admin)
    return client.post(f"/api/callers/{first['id']}/merge", json={"into": second["id"]})


def _set_password(
    stack: LoketStack, admin: httpx.Client, client: httpx.Client, _: str
) -> httpx.Response:
    target = f"target-{uuid.uuid4().hex[:8]}"
    stack.add_agent(target)
    login = httpx.post(
        f"{stack.url}/api/login", json={"username": target, "password": "rahasia-loket-123"}
    )
    target_id = login.json()["agent"]["id"]
    return client.post(f"/api/agents/{target_id}/password", json={"password": "kopi-tubruk-pagi-7"})


def _own_password(
    stack: LoketStack, admin: httpx.Client, client: httpx.Client, me: str
) -> httpx.Response:
    return client.post(f"/api/agents/{me}/password",
                       json={"password": "kopi-tubruk-pagi-7", "current_password": "rahasia-loket-123"})  # fmt: skip


# One request per row of the matrix; the own-password row last, since it ends the session.
ACTIONS: dict[str, Action] = {
    "tickets.read": lambda s, a, c, _: c.get(f"/api/tickets/{_ticket(a)}"),
    "tickets.create": lambda s, a, c, _: c.post("/api/tickets", json={"caller_id": _caller(a)["id"], "body": "Lupa sandi"}),
    "tickets.reply": lambda s, a, c, _: c.post(f"/api/tickets/{_ticket(a)}/replies", json={"body": "Sudah kami cek.", "channel": "phone"}),
    "tickets.note": _note,
    "tickets.transition": lambda s, a, c, _: c.post(f"/api/tickets/{_ticket(a)}/transitions", json={"action": "pend"}),
    "tickets.assign": lambda s, a, c, _: c.post(f"/api/tickets/{_ticket(a)}/assignee", json={"agent_id": None}),
    "tickets.close_spam": lambda s, a, c, _: c.post(f"/api/tickets/{_ticket(a)}/transitions", json={"action": "close", "reason": "spam"}),
    "callers.read": lambda s, a, c, _: c.get(f"/api/callers/{_caller(a)['id']}"),
    "callers.write": lambda s, a, c, _: c.post("/api/callers", json={"name": "Pak Baru", "phone": f"0813{_digits()}"}),
    "callers.remove_identity": _remove_identity,
    "callers.merge": _merge,
    "kb.read": lambda s, a, c, _: c.get("/api/kb", params={"q": "printer"}),
    "kb.write": lambda s, a, c, _: c.post("/api/kb", json={"problem": f"Wifi putus {_digits()}", "solution": "Nyalakan ulang router."}),
    "kb.retire": lambda s, a, c, _: c.patch(f"/api/kb/{_article(a)}", json={"status": "retired"}),
    "reports.read": lambda s, a, c, _: c.get("/api/reports/open"),
    "ops.read": lambda s, a, c, _: c.get("/api/ops/summary"),
    "ops.shunt": lambda s, a, c, _: c.get("/api/ops/shunt"),
    "agents.password": _set_password,
    "agents.own_password": _own_password,
}  # fmt: skip


def login(stack: LoketStack, role: str) -> tuple[httpx.Client, int]:
    """A client logged in as a fresh agent with `role`, and that agent's id."""
    username = f"{role}-{uuid.uuid4().hex[:8]}"
    password = stack.add_agent(username, role)
    client = httpx.Client(base_url=stack.url, timeout=30)
    response = client.post("/api/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    client.headers["Authorization"] = f"Bearer {response.json()['token']}"
    return client, int(response.json()["agent"]["id"])


@pytest.mark.slow
def test_every_row_of_the_matrix_through_the_api(stack: LoketStack) -> None:
    assert set(ACTIONS) == set(roles.PERMISSIONS), "every row of the matrix needs a request here"
    admin = stack.client(role="admin")
    for role in roles.ROLES:
        client, me = login(stack, role)
        for name, action in ACTIONS.items():
            response = action(stack, admin, client, str(me))
            if roles.allows(role, name):
                assert response.status_code < 400, (name, role, response.status_code, response.text)
            else:
                assert response.status_code == 403, (
                    name,
                    role,
                    response.status_code,
                    response.text,
                )
                assert name in response.text, response.text
    print(
        f"\n{len(ACTIONS)} permissions x {len(roles.ROLES)} roles through the API: as the matrix says"
    )


@pytest.mark.slow
def test_console_refuses_what_the_role_may_not(stack: LoketStack) -> None:
    admin = stack.client(role="admin")
    for role in roles.ROLES:
        console = _console(stack, stack.client(role=role))
        reports = console.get("/reports")
        assert reports.status_code == (200 if roles.allows(role, "reports.read") else 403), role
        assert "text/html" in reports.headers["content-type"]
        ticket_id = _ticket(admin)
        closed = console.post(f"/tickets/{ticket_id}/transition",
                              data={"action": "close", "reason": "spam", "csrf": console.cookies["loket_csrf"]})  # fmt: skip
        expected = 303 if roles.allows(role, "tickets.close_spam") else 403
        assert closed.status_code == expected, (role, closed.status_code)
        status = admin.get(f"/api/tickets/{ticket_id}").json()["status"]
        assert status == ("closed" if expected == 303 else "open"), role
