"""Write one burst of records to each of several topics at fixed moments (a producer process).

`python -m tests.support.burst BOOTSTRAP TAG START SPACING TOPIC...`: at START + i * SPACING
(Unix time) it sends 100 records to the i-th topic and waits for their acknowledgements, so two
such processes started with the same START write every topic's first batches at the same moment.
Prints each acknowledged record as "topic partition offset ident".
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiokafka import AIOKafkaProducer

PER_TOPIC = 100


async def burst(bootstrap: str, tag: str, start: float, spacing: float, topics: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i, topic in enumerate(topics):
            await asyncio.sleep(max(0.0, start + i * spacing - time.time()))
            idents = [f"{topic}/{tag}{n}" for n in range(PER_TOPIC)]
            futures = [
                await producer.send(topic, json.dumps(ident).encode(), key=str(n).encode())
                for n, ident in enumerate(idents)
            ]
            for ident, meta in zip(idents, await asyncio.gather(*futures), strict=True):
                print(meta.topic, meta.partition, meta.offset, ident)
    finally:
        await producer.stop()


if __name__ == "__main__":
    bootstrap, tag, start, spacing, *names = sys.argv[1:]
    asyncio.run(burst(bootstrap, tag, float(start), float(spacing), names))
