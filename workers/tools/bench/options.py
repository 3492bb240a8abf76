"""What a bench run is asked for, and the traffic it makes up."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path

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
