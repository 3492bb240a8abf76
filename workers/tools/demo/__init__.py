"""`loket up --demo`: sample traffic (`run`), each message through its real inbound path
(`inbound`, with the texts in `content`), and sinks that answer the agents' replies (`sinks`)."""

from workers.tools.demo.run import run_demo
from workers.tools.demo.sinks import install

__all__ = ["install", "run_demo"]
