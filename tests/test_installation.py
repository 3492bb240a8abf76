"""The one-command install: ops commands find the running `loket up`, errors are one line,
a second start is refused, Ctrl-C is quick and quiet, a hand-started broker works."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.embedded import Up, add_agent, clean_env, loket, start_up
from tests.support.ports import free_port
from workers.runtime import installation
from workers.runtime.settings import ConfigError, Settings

KANNEL_SECRET = "kannel-inbound-secret-0123"


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, one line on stderr that says what is wrong, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loket: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = start_up(tmp_path_factory.mktemp("embedded"), "data")
    yield up
    if up.process.poll() is None:
        up.stop()


# --- the runtime file, without processes ----------------------------------------------------


HOLDER = (
    "import sys, time; from pathlib import Path; from workers.runtime import installation;"
    " lock = installation.hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the data directory's lock, as a running `loket up` does."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def announced(data_dir: Path, pid: int, database_url: str = "postgresql://u:pw@127.0.0.1:1/db"):  # type: ignore[no-untyped-def]
    found = installation.Installation(
        pid=pid, database_url=database_url, kafka_bootstrap="127.0.0.1:2",
        http_url="http://127.0.0.1:3/", started_at=time.time(),
    )  # fmt: skip
    installation.announce(data_dir, found)
    return found


def test_the_runtime_file_is_private_and_found_while_its_lock_is_held(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    found = announced(tmp_path, holder.pid)
    path = installation.runtime_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert installation.running(tmp_path) == found
    settings = installation.attach(Settings(data_dir=tmp_path))
    assert (settings.database_url, settings.kafka_bootstrap) == (
        "postgresql://u:pw@127.0.0.1:1/db",
        "127.0.0.1:2",
    )
    # What the environment sets must be the running installation's own: never mixed.
    with pytest.raises(ConfigError, match="LOKET_KAFKA_BOOTSTRAP is not what the loket up"):
        installation.attach(Settings(data_dir=tmp_path, kafka_bootstrap="elsewhere:9092"))
    same = installation.attach(Settings(data_dir=tmp_path, kafka_bootstrap="127.0.0.1:2"))
    assert same.database_url == found.database_url
    with pytest.raises(ConfigError, match="already running from"):
        installation.hold(tmp_path)


def test_a_database_loket_was_given_is_not_written_down(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    announced(tmp_path, holder.pid, database_url="")
    with pytest.raises(ConfigError, match="was given its LOKET_DATABASE_URL"):
        installation.attach(Settings(data_dir=tmp_path))
    assert installation.attach(Settings(data_dir=tmp_path), database=False).kafka_bootstrap


def test_a_runtime_file_nobody_holds_the_lock_for_is_no_installation(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    # Its loket was killed (-9, a power cut, a container stopped hard): the kernel let go of
    # the lock, whatever process now has that pid.
    announced(tmp_path, os.getpid())
    holder.kill()
    holder.wait()
    assert installation.running(tmp_path) is None
    with pytest.raises(ConfigError, match="no running loket found in .*LOKET_DATABASE_URL"):
        installation.attach(Settings(data_dir=tmp_path))
    installation.hold(tmp_path).close()  # a new loket up may start
    installation.withdraw(tmp_path)
    assert not installation.runtime_path(tmp_path).exists()


def test_public_url_follows_the_http_address_unless_set() -> None:
    assert Settings(http_addr="127.0.0.1:9123").public_base() == "http://127.0.0.1:9123"
    assert Settings(http_addr="0.0.0.0:9124").public_base() == "http://127.0.0.1:9124"
    assert Settings(http_addr="0.0.0.0:1", public_url="https://x.example/").public_base() == (
        "https://x.example"
    )


# --- errors a person can read ---------------------------------------------------------------


@pytest.mark.slow
def test_ops_commands_without_a_running_installation_say_so(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "none", free_port())
    for args in (("status",), ("report", "open"), ("trace", "abc"), ("dlq", "list")):
        one_line_error(loket(env, *args), "no running loket found", str(tmp_path / "none"))


@pytest.mark.slow
def test_a_wrong_account_stops_the_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "loket.toml"
    config.write_text(
        '[[channels.sms]]\nname = "kannel-main"\nprovider = "kannel"\nsender = "500005"\n'
        'sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"\nusername = "loket"\n'
        'password = "pw"\ninbound_secret = "short"\n'
    )
    env = clean_env(tmp_path / "data", free_port(), LOKET_CONFIG=str(config))
    one_line_error(loket(env, "up"), str(config), "'kannel-main'", "inbound_secret")
    assert not (tmp_path / "data" / "postgres").exists()  # refused before anything started


@pytest.mark.slow
def test_the_demo_refuses_a_configuration_with_outbound_accounts(tmp_path: Path) -> None:
    config = tmp_path / "loket.toml"
    config.write_text(
        '[[channels.sms]]\nname = "kannel-main"\nprovider = "kannel"\nsender = "500005"\n'
        'sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"\nusername = "loket"\n'
        f'password = "pw"\ninbound_secret = "{KANNEL_SECRET}"\n'
    )
    env = clean_env(tmp_path / "data", free_port(), LOKET_CONFIG=str(config))
    one_line_error(loket(env, "up", "--demo"), "--demo", "sms")
    assert not (tmp_path / "data" / "postgres").exists()


@pytest.mark.slow
def test_agent_add_refuses_a_short_password_and_a_missing_terminal(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data", free_port())
    one_line_error(loket(env, "agent", "add", "sari", "--role", "agent", "--password", "abc"),
                   "agent add", "at least")  # fmt: skip
    one_line_error(loket(env, "agent", "add", "sari", "--role", "agent", stdin="secret\n"),
                   "--password")  # fmt: skip


# --- with a running embedded loket ----------------------------------------------------------


@pytest.mark.slow
def test_ops_commands_find_the_running_embedded_installation(embedded: Up) -> None:
    path = installation.runtime_path(embedded.data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    status = loket(embedded.env, "status", "--json")
    assert status.returncode in (0, 1), status.stderr
    body = json.loads(status.stdout)
    assert body["database"] is None and body["broker"] is None  # both reachable
    assert {s["stage"] for s in body["stages"]} >= {"normalizer", "ticketing", "kb-suggest"}

    added = loket(embedded.env, "agent", "add", "sari", "--role", "agent", "--password",
                  "kopi-susu-pagi-1")  # fmt: skip
    assert added.returncode == 0, added.stderr
    login = httpx.post(f"{embedded.url}/api/login", timeout=10,
                       json={"username": "sari", "password": "kopi-susu-pagi-1"})  # fmt: skip
    assert login.status_code == 200

    dlq = loket(embedded.env, "dlq", "list", "--json")
    assert dlq.returncode == 0 and json.loads(dlq.stdout) == [], dlq.stderr
    trace = loket(embedded.env, "trace", "0123456789abcdef0123456789abcdef")
    assert trace.returncode != 2 and "no running loket" not in trace.stderr, trace.stderr


@pytest.mark.slow
def test_report_open_through_a_pipe_keeps_whole_columns(embedded: Up) -> None:
    added = loket(embedded.env, "agent", "add", "budi", "--role", "manager", "--password",
                  "teh-manis-sore-2")  # fmt: skip
    assert added.returncode == 0, added.stderr
    token = httpx.post(f"{embedded.url}/api/login", timeout=10,
                       json={"username": "budi", "password": "teh-manis-sore-2"}).json()["token"]  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    for n in range(3):
        caller = httpx.post(f"{embedded.url}/api/callers", headers=headers, timeout=10, json={
            "name": f"Ibu Guru Sekolah Dasar Negeri {n}", "phone": f"+62812345678{n}"})  # fmt: skip
        assert caller.status_code == 201, caller.text
        ticket = httpx.post(f"{embedded.url}/api/tickets", headers=headers, timeout=10, json={
            "caller_id": caller.json()["id"], "channel": "phone",
            "subject": f"Dana BOS sekolah belum cair triwulan ketiga nomor {n}", "body": "-",
        })  # fmt: skip
        assert ticket.status_code == 201, ticket.text
    report = loket(embedded.env, "report", "open")  # stdout is a pipe here
    assert report.returncode == 0, report.stderr
    for n in range(3):
        assert f"Dana BOS sekolah belum cair triwulan ketiga nomor {n}" in report.stdout, (
            report.stdout
        )
        assert f"Ibu Guru Sekolah Dasar Negeri {n}" in report.stdout, report.stdout


@pytest.mark.slow
def test_a_second_start_is_refused_in_one_line(embedded: Up, tmp_path: Path) -> None:
    one_line_error(loket(embedded.env, "up"), "already running", str(embedded.data_dir))
    taken = clean_env(tmp_path / "other", embedded.port)
    one_line_error(loket(taken, "up"), f"127.0.0.1:{embedded.port}", "LOKET_HTTP_ADDR")
    assert not (tmp_path / "other" / "postgres").exists()


@pytest.mark.slow
def test_ctrl_c_stops_everything_quickly_and_quietly(embedded: Up) -> None:
    # A console is open with live updates: their consumer must be closed before the broker.
    add_agent(embedded, "wati", "agent", "bakso-malang-3x")
    token = httpx.post(f"{embedded.url}/api/login", timeout=10,
                       json={"username": "wati", "password": "bakso-malang-3x"}).json()["token"]  # fmt: skip
    ready = threading.Event()

    def listen() -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream(
                "GET", f"{embedded.url}/events/stream", cookies={"loket_session": token}, timeout=30
            ) as events,
        ):
            for line in events.iter_lines():
                if line.startswith("event: ready"):
                    ready.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(20), "the live update stream did not start"
    seconds = embedded.stop()
    listener.join(10)
    output = embedded.output()
    assert embedded.process.returncode == 0, output
    assert seconds < 3.0, (seconds, output)
    assert " ERROR " not in output and "Traceback" not in output, output
    assert "loket stopped" in output
    assert not installation.runtime_path(embedded.data_dir).exists()
    one_line_error(loket(embedded.env, "status"), "no running loket found")


@pytest.mark.slow
@pytest.mark.parametrize("idempotence", ["true", "false"])
def test_a_broker_the_user_started_needs_no_idempotence_setting(
    tmp_path: Path, idempotence: str
) -> None:
    broker = TansuBroker.start(log_dir=tmp_path)
    url = db.create_database()
    try:
        up = start_up(tmp_path, "data", LOKET_KAFKA_BOOTSTRAP=broker.bootstrap,
                      LOKET_DATABASE_URL=url, LOKET_KAFKA_IDEMPOTENCE=idempotence)  # fmt: skip
        up.stop()
    finally:
        broker.stop()
        db.drop_database(url)
    output = up.output()
    assert up.process.returncode == 0, output
    warned = [line for line in output.splitlines() if "idempotent producers" in line]
    assert len(warned) == (1 if idempotence == "true" else 0), output
    assert "Traceback" not in output and "UnknownError" not in output.replace(
        "InitProducerId: UnknownError", ""
    ), output
