"""`loket bench`: messages through the real inbound path into PostgreSQL, measured end to end."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from channels.smtp import EmailAccount
from channels.types import RawInbound
from workers.ops.status import true_end_offsets
from workers.pipeline import bus, intake, registry
from workers.pipeline.stage import Stage
from workers.runtime.embedded import free_port
from workers.runtime.runtime import Runtime
from workers.runtime.settings import ConfigError, Settings

BENCH_ACCOUNT = "bench"
MAIL_ACCOUNT = "bench-mail"
# Stages the benchmark runs, as `workers.pipeline.registry` declares them: the inbound path from the
# raw topic to the database.
BENCH_STAGES = ("normalizer", "ticketing")


class BenchError(Exception):
    """The run could not finish (messages stuck, a worker died); the message says where."""


@dataclass
class BenchOptions:
    messages: int = 10_000
    callers: int = 1_000
    size: int = 200
    rate: float | None = None  # offered messages/s; None = as fast as possible
    processes: int = 1  # per scaled stage; 1 = stages run as tasks of this process
    scale: tuple[str, ...] = BENCH_STAGES  # the stages that get `processes` processes; others one
    via: str = "raw"  # "raw" (publish to the raw topic) or "webhook" (Kannel MO calls)
    concurrency: int = 64  # webhook requests in flight
    email: int = 0
    imap_host: str = "127.0.0.1"
    imap_port: int = 143
    imap_user: str = ""
    imap_password: str = field(default="", repr=False)
    imap_folder: str = "INBOX"
    imap_tls: str = "none"
    bootstrap: str | None = None
    stall_seconds: float = 60.0  # give up when nothing was stored for this long


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory of a process in MiB, from /proc (None where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# Seconds between memory samples over a run (a sample also counts the stored messages).
RSS_SAMPLE_SECONDS = 5.0
WAIT_POLL_SECONDS = 1.0


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sender_for(caller: int) -> str:
    """A distinct valid Indonesian mobile number per simulated caller."""
    return f"+62812{10_000_000 + caller:08d}"


def body_for(index: int, size: int) -> str:
    head = f"Laporan {index}: koneksi Dapodik terputus sejak pagi. "
    filler = "Mohon bantuan segera, terima kasih. "
    text = head + filler * (size // len(filler) + 1)
    return text[: max(size, 1)]


# -- fresh database and broker for one run ------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, run_id: str) -> AsyncIterator[str]:
    """A new database `loket_bench_<run>` on the configured server, dropped afterwards."""
    name = f"loket_bench_{run_id}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def start_groups_at_end(bootstrap: str, groups: list[str], topics: list[str]) -> None:
    """Commit the topics' end offsets for new consumer groups, so a shared broker's old records are skipped."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        ends = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    for group in groups:
        committer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await committer.start()
        try:
            committer.assign(partitions)
            if ends:
                await committer.commit(ends)
        finally:
            await committer.stop()


