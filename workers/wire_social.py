"""social wiring: delivery senders and pollers (none configured yet)."""

from __future__ import annotations

from workers.runtime import Runtime
from workers.wiring import Sender, StageFactory


def senders(rt: Runtime) -> dict[str, Sender]:
    return {}


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    return {}
