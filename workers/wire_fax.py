"""fax wiring: delivery senders and pollers (none configured yet)."""

from __future__ import annotations

from workers.runtime import Runtime
from workers.wiring import Sender, StageFactory


def senders(rt: Runtime) -> dict[str, Sender]:
    return {}


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    return {}


def ocr_tasks(rt: Runtime) -> dict[str, StageFactory]:
    """The OCR stage: faxes are recognised here, off the hot path."""
    return {}