async def wait_for_groups(bootstrap: str, members: dict[str, int], timeout: float = 60.0) -> None:  # noqa: ASYNC109
    """Wait until every consumer group is stable with its expected number of members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        state: dict[str, tuple[str, int]] = {}
        while True:
            for name in members:
                # One group per request: Tansu drops the connection on a multi-group describe.
                try:
                    responses = await admin.describe_consumer_groups([name])
                except KafkaError:
                    continue
                for response in responses:
                    for group in response.groups:
                        _, group_id, group_state, _, _, group_members = group[:6]
                        state[group_id] = (group_state, len(group_members))
            if all(state.get(g) == ("Stable", n) for g, n in members.items()):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"stages did not join their consumer groups: {state}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


# -- stages: in-process tasks or `loket worker` processes ---------------------------------


class InProcessStages:
    """The inbound stages as tasks of this process, in their own consumer groups."""

    def __init__(self, rt: Runtime, prefix: str):
        self.groups = {name: f"{prefix}.{name}" for name in BENCH_STAGES}
        self.stages = []
        for name in BENCH_STAGES:
            declared = registry.consumer(name)
            handle = declared.handler(rt)
            assert handle is not None  # the inbound stages always have work
            self.stages.append(Stage(
                name=name, topics=[declared.topic], handle=handle, bootstrap=rt.bootstrap,
                producer=rt.producer, max_attempts=rt.settings.max_attempts,
                batch_size=declared.batch_size, group_id=self.groups[name],
            ))  # fmt: skip
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(s.run(), name=f"bench-{s.name}") for s in self.stages]

    def check(self) -> None:
        for task in self.tasks:
            if task.done():
                raise BenchError(f"stage {task.get_name()} stopped: {task.exception()!r}")

    def members(self) -> dict[str, int]:
        return {group: 1 for group in self.groups.values()}

    def problems(self) -> str:
        return ""  # this process's own log already holds them

    def figures(self) -> dict[str, dict[str, float]]:
        return {name: _stage_figures(_registry_samples(name)) for name in BENCH_STAGES}

    def worker_rss(self) -> list[float]:
        return []

    def current_worker_rss(self) -> list[float]:
        return []

    async def stop(self) -> None:
        for stage in self.stages:
            stage.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout=15)
        for task in self.tasks:
            task.cancel()


class WorkerProcesses:
    """`loket worker STAGE` processes, `counts[STAGE]` of each, each serving its own /metrics."""

    def __init__(self, rt: Runtime, counts: dict[str, int], workdir: Path, idempotence: bool):
        self.rt = rt
        self.counts = counts
        self.workdir = workdir
        self.idempotence = idempotence
        self.processes: list[tuple[str, subprocess.Popen[bytes], int, Path]] = []
        self.groups = {name: registry.consumer(name).group for name in BENCH_STAGES}

    async def start(self) -> None:
        for stage in BENCH_STAGES:
            for i in range(self.counts[stage]):
                port = free_port()
                log_path = self.workdir / f"{stage}-{i}.log"
                env = {k: v for k, v in os.environ.items() if k != "LOKET_CONFIG"}
                env.update({
                    "LOKET_DATABASE_URL": self.rt.database_url,
                    "LOKET_KAFKA_BOOTSTRAP": self.rt.bootstrap,
                    "LOKET_KAFKA_IDEMPOTENCE": "true" if self.idempotence else "false",
                    "LOKET_PARTITIONS": str(self.rt.settings.partitions),
                    "LOKET_DATA_DIR": str(self.workdir / f"{stage}-{i}"),
                    "LOKET_METRICS_ADDR": f"127.0.0.1:{port}",
                    "LOKET_LOG_LEVEL": "WARNING",
                })  # fmt: skip
                process = await asyncio.to_thread(_spawn_worker, stage, env, log_path)
                self.processes.append((stage, process, port, log_path))

    def check(self) -> None:
        for stage, process, _, log_path in self.processes:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BenchError(
                    f"worker {stage} (pid {process.pid}) exited with {process.returncode}:\n{tail}"
                )

    def members(self) -> dict[str, int]:
        return {group: self.counts[stage] for stage, group in self.groups.items()}

    def problems(self) -> str:
        """The warnings and errors the workers logged, for a run that did not finish."""
        lines = []
        for stage, process, _, log_path in self.processes:
            for line in log_path.read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line:
                    lines.append(f"{stage} pid {process.pid}: {line}")
        return "\n".join(lines[-40:])

    async def _scrape(self, client: httpx.AsyncClient, port: int) -> dict[tuple[str, str], float]:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        samples: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                stage = sample.labels.get("stage")
                if stage is not None:
                    samples[(sample.name, stage)] = (
                        samples.get((sample.name, stage), 0.0) + sample.value
                    )
        return samples

    async def collect(self) -> None:
        """Read every worker's metrics and memory before they stop."""
        self._figures: dict[str, dict[str, Any]] = {}
        self._rss = [rss_mb(p.pid) or 0.0 for _, p, _, _ in self.processes]
        totals: dict[str, dict[str, float]] = {}
        per_process: dict[str, list[int]] = {}
        async with httpx.AsyncClient() as client:
            for stage, _, port, _ in self.processes:
                samples = await self._scrape(client, port)
                mine = {name: value for (name, label), value in samples.items() if label == stage}
                into = totals.setdefault(stage, {})
                for name, value in mine.items():
                    into[name] = into.get(name, 0.0) + value
                per_process.setdefault(stage, []).append(
                    int(mine.get("loket_stage_messages_total", 0.0))
                )
        self._figures = {
            stage: {
                **_stage_figures(totals.get(stage, {})),
                "records_per_process": per_process.get(stage, []),
            }
            for stage in BENCH_STAGES
        }

    def figures(self) -> dict[str, dict[str, float]]:
        return getattr(self, "_figures", {})

    def worker_rss(self) -> list[float]:
        return getattr(self, "_rss", [])

    def current_worker_rss(self) -> list[float]:
        return [rss_mb(p.pid) or 0.0 for _, p, _, _ in self.processes]

    async def stop(self) -> None:
        for _, process, _, _ in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for _, process, _, _ in self.processes:
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 10)


