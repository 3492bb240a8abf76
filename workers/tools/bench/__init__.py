"""`loket bench`: messages through the real inbound path into PostgreSQL, measured end to end."""

from workers.tools.bench.options import BenchError, BenchOptions
from workers.tools.bench.run import format_text, run_bench

__all__ = ["BenchError", "BenchOptions", "format_text", "run_bench"]
