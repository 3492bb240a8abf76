"""A bench run's own database and consumer groups, and its stages: tasks of this process or `loket worker` processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from workers.pipeline import registry
from workers.pipeline.stage import Stage
from workers.runtime.embedded import free_port
from workers.runtime.runtime import Runtime
from workers.tools.bench.options import BENCH_STAGES, BenchError, rss_mb

# -- fresh database and broker for one run ------------------------------------------------


def with_database(url: str, name: str) -> str:
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
        yield with_database(server_url, name)
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
        return {name: stage_figures(registry_samples(name)) for name in BENCH_STAGES}

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
                process = await asyncio.to_thread(spawn_worker, stage, env, log_path)
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
                **stage_figures(totals.get(stage, {})),
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


def spawn_worker(stage: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", stage], env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def registry_samples(stage: str) -> dict[str, float]:
    names = ("loket_stage_messages_total", "loket_stage_batch_seconds_sum", "loket_stage_batch_seconds_count",
             "loket_stage_shunted_total", "loket_stage_retries_total")  # fmt: skip
    return {name: REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0 for name in names}


def stage_figures(samples: dict[str, float]) -> dict[str, float]:
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


def diff_counts(
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