def _spawn_worker(stage: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", stage], env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _registry_samples(stage: str) -> dict[str, float]:
    names = ("loket_stage_messages_total", "loket_stage_batch_seconds_sum", "loket_stage_batch_seconds_count",
             "loket_stage_shunted_total", "loket_stage_retries_total")  # fmt: skip
    return {name: REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0 for name in names}


def _stage_figures(samples: dict[str, float]) -> dict[str, float]:
    records = samples.get("loket_stage_messages_total", 0.0)
    batches = samples.get("loket_stage_batch_seconds_count", 0.0)
    busy = samples.get("loket_stage_batch_seconds_sum", 0.0)
    return {
        "records": int(records),
        "batches": int(batches),
        "busy_seconds": round(busy, 3),
        "records_per_busy_second": round(records / busy, 1) if busy else 0.0,
        "mean_batch": round(records / batches, 1) if batches else 0.0,
        "mean_batch_ms": round(1000 * busy / batches, 2) if batches else 0.0,
        "retries": int(samples.get("loket_stage_retries_total", 0.0)),
        "shunted": int(samples.get("loket_stage_shunted_total", 0.0)),
    }


def _diff(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per-stage figures of one phase of an in-process run (the registry counts since start)."""
    out = {}
    for stage, figures in after.items():
        base = before.get(stage, {})
        records = figures["records"] - base.get("records", 0)
        batches = figures["batches"] - base.get("batches", 0)
        busy = figures["busy_seconds"] - base.get("busy_seconds", 0)
        out[stage] = {
            "records": int(records), "batches": int(batches), "busy_seconds": round(busy, 3),
            "records_per_busy_second": round(records / busy, 1) if busy else 0.0,
            "mean_batch": round(records / batches, 1) if batches else 0.0,
            "mean_batch_ms": round(1000 * busy / batches, 2) if batches else 0.0,
            "retries": int(figures["retries"] - base.get("retries", 0)),
            "shunted": int(figures["shunted"] - base.get("shunted", 0)),
        }  # fmt: skip
    return out


# -- offering messages -------------------------------------------------------------------


async def _paced(count: int, rate: float | None, offer: Callable[[int], Awaitable[None]]) -> None:
    """Call `offer(i)` for every message, on schedule when a rate is given (open loop)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        if rate:
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await offer(i)


async def offer_raw(rt: Runtime, opts: BenchOptions, run_id: str) -> None:
    """Publish SMS messages to the raw topic, as an adapter does, keeping many sends in flight."""
    in_flight: list[asyncio.Future[Any]] = []

    async def offer(i: int) -> None:
        raw = RawInbound(
            channel="sms", account=BENCH_ACCOUNT, external_id=f"bench-{run_id}-{i}",
            sender=sender_for(i % opts.callers), body_text=body_for(i, opts.size),
            meta={"gateway": "bench"},
        )  # fmt: skip
        in_flight.append(await intake.send_inbound(rt, raw))
        if len(in_flight) >= 1000:
            await asyncio.gather(*in_flight)
            in_flight.clear()

    await _paced(opts.messages, opts.rate, offer)
    await asyncio.gather(*in_flight)


def kannel_entry(secret: str) -> dict[str, Any]:
    """A Kannel account for the webhook path; its sendsms URL is never called by the bench."""
    return {
        "name": BENCH_ACCOUNT, "provider": "kannel", "sender": "1500123",
        "sendsms_url": "http://127.0.0.1:9/cgi-bin/sendsms", "username": "bench",
        "password": secret, "inbound_secret": secret,
    }  # fmt: skip


@contextlib.asynccontextmanager
async def webhook_server(rt: Runtime) -> AsyncIterator[str]:
    """The loket HTTP app on a free loopback port, served from this process."""
    import uvicorn

    from workers.web.app import create_app
    from workers.web.server import server_config

    port = free_port()
    config = server_config(create_app(rt), rt.settings, "127.0.0.1", port)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined,method-assign]
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def offer_webhook(base_url: str, secret: str, opts: BenchOptions, run_id: str) -> None:
    """Kannel MO calls (form POSTs) to /webhooks/sms/kannel from `concurrency` lanes.

    Each lane has its own one-connection client: one shared pool of many connections costs
    httpx more CPU than the server spends, and the server shares this process.
    """
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=opts.concurrency * 4)
    failures: list[str] = []
    lanes = max(1, opts.concurrency)

    async def lane() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
            while (i := await queue.get()) is not None:
                form = {
                    "secret": secret, "from": sender_for(i % opts.callers), "to": "1500123",
                    "text": body_for(i, opts.size), "id": f"bench-{run_id}-{i}",
                }  # fmt: skip
                for attempt in range(5):
                    response = await client.post("/webhooks/sms/kannel", data=form)
                    if response.status_code == 200:
                        break
                    if response.status_code != 503:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        break
                    await asyncio.sleep(0.1 * (attempt + 1))
                else:
                    failures.append("503 five times")

    workers = [asyncio.create_task(lane()) for _ in range(lanes)]
    await _paced(opts.messages, opts.rate, queue.put)
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers)
    if failures:
        raise BenchError(f"{len(failures)} webhook calls failed, e.g. {failures[0]}")


