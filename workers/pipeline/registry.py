"""Every stage of the pipeline, declared once.

`loket worker NAME` runs one worker, `loket up` all of them; the supervisor builds their
tasks from here, `loket status` watches every consumer listed here, and the bench and the
compose file's test read the same list. A worker is made of consumer-group stages (a
handler over the batches of one topic) and other tasks (relays, pollers, timers).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from channels.types import OUTBOUND_CHANNELS, outbound_topic
from workers.pipeline import bus
from workers.pipeline.wiring import StageFactory

if TYPE_CHECKING:
    from workers.runtime.runtime import Runtime

# OCR takes a batch of faxes per core at a time.
OCR_BATCH = os.cpu_count() or 1

HandlerFactory = Callable[["Runtime"], bus.BatchHandler | None]
TasksFactory = Callable[["Runtime"], dict[str, StageFactory]]


def _lazy(path: str, *args: Any) -> Callable[[Runtime], Any]:
    """`module:function` called with the runtime (and `args`), imported on the first call.

    The CLI reads this list to parse its arguments; a stage's modules load only where it runs.
    """
    module, name = path.split(":")

    def call(rt: Runtime) -> Any:
        return getattr(importlib.import_module(module), name)(rt, *args)

    return call


@dataclass(frozen=True)
class Consumer:
    """A consumer-group stage: `handler` over batches of `topic`, in group `loket.NAME`.

    `handler(rt)` is None where the configuration gives the stage nothing to do (OCR without
    a fax account, delivery on a channel without accounts); `loket status` still watches it.
    """

    name: str
    topic: str
    handler: HandlerFactory
    batch_size: int = 500
    # How long the broker may hold an empty fetch when the stage is idle (`bus`): short for
    # the stages a new message or a reply passes, long for the others.
    idle_fetch_wait_ms: int = bus.IDLE_FETCH_MAX_WAIT_MS

    @property
    def group(self) -> str:
        return f"loket.{self.name}"


@dataclass(frozen=True)
class Worker:
    """What `loket worker NAME` runs: its consumers, and `tasks` besides them."""

    name: str
    consumers: tuple[Consumer, ...] = ()
    tasks: TasksFactory | None = None

    def build(self, rt: Runtime) -> dict[str, StageFactory]:
        """The supervised tasks of this worker for `rt`'s configuration, by name."""
        found: dict[str, StageFactory] = {}
        for consumer in self.consumers:
            handler = consumer.handler(rt)
            if handler is not None:
                found[consumer.name] = rt.stage_task(
                    consumer.name, [consumer.topic], handler, group_id=consumer.group,
                    batch_size=consumer.batch_size, idle_fetch_wait_ms=consumer.idle_fetch_wait_ms,
                )  # fmt: skip
        if self.tasks is not None:
            found.update(self.tasks(rt))
        return found


WORKERS: tuple[Worker, ...] = (
    Worker("normalizer", (Consumer("normalizer", bus.RAW, _lazy("workers.pipeline.stages:normalizer_handler"),
                                   idle_fetch_wait_ms=bus.LIVE_IDLE_FETCH_MAX_WAIT_MS),)),
    Worker("ticketing", (Consumer("ticketing", bus.MATCHED, _lazy("workers.pipeline.stages:ticketing_handler"),
                                  idle_fetch_wait_ms=bus.LIVE_IDLE_FETCH_MAX_WAIT_MS),)),
    Worker("receipts", (Consumer("receipts", bus.RECEIPTS, _lazy("workers.pipeline.stages:receipts_handler")),)),
    Worker("relay", tasks=_lazy("workers.pipeline.relay:relay_tasks")),
    Worker("delivery", tuple(
        Consumer(f"delivery-{channel}", outbound_topic(channel),
                 _lazy("workers.pipeline.stages:delivery_handler_for", channel),
                 idle_fetch_wait_ms=bus.REPLY_IDLE_FETCH_MAX_WAIT_MS)
        for channel in OUTBOUND_CHANNELS
    )),
    Worker("pollers", tasks=_lazy("workers.pipeline.wiring:all_pollers")),
    # Faxes wait on their own topic for OCR, a batch per core, off the hot path.
    Worker("ocr", (Consumer("ocr", bus.FAX, _lazy("workers.pipeline.wiring.fax:ocr_handler_for"),
                            batch_size=OCR_BATCH),)),
    Worker("scheduler", tasks=_lazy("workers.pipeline.scheduler:scheduler_tasks")),
    Worker("kb", (Consumer("kb-suggest", bus.EVENTS, _lazy("workers.pipeline.kb_suggest:kb_suggest_handler")),)),
)  # fmt: skip

# The names `loket worker` takes (besides `http`).
NAMES: tuple[str, ...] = tuple(w.name for w in WORKERS)


def worker(name: str) -> Worker:
    for found in WORKERS:
        if found.name == name:
            return found
    raise ValueError(f"unknown stage {name!r}; one of {', '.join(NAMES)}")


def consumers() -> tuple[Consumer, ...]:
    """Every consumer-group stage of every worker."""
    return tuple(c for w in WORKERS for c in w.consumers)


def consumer(name: str) -> Consumer:
    for found in consumers():
        if found.name == name:
            return found
    raise ValueError(f"unknown consumer stage {name!r}")
