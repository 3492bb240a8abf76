"""Session-wide real servers: PostgreSQL database, Tansu broker, Dovecot, SMTP, and a running loket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack

ARTIFACTS = Path(
    os.environ.get(
        "LOKET_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"
    )
)
HELPDESK_PASSWORD = "imap-secret-123"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = db.create_database()
    yield url
    db.drop_database(url)


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    server = TansuBroker.start(log_dir=tmp_path_factory.mktemp("tansu"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    with DovecotServer.start(tmp_path_factory.mktemp("dovecot")) as server:
        server.add_user("helpdesk", HELPDESK_PASSWORD)
        yield server


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer.start()
    yield server
    server.stop()


def email_config(
    dovecot: DovecotServer, smtp: SmtpServer, user: str = "helpdesk", name: str = "helpdesk"
) -> str:
    return f"""
[[channels.email]]
name = "{name}"
address = "{user}@helpdesk.example.org"
imap_host = "127.0.0.1"
imap_port = {dovecot.port}
imap_user = "{user}"
imap_password = "env:TEST_IMAP_PASSWORD"
imap_tls = "none"
imap_folder = "INBOX"
smtp_host = "127.0.0.1"
smtp_port = {smtp.port}
smtp_tls = "none"
"""


@pytest.fixture(scope="session")
def stack(
    pg_url: str,
    session_broker: TansuBroker,
    dovecot: DovecotServer,
    smtp: SmtpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LoketStack]:
    """One `loket up` for the session's end-to-end tests (tests keep to their own senders).

    A test that needs a stack of its own gives it its own broker: two stacks on one
    broker would share consumer groups and process each other's messages.
    """
    running = LoketStack(
        database_url=pg_url,
        bootstrap=session_broker.bootstrap,
        config_text=email_config(dovecot, smtp),
        workdir=tmp_path_factory.mktemp("loket"),
        extra_env={"TEST_IMAP_PASSWORD": HELPDESK_PASSWORD},
    )
    running.up()
    yield running
    running.stop()


# --- test groups -------------------------------------------------------------------------------

# Each test module's group, as a marker: `unit` needs no server (in-process fakes at most),
# `db` needs PostgreSQL, `e2e` a broker, a mail server, Kannel, a browser, OCR or loket
# processes. `pytest -m unit` runs in seconds; a module not listed here is a collection error.
TEST_GROUPS: dict[str, tuple[str, ...]] = {
    "unit": (
        "adapters", "budget", "canonical", "compose", "config", "delivery_policy",
        "email_normalize", "email_parse", "facebook", "intake", "kannel", "matching",
        "media_fetch", "phone", "sla", "sms_text", "stage_memory", "states", "supervisor",
        "telegram", "twilio", "twitter",
    ),
    "db": ("kb_search", "procedure_db"),
    "e2e": (
        "api_security", "bad_input", "bench", "bus", "console_browser", "demo",
        "edge_validation", "email_e2e", "email_faults", "email_realworld", "embedded", "faults",
        "fax", "fax_e2e", "http_hardening", "idempotency", "imap", "installation", "journal", "kb_e2e",
        "log_secrets", "login", "mailpoll_pool", "ops_dashboard", "ops_e2e", "oversize", "procedure_e2e", "roles",
        "sms_e2e", "social_e2e", "stall", "support",
    ),
}  # fmt: skip
_GROUP_OF = {f"test_{name}": group for group, names in TEST_GROUPS.items() for name in names}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unlisted = set()
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        group = _GROUP_OF.get(module)
        if group is None:
            unlisted.add(module)
            continue
        item.add_marker(getattr(pytest.mark, group))
    if unlisted:
        raise pytest.UsageError(
            f"tests/conftest.py TEST_GROUPS: say the group of {', '.join(sorted(unlisted))}"
        )