async def run_webhook_client(base_url: str, secret: str, opts: BenchOptions, run_id: str) -> None:
    """`offer_webhook` in a child process, so the load generator does not share the server's loop."""
    spec = {
        "base_url": base_url, "secret": secret, "run_id": run_id,
        "options": {"messages": opts.messages, "callers": opts.callers, "size": opts.size,
                    "rate": opts.rate, "concurrency": opts.concurrency},
    }  # fmt: skip
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from workers.tools.bench import webhook_client_main; webhook_client_main()",
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    # The secret goes through stdin, never the command line.
    _, errors = await child.communicate(json.dumps(spec).encode())
    if child.returncode != 0:
        raise BenchError(f"the webhook client failed: {errors.decode(errors='replace')[-2000:]}")


def webhook_client_main() -> None:
    """Entry of the webhook load-generator process (spec as one JSON line on stdin)."""
    spec = json.loads(sys.stdin.readline())
    opts = BenchOptions(**spec["options"])
    asyncio.run(offer_webhook(spec["base_url"], spec["secret"], opts, spec["run_id"]))


# -- waiting and measuring -----------------------------------------------------------------


async def sample_memory(
    pool: asyncpg.Pool,
    stages: InProcessStages | WorkerProcesses,
    samples: list[dict[str, Any]],
    every: float = RSS_SAMPLE_SECONDS,
) -> None:
    """Append the resident sizes (this process, each worker) and the stored count every `every` s.

    Runs until cancelled; growth after warm-up is what a long run is meant to show.
    """
    started = time.monotonic()
    while True:
        try:
            stored: int | None = await pool.fetchval(
                "SELECT count(*) FROM messages WHERE direction = 'in'"
            )
        except (asyncpg.PostgresError, OSError):
            stored = None  # a sample without the count beats a lost run
        samples.append({
            "seconds": round(time.monotonic() - started, 1), "stored": stored,
            "rss_mb": rss_mb(), "workers_rss_mb": stages.current_worker_rss(),
        })  # fmt: skip
        await asyncio.sleep(every)


