"""The running `loket up` of a data directory, as it leaves word of itself for the ops commands.

`loket up` writes `runtime.json` into `LOKET_DATA_DIR` once its database and broker answer,
readable by its owner only (it holds the database address), and removes it when it stops.
`loket status`, `report`, `trace`, `dlq` and `agent add` read it where `LOKET_DATABASE_URL`
or `LOKET_KAFKA_BOOTSTRAP` is not set, so an embedded installation needs no configuration
for them either. A file whose process is gone (a `kill -9`, a power cut) is stale: ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from workers.runtime.settings import ConfigError, Settings

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True)
class Installation:
    pid: int
    database_url: str
    kafka_bootstrap: str
    http_url: str
    started_at: float


def runtime_path(data_dir: Path) -> Path:
    return data_dir / RUNTIME_FILE


def announce(data_dir: Path, installation: Installation) -> None:
    """Write the runtime file atomically, mode 0600 from its creation on."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = runtime_path(data_dir)
    partial = target.with_name(f".{RUNTIME_FILE}.{installation.pid}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(asdict(installation), out)
    os.replace(partial, target)


def withdraw(data_dir: Path, pid: int) -> None:
    """Remove the runtime file if it is this process's (a newer `loket up` may own it)."""
    found = _read(runtime_path(data_dir))
    if found is not None and found.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            runtime_path(data_dir).unlink()


def running(data_dir: Path) -> Installation | None:
    """The `loket up` running from `data_dir`, or None (no file, or its process is gone)."""
    found = _read(runtime_path(data_dir))
    if found is None or not _alive(found.pid):
        return None
    return found


def attach(settings: Settings, *, database: bool = True, broker: bool = True) -> Settings:
    """`settings` with the database and broker a running `loket up` uses, where not set.

    Raises ConfigError naming what is missing when neither the environment nor a running
    installation gives it.
    """
    wanted = [
        (name, field) for name, field, needed in (
            ("LOKET_DATABASE_URL", "database_url", database),
            ("LOKET_KAFKA_BOOTSTRAP", "kafka_bootstrap", broker),
        ) if needed and not getattr(settings, field)
    ]  # fmt: skip
    if not wanted:
        return settings
    found = running(settings.data_dir)
    if found is None:
        names = " and ".join(name for name, _ in wanted)
        raise ConfigError(
            f"no running loket found in {settings.data_dir} (LOKET_DATA_DIR): start one with"
            f" `loket up`, or set {names} to reach another installation"
        )
    return settings.model_copy(update={field: getattr(found, field) for _, field in wanted})


def _read(path: Path) -> Installation | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Installation(**data)
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    """Whether `pid` is a running loket (not a process that got the number of a dead one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc here: the signal check is all there is
        return True
    return b"loket" in command or b"workers.cli" in command
