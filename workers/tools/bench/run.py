"""The run: offer, wait until everything is stored, measure, and say what it found."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from channels.email.smtp import EmailAccount
from workers.ops.status import true_end_offsets
from workers.pipeline import bus
from workers.runtime.runtime import Runtime
from workers.runtime.settings import ConfigError, Settings
from workers.tools.bench.options import (
    BENCH_ACCOUNT,
    BENCH_STAGES,
    MAIL_ACCOUNT,
    RSS_SAMPLE_SECONDS,
    WAIT_POLL_SECONDS,
    BenchError,
    BenchOptions,
    peak_rss_mb,
    rss_mb,
)
from workers.tools.bench.setup import (
    InProcessStages,
    WorkerProcesses,
    diff_counts,
    fresh_database,
    start_groups_at_end,
    wait_for_groups,
)
from workers.tools.bench.traffic import (
    fill_mailbox,
    kannel_entry,
    offer_raw,
    run_webhook_client,
    webhook_server,
)

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


def _check(opts: BenchOptions) -> None:
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


async def _measure(
    rt: Runtime, opts: BenchOptions, run_id: str, stages: InProcessStages | WorkerProcesses,
    secret: str,
) -> dict[str, Any]:  # fmt: skip
    """Offer the messages, wait until all are stored, and gather the figures of the run."""
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
        result["stages"] = diff_counts(stages.figures(), before)
    if opts.email:
        email_before = stages.figures()
        result["email"] = await run_email_phase(rt, opts, run_id, stages)
        if isinstance(stages, InProcessStages):
            result["email"]["stages"] = diff_counts(stages.figures(), email_before)
    if isinstance(stages, WorkerProcesses):
        await stages.collect()
        result["stages"] = stages.figures()
        result["workers_rss_mb"] = stages.worker_rss()
    return result


async def run_bench(settings: Settings, opts: BenchOptions) -> dict[str, Any]:
    """One benchmark run on a fresh database and topic namespace; returns its figures."""
    from workers.runtime.supervisor import open_runtime

    _check(opts)
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
                result = await _measure(rt, opts, run_id, stages, secret)
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
