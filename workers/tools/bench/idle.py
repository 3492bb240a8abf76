"""`loket bench --idle SECONDS`: what an idle embedded `loket up` costs, and how fast it wakes.

Starts `loket up` on the embedded defaults (a fresh data directory, nothing configured) and,
beside it, a bare Tansu broker with no client: the floor. Once loket is ready and has settled,
both are left alone for SECONDS while their CPU time is read from /proc (loket's process, its
broker, its PostgreSQL). Then, a few times after a quiet spell, one message is published to
the raw topic and timed until it is a message row in PostgreSQL; the floor is the same
message on the bare broker until a plain idle consumer holds it. Last, Ctrl-C (SIGINT) and the
time until every process of `loket up` is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from channels.types import RawInbound, encoder
from workers.pipeline import bus
from workers.runtime.embedded import EmbeddedBroker, free_port
from workers.runtime.installation import running
from workers.tools.bench.options import BenchError

TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_SECONDS = 10.0
QUIET_SECONDS = 10.0
WAKE_ROUNDS = 3


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parts(root: int, data_dir: Path) -> dict[str, list[int]]:
    """loket's process and its children (the broker among them), and the embedded PostgreSQL:
    pg_ctl starts it in a session of its own, so it is found by its data directory."""
    tree, parts = _children(), {"loket": [root], "broker": [], "postgres": []}
    stack = list(tree.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        parts["broker" if "tansu" in _name(pid) else "loket"].append(pid)
    marker = str(data_dir).encode()
    postmasters = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
                   and _name(int(e.name)) == "postgres" and marker in _cmdline(int(e.name))]  # fmt: skip
    stack = list(postmasters)
    while stack:
        pid = stack.pop()
        parts["postgres"].append(pid)
        stack.extend(tree.get(pid, []))
    return parts


def _cpu_of(parts: dict[str, list[int]]) -> dict[str, float]:
    return {part: sum(_cpu_seconds(pid) for pid in pids) for part, pids in parts.items()}


async def _wake_once(bootstrap: str, database_url: str) -> float:
    """Seconds from publishing one message to the raw topic until it is a message row."""
    external_id = f"idle-bench-{uuid.uuid4().hex}"
    raw = RawInbound(channel="sms", account="bench", external_id=external_id,
                     sender="+6281100000001", body_text="Halo, masih ada orang?")  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    conn = await asyncpg.connect(database_url)
    try:
        started = time.monotonic()
        await producer.send_and_wait(bus.RAW, encoder.encode(raw), key=raw.key())
        while not await conn.fetchval("SELECT 1 FROM messages WHERE external_id = $1", external_id):
            if time.monotonic() - started > 30:
                raise BenchError("a message published to the raw topic was not stored in 30 s")
            await asyncio.sleep(0.005)
        return time.monotonic() - started
    finally:
        await conn.close()
        await producer.stop()


async def _floor_wake(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> float:
    started = time.monotonic()
    await producer.send_and_wait("idle-floor", b"x")
    while not await consumer.getmany(timeout_ms=1000):
        pass
    return time.monotonic() - started


def _start_up(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "workers.cli", "up"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


async def run_idle(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loket-idle-") as data_dir:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOKET_")}
        env |= {"LOKET_DATA_DIR": data_dir, "LOKET_HTTP_ADDR": f"127.0.0.1:{port}"}
        floor_broker = EmbeddedBroker()
        await floor_broker.start()
        up = _start_up(env)
        try:
            return await _measure(up, port, Path(data_dir), floor_broker, seconds)
        finally:
            if up.poll() is None:  # the run failed: nothing of it may outlive the bench
                for pids in _parts(up.pid, Path(data_dir)).values():
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            floor_broker.stop()


async def _measure(up: subprocess.Popen[bytes], port: int, data_dir: Path,
                   floor_broker: EmbeddedBroker, seconds: float) -> dict[str, Any]:  # fmt: skip
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + 120
        while True:
            if up.poll() is not None:
                raise BenchError(f"loket up exited with {up.returncode} before it was ready")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError("loket up was not ready in 120 s")
            await asyncio.sleep(0.2)
    installation = running(data_dir)
    if installation is None:
        raise BenchError("loket up is ready but wrote no runtime file")
    await _wake_once(installation.kafka_bootstrap, installation.database_url)  # warm the path
    floor_producer = AIOKafkaProducer(bootstrap_servers=floor_broker.bootstrap, acks="all")
    floor_consumer = AIOKafkaConsumer("idle-floor", bootstrap_servers=floor_broker.bootstrap,
                                      group_id="idle-floor", auto_offset_reset="latest")  # fmt: skip
    await floor_producer.start()
    await floor_producer.send_and_wait("idle-floor", b"warm")
    await floor_consumer.start()
    await floor_consumer.getmany(timeout_ms=2000)
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        parts = _parts(up.pid, data_dir)
        assert floor_broker.process is not None
        floor_pid = floor_broker.process.pid
        before, floor_before, started = _cpu_of(parts), _cpu_seconds(floor_pid), time.monotonic()
        await asyncio.sleep(seconds)
        after, floor_after = _cpu_of(parts), _cpu_seconds(floor_pid)
        elapsed = time.monotonic() - started
        cpu = {part: 100 * (after[part] - before[part]) / elapsed for part in parts}
        wakes, floor_wakes = [], []
        for _ in range(WAKE_ROUNDS):
            await asyncio.sleep(QUIET_SECONDS)
            wakes.append(await _wake_once(installation.kafka_bootstrap, installation.database_url))
            floor_wakes.append(await _floor_wake(floor_consumer, floor_producer))
    finally:
        await floor_consumer.stop()
        await floor_producer.stop()
    everything = [pid for pids in _parts(up.pid, data_dir).values() for pid in pids]
    stop_started = time.monotonic()
    os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C at a terminal sends to loket's group
    for _ in range(1200):  # 60 s at most
        if not any(_alive(pid) for pid in everything):
            break
        await asyncio.sleep(0.05)
    return {
        "idle_seconds": round(elapsed, 1),
        "cpu_percent": {part: round(value, 2) for part, value in cpu.items()},
        "cpu_percent_loket_and_broker": round(cpu["loket"] + cpu["broker"], 2),
        "floor_cpu_percent_bare_broker": round(100 * (floor_after - floor_before) / elapsed, 2),
        "first_message_seconds": [round(w, 3) for w in wakes],
        "first_message_median_seconds": round(statistics.median(wakes), 3),
        "floor_first_message_median_seconds": round(statistics.median(floor_wakes), 3),
        "stop_seconds": round(time.monotonic() - stop_started, 2),
        "stopped_cleanly": up.wait(timeout=5) == 0,
    }


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not read its status yet


def format_idle(result: dict[str, Any]) -> str:
    cpu = result["cpu_percent"]
    return "\n".join([
        f"loket bench --idle: an embedded `loket up`, left alone for {result['idle_seconds']} s",
        f"  CPU, % of one core:   loket {cpu['loket']}  broker {cpu['broker']}"
        f"  (together {result['cpu_percent_loket_and_broker']}; its PostgreSQL {cpu['postgres']})",
        f"  floor:                a bare broker with no client {result['floor_cpu_percent_bare_broker']}",
        f"  first message after {QUIET_SECONDS:.0f} s quiet, raw topic to message row:"
        f" median {result['first_message_median_seconds']} s {result['first_message_seconds']}",
        f"  floor:                one hop on the bare broker to an idle consumer"
        f" {result['floor_first_message_median_seconds']} s",
        f"  Ctrl-C to every process gone: {result['stop_seconds']} s"
        f" ({'exit 0' if result['stopped_cleanly'] else 'NOT clean'})",
    ])  # fmt: skip
