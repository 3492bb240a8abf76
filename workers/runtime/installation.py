"""The running `loket up` of a data directory, as it leaves word of itself for the ops commands.

`loket up` holds an exclusive lock on `loket.lock` in `LOKET_DATA_DIR` for as long as it runs
(the kernel lets go of it when the process ends, however it ends), and writes `runtime.json`
beside it once its database and broker answer: readable by its owner only, since it holds
the embedded database's address. `loket status`, `report`, `trace`, `dlq` and `agent add`
read it where neither `LOKET_DATABASE_URL` nor `LOKET_KAFKA_BOOTSTRAP` is set, so an
embedded installation needs no configuration for them either. A runtime file nobody holds
the lock for (left by a `kill -9`, a power cut, a container stopped hard) is stale: ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from workers.runtime.settings import ConfigError, Settings

RUNTIME_FILE = "runtime.json"
LOCK_FILE = "loket.lock"


@dataclass(frozen=True)
class Installation:
    pid: int
    database_url: str  # empty unless loket started the database itself (it holds a password)
    kafka_bootstrap: str
    http_url: str
    started_at: float


def runtime_path(data_dir: Path) -> Path:
    return data_dir / RUNTIME_FILE


def hold(data_dir: Path) -> IO[str]:
    """Take the data directory's lock for this process, or ConfigError when a `loket up`
    already holds it. Keep what is returned open for as long as the process runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held till exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        found = _read(runtime_path(data_dir))
        where = f" (pid {found.pid}, {found.http_url})" if found else ""
        raise ConfigError(
            f"loket is already running from {data_dir}{where}: stop it first, or give this"
            " one another LOKET_DATA_DIR"
        ) from None
    return lock


def announce(data_dir: Path, installation: Installation) -> None:
    """Write the runtime file atomically, mode 0600 from its creation on."""
    target = runtime_path(data_dir)
    partial = target.with_name(f".{RUNTIME_FILE}.{installation.pid}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(asdict(installation), out)
    os.replace(partial, target)


def withdraw(data_dir: Path) -> None:
    """Remove the runtime file (at stop, while this process still holds the lock)."""
    with contextlib.suppress(FileNotFoundError):
        runtime_path(data_dir).unlink()


def running(data_dir: Path) -> Installation | None:
    """The `loket up` running from `data_dir`, or None (no file, or nobody holds the lock)."""
    found = _read(runtime_path(data_dir))
    if found is None or not _locked(data_dir):
        return None
    return found


def attach(settings: Settings, *, database: bool = True, broker: bool = True) -> Settings:
    """`settings` with what the environment leaves out taken from the `loket up` running
    from its data directory: the embedded database, the broker it uses.

    A value the environment does set must be the running installation's own, so a database
    of one installation is never paired with the broker of another (a replay would publish
    to one and record in the other). Raises ConfigError naming what is missing or wrong.
    """
    wanted = [
        (name, field) for name, field, needed in (
            ("LOKET_DATABASE_URL", "database_url", database),
            ("LOKET_KAFKA_BOOTSTRAP", "kafka_bootstrap", broker),
        ) if needed
    ]  # fmt: skip
    missing = [(name, field) for name, field in wanted if not getattr(settings, field)]
    if not missing:
        return settings
    names = " and ".join(name for name, _ in missing)
    found = running(settings.data_dir)
    if found is None:
        raise ConfigError(
            f"no running loket found in {settings.data_dir} (LOKET_DATA_DIR): start one with"
            f" `loket up`, or set {names} to reach another installation"
        )
    for name, field in wanted:
        given, used = getattr(settings, field), getattr(found, field)
        if given and used and given != used:
            raise ConfigError(
                f"{name} is not what the loket up running from {settings.data_dir} uses:"
                f" set {names} too, or unset {name}"
            )
    update = {field: getattr(found, field) for _, field in missing}
    unknown = [name for name, field in missing if not update[field]]
    if unknown:
        raise ConfigError(
            f"the loket up running from {settings.data_dir} was given its"
            f" {' and '.join(unknown)}: set the same here"
        )
    return settings.model_copy(update=update)


def _read(path: Path) -> Installation | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Installation(**data)
    except (OSError, ValueError, TypeError):
        return None


def _locked(data_dir: Path) -> bool:
    """Whether a process holds the data directory's lock (tried without taking it for long)."""
    try:
        with open(data_dir / LOCK_FILE, encoding="utf-8") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