async def wait_stored(
    pool: asyncpg.Pool,
    where: str,
    args: tuple[Any, ...],
    expected: int,
    stages: InProcessStages | WorkerProcesses,
    stall_seconds: float,
) -> int:
    """Poll the message count until `expected` rows are there; fail when it stops growing."""
    last, last_change = -1, time.monotonic()
    while True:
        stages.check()
        count = await pool.fetchval(f"SELECT count(*) FROM messages WHERE {where}", *args)
        if count >= expected:
            return int(count)
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > stall_seconds:
            raise BenchError(
                f"stuck at {count} of {expected} messages for {stall_seconds:.0f}s\n{stages.problems()}"
            )
        # Not faster: counting a large table costs the database (the machine being measured)
        # tens of milliseconds, and the figures come from the rows' own timestamps anyway.
        await asyncio.sleep(WAIT_POLL_SECONDS)


async def locate_missing(
    rt: Runtime, stages: InProcessStages | WorkerProcesses, run_id: str, expected: int
) -> str:
    """For a run that stalled: which messages are not stored, and where each one is on the broker."""
    rows = await rt.pool.fetch(
        "SELECT external_id FROM messages WHERE direction = 'in' AND account = $1", BENCH_ACCOUNT
    )
    stored = {r["external_id"] for r in rows}
    missing = [
        f"bench-{run_id}-{i}" for i in range(expected) if f"bench-{run_id}-{i}" not in stored
    ]
    if not missing:
        return "no message is missing"
    wanted = {json.dumps(ext).encode(): ext for ext in missing[:50]}
    seen: dict[str, list[str]] = {ext: [] for ext in wanted.values()}
    topics = [bus.RAW, bus.MATCHED, bus.SHUNT]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=rt.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    lines = [f"{len(missing)} missing, e.g. {', '.join(missing[:5])}"]
    try:
        partitions = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        ends = await true_end_offsets(consumer, partitions)
        consumer.assign(partitions)
        bus.seek_to_start(consumer, partitions)
        left = {tp for tp, end in ends.items() if end > 0}
        while left:
            batches = await consumer.getmany(*left, timeout_ms=2000, max_records=5000)
            if not batches:
                break  # the rest cannot be read; say what was found
            for tp, records in batches.items():
                for record in records:
                    for needle, ext in wanted.items():
                        if record.value and needle in record.value:
                            seen[ext].append(f"{tp.topic}[{tp.partition}]@{record.offset}")
                    if record.offset + 1 >= ends[tp]:
                        left.discard(tp)
        for name, group in stages.groups.items():
            committed = []
            for tp in partitions:
                if tp.topic == (bus.RAW if name == "normalizer" else bus.MATCHED):
                    admin = AIOKafkaConsumer(bootstrap_servers=rt.bootstrap, group_id=group,
                                             enable_auto_commit=False)  # fmt: skip
                    await admin.start()
                    try:
                        offset = await admin.committed(tp)
                    finally:
                        await admin.stop()
                    committed.append(f"{tp.partition}: {offset}/{ends[tp]}")
            lines.append(f"group {group} committed/end: {', '.join(committed)}")
    finally:
        await consumer.stop()
    for ext, places in seen.items():
        lines.append(f"{ext}: {', '.join(places) or 'on no topic'}")
    return "\n".join(lines)


