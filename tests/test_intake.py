"""The one way in: every source's messages fitted, stamped, counted, and published."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from channels.blobs import DiskBlobStore
from channels.types import DeliveryReceipt, RawInbound
from tests.support.memory_bus import MemoryBroker
from workers.pipeline import bus, intake
from workers.runtime.runtime import Runtime
from workers.runtime.settings import Settings


def runtime(broker: MemoryBroker, blobs: Path, max_text_chars: int = 1000) -> Runtime:
    settings = Settings(max_text_chars=max_text_chars, kafka_bootstrap="memory", database_url="x")
    return Runtime(settings=settings, database_url="", bootstrap="", pool=None,  # type: ignore[arg-type]
                   producer=broker.producer(), blobs=DiskBlobStore(blobs), channels={},  # type: ignore[arg-type]
                   rules=None)  # type: ignore[arg-type]  # fmt: skip


def inbound(account: str) -> float:
    return (
        REGISTRY.get_sample_value("loket_inbound_total", {"channel": "sms", "account": account})
        or 0
    )


def message(n: int, account: str, text: str = "Laporan") -> RawInbound:
    return RawInbound(channel="sms", account=account, external_id=f"m{n}", sender="+6281200000000",
                      body_text=text)  # fmt: skip


async def test_messages_are_cut_stamped_counted_and_published_with_their_receipts(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    rt = runtime(broker, tmp_path)
    raws = [message(1, "intake-a"), message(2, "intake-a", "x" * 5000)]
    raws[0].meta["accepted_at"] = "1700000000.0"  # a source that knew better keeps its stamp
    receipt = DeliveryReceipt(
        channel="sms", account="intake-a", provider_id="p1", status="delivered"
    )
    before = inbound("intake-a")

    await intake.publish_inbound(rt, raws, receipts=[receipt])

    published = [msgspec.json.decode(v, type=RawInbound) for v in broker.values(bus.RAW)]
    assert [r.external_id for r in published] == ["m1", "m2"]
    assert published[0].meta["accepted_at"] == "1700000000.0"
    assert float(published[1].meta["accepted_at"]) > 1700000000
    # Cut at the edge, saying so, with the original attached.
    assert (
        published[1].body_text.startswith("x" * 1000) and "x" * 1001 not in published[1].body_text
    )
    assert "message cut" in published[1].body_text
    assert any(a.filename == "original-text.txt" for a in published[1].attachments)
    assert [r.key for r in broker.topics[bus.RECEIPTS]] == [b"p1"]
    assert inbound("intake-a") - before == 2


async def test_a_refused_record_counts_nothing_and_raises(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.refuse = lambda topic, value: bus.MessageSizeTooLargeError()
    rt = runtime(broker, tmp_path)
    before = inbound("intake-b")
    with pytest.raises(bus.UNWRITABLE_ERRORS):
        await intake.publish_inbound(rt, [message(1, "intake-b")])
    assert inbound("intake-b") == before and bus.RAW not in broker.topics


async def test_send_inbound_returns_the_acknowledgement_to_await(tmp_path: Path) -> None:
    broker = MemoryBroker()
    rt = runtime(broker, tmp_path)
    acknowledged = await intake.send_inbound(rt, message(7, "intake-c"))
    record = await acknowledged
    assert record.offset == 0 and "accepted_at" in msgspec.json.decode(record.value)["meta"]