async def latency_figures(pool: asyncpg.Pool, account: str, started: float) -> dict[str, Any]:
    """Throughput and latency (accepted by the adapter -> row committed) of one account's messages.

    Computed by PostgreSQL: a million latencies would cost this process more memory than
    the run it measures. Percentiles are nearest-rank (`percentile_disc`).
    """
    row = await pool.fetchrow(
        "SELECT count(*) AS n, max(stored) AS last,"
        " percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms) AS p,"
        " max(ms) AS max_ms, avg(ms) AS mean_ms"
        " FROM (SELECT extract(epoch FROM stored_at)::float8 AS stored,"
        "       1000 * (extract(epoch FROM stored_at)::float8 - (meta->>'accepted_at')::float8) AS ms"
        "       FROM messages WHERE direction = 'in' AND account = $1) AS m",
        account,
    )
    seconds = row["last"] - started
    p50, p95, p99 = row["p"] or (float("nan"),) * 3
    return {
        "seconds": round(seconds, 3),
        "throughput": round(row["n"] / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(p50, 1),
        "p95_ms": round(p95, 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(row["max_ms"] or 0.0, 1),
        "mean_ms": round(row["mean_ms"] or 0.0, 1),
    }


# -- e-mail backlog ----------------------------------------------------------------------


def _imap_connect(opts: BenchOptions) -> imaplib.IMAP4:
    client: imaplib.IMAP4
    if opts.imap_tls == "ssl":
        client = imaplib.IMAP4_SSL(opts.imap_host, opts.imap_port, timeout=30)
    else:
        client = imaplib.IMAP4(opts.imap_host, opts.imap_port, timeout=30)
        if opts.imap_tls == "starttls":
            client.starttls()
    client.login(opts.imap_user, opts.imap_password)
    return client


def mail_for(index: int, run_id: str, opts: BenchOptions) -> bytes:
    message = EmailMessage()
    caller = index % opts.callers
    message["From"] = f"Pelapor {caller} <pelapor{caller}@sekolah.example.id>"
    message["To"] = f"{opts.imap_user}@helpdesk.example.org"
    message["Subject"] = f"Laporan {index}"
    message["Message-ID"] = f"<bench.{run_id}.{index}@sekolah.example.id>"
    message.set_content(body_for(index, opts.size) + "\n")
    return message.as_bytes()


def fill_mailbox(opts: BenchOptions, run_id: str) -> tuple[int, int]:
    """Append messages until the folder holds at least `opts.email`; returns (appended, held)."""
    client = _imap_connect(opts)
    try:
        folder = '"' + opts.imap_folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
        status, data = client.select(folder, readonly=True)
        if status != "OK":
            raise BenchError(f"cannot open IMAP folder {opts.imap_folder}: {data!r}")
        held = int(data[0] or 0)
        missing = max(0, opts.email - held)
        for i in range(missing):
            status, answer = client.append(folder, None, None, mail_for(i, run_id, opts))
            if status != "OK":
                raise BenchError(f"IMAP APPEND failed: {answer!r}")
        return missing, held + missing
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


async def run_email_phase(
    rt: Runtime, opts: BenchOptions, run_id: str, stages: InProcessStages | WorkerProcesses
) -> dict[str, Any]:
    """Read the whole IMAP folder with a MailPoller into tickets; messages/s from poller start."""
    from workers.pipeline.mailpoll import MailPoller

    appended, held = await asyncio.to_thread(fill_mailbox, opts, run_id)
    account = EmailAccount(
        name=MAIL_ACCOUNT, address=f"{opts.imap_user}@helpdesk.example.org", imap_host=opts.imap_host,
        imap_port=opts.imap_port, imap_user=opts.imap_user, imap_password=opts.imap_password,
        imap_tls=opts.imap_tls, imap_folder=opts.imap_folder,
    )  # fmt: skip
    poller = MailPoller(rt, account, poll_seconds=5.0)
    stop = asyncio.Event()
    started = time.time()
    polling = asyncio.create_task(poller.run(stop))
    try:
        stored = await wait_stored(
            rt.pool,
            "direction = 'in' AND channel = 'email' AND account = $1",
            (MAIL_ACCOUNT,),
            held,
            stages,
            opts.stall_seconds,
        )
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(polling, timeout=10)
    figures = await latency_figures(rt.pool, MAIL_ACCOUNT, started)
    return {"messages": stored, "appended": appended, **figures}


# -- the run -----------------------------------------------------------------------------


async def run_bench(settings: Settings, opts: BenchOptions) -> dict[str, Any]:
    """One benchmark run on a fresh database and topic namespace; returns its figures."""
    from workers.runtime.supervisor import open_runtime

    if opts.via not in ("raw", "webhook"):
        raise ConfigError("--via is raw or webhook")
    if not opts.scale or set(opts.scale) - set(BENCH_STAGES):
        raise ConfigError(f"--scale names one or more of: {', '.join(BENCH_STAGES)}")
    if opts.messages < 1 or opts.callers < 1 or opts.processes < 1:
        raise ConfigError("--messages, --callers and --processes must be at least 1")
    if opts.processes > 1 and opts.bootstrap:
        # Worker processes use the product's consumer groups, which a shared broker's
        # real stages also use: their records would mix.
        raise ConfigError("--processes needs the bench's own broker; leave out --bootstrap")
    if opts.email and not (opts.imap_user and opts.imap_password):
        raise ConfigError(
            "--email needs --imap-user and --imap-password (or LOKET_BENCH_IMAP_PASSWORD)"
        )

    rss_start = rss_mb()
    run_id = secrets.token_hex(5)
    workdir = Path(tempfile.mkdtemp(prefix=f"loket-bench-{run_id}-"))
    try:
        async with contextlib.AsyncExitStack() as exits:
            if settings.database_url:
                database_url: str | None = await exits.enter_async_context(
                    fresh_database(settings.database_url, run_id)
                )
                database = f"fresh database loket_bench_{run_id} on the configured server"
            else:
                database_url, database = None, "embedded PostgreSQL (fresh data directory)"
            run_settings = settings.model_copy(update={
                "database_url": database_url, "kafka_bootstrap": opts.bootstrap, "data_dir": workdir,
                "blob_dir": workdir / "blobs", "config": None,
            })  # fmt: skip
            rt = await exits.enter_async_context(open_runtime(run_settings))
            secret = secrets.token_urlsafe(24)
            rt.channels = {**rt.channels, "sms": [kannel_entry(secret)]}
            stages: InProcessStages | WorkerProcesses
            if opts.processes > 1:
                counts = {s: opts.processes if s in opts.scale else 1 for s in BENCH_STAGES}
                stages = WorkerProcesses(rt, counts, workdir, idempotence="broker" not in rt.started
                                         and run_settings.kafka_idempotence)  # fmt: skip
            else:
                stages = InProcessStages(rt, f"loket.bench-{run_id}")
            if opts.bootstrap:
                await start_groups_at_end(
                    rt.bootstrap, list(stages.groups.values()), [bus.RAW, bus.MATCHED]
                )
            await stages.start()
            memory: list[dict[str, Any]] = []
            sampling: asyncio.Task[None] | None = None
            try:
                await wait_for_groups(rt.bootstrap, stages.members())
                # Sample once every worker has joined its group: a process still starting
                # has no resident size to read yet.
                sampling = asyncio.create_task(sample_memory(rt.pool, stages, memory))
                before = stages.figures()
                started = time.time()
                if opts.via == "webhook":
                    async with webhook_server(rt) as base_url:
                        await run_webhook_client(base_url, secret, opts, run_id)
                else:
                    await offer_raw(rt, opts, run_id)
                offered_seconds = time.time() - started
                try:
                    await wait_stored(
                        rt.pool,
                        "direction = 'in' AND account = $1",
                        (BENCH_ACCOUNT,),
                        opts.messages,
                        stages,
                        opts.stall_seconds,
                    )
                except BenchError as exc:
                    # Say where the missing messages got to before the run's broker is gone.
                    where = await locate_missing(rt, stages, run_id, opts.messages)
                    raise BenchError(f"{exc}\n{where}") from None
                figures = await latency_figures(rt.pool, BENCH_ACCOUNT, started)
                verified = await rt.pool.fetchrow(
                    "SELECT count(*) AS rows, count(DISTINCT (channel, account, external_id)) AS keys,"
                    " (SELECT count(*) FROM tickets) AS tickets, (SELECT count(*) FROM callers) AS callers"
                    " FROM messages"
                )
                result: dict[str, Any] = {
                    "messages": opts.messages, "callers": opts.callers, "size": opts.size,
                    "via": opts.via, "processes": opts.processes, "rate": opts.rate,
                    "scale": [s for s in BENCH_STAGES if s in opts.scale] if opts.processes > 1 else [],
                    **figures,
                    "offered_seconds": round(offered_seconds, 3),
                    "verified_rows": verified["rows"], "distinct_keys": verified["keys"],
                    "tickets": verified["tickets"], "callers_created": verified["callers"],
                }  # fmt: skip
                if isinstance(stages, InProcessStages):
                    result["stages"] = _diff(stages.figures(), before)
                if opts.email:
                    email_before = stages.figures()
                    result["email"] = await run_email_phase(rt, opts, run_id, stages)
                    if isinstance(stages, InProcessStages):
                        result["email"]["stages"] = _diff(stages.figures(), email_before)
                if isinstance(stages, WorkerProcesses):
                    await stages.collect()
                    result["stages"] = stages.figures()
                    result["workers_rss_mb"] = stages.worker_rss()
            finally:
                if sampling is not None:
                    sampling.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampling
                await stages.stop()
            result["memory_samples"] = memory
            result["database"] = database
            result["broker"] = rt.started.get("broker", f"configured broker {rt.bootstrap}")
        result["rss_mb"] = {"start": rss_start, "end": rss_mb(), "peak": peak_rss_mb()}
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def format_text(result: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [
        f"loket bench: {result['messages']} messages from {result['callers']} callers, "
        f"{result['size']}-byte bodies, via {result['via']}, "
        + (
            "in-process stages"
            if result["processes"] == 1
            else f"{result['processes']} processes of {' and '.join(result['scale'])}"
        )
        + (
            f", offered {result['rate']:g} msgs/s"
            if result["rate"]
            else ", offered as fast as possible"
        ),
        f"  database: {result['database']}",
        f"  broker:   {result['broker']}",
        f"  throughput: {result['throughput']:.0f} msgs/s ({result['messages']} in {result['seconds']:.2f} s;"
        f" offering took {result['offered_seconds']:.2f} s)",
        f"  latency accepted -> stored: p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms,"
        f" p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms",
        f"  verified: {result['verified_rows']} message rows ({result['distinct_keys']} distinct keys),"
        f" {result['tickets']} tickets, {result['callers_created']} callers",
    ]
    for stage, figures in result.get("stages", {}).items():
        lines.append(
            f"  stage {stage:<10} {figures['records']} records in {figures['batches']} batches"
            f" (mean {figures['mean_batch']:.0f}, {figures['mean_batch_ms']:.1f} ms each),"
            f" {figures['records_per_busy_second']:.0f} records per busy second,"
            f" {figures['retries']} retries, {figures['shunted']} shunted"
            + (
                f"; per process {', '.join(str(n) for n in figures['records_per_process'])}"
                if len(figures.get("records_per_process", [])) > 1
                else ""
            )
        )
    email = result.get("email")
    if email:
        lines.append(
            f"  e-mail: {email['messages']} from the IMAP backlog ({email['appended']} appended) in"
            f" {email['seconds']:.2f} s = {email['throughput']:.0f} msgs/s;"
            f" p50 {email['p50_ms']:.0f} ms, p99 {email['p99_ms']:.0f} ms"
        )
    rss = result["rss_mb"]
    lines.append(
        f"  memory (RSS): {rss['start']} MiB at start, {rss['end']} MiB at end, peak {rss['peak']} MiB"
    )
    samples = result.get("memory_samples") or []
    if len(samples) > 1:
        # About ten points of the series: enough to see growth after warm-up.
        step = max(1, len(samples) // 10)
        shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        lines.append(
            "  memory over the run (stored: bench RSS [workers]): "
            + "; ".join(
                f"{s['stored']}: {s['rss_mb']} MiB"
                + (
                    f" [{', '.join(str(w) for w in s['workers_rss_mb'])}]"
                    if s["workers_rss_mb"]
                    else ""
                )
                for s in shown
            )
        )
    if result.get("workers_rss_mb"):
        lines.append(
            f"  workers' RSS at end: {', '.join(f'{m} MiB' for m in result['workers_rss_mb'])}"
        )
    return "\n".join(lines)
