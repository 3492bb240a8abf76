"""Knowledge-base search latency: generated articles in a database, agents' queries timed."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass

from ticketing import kb
from ticketing.db import create_pool, migrate

SYSTEMS = [
    "Dapodik", "ARKAS", "PMM", "SIPLah", "e-Rapor", "ANBK", "Info GTK", "SIMPKB", "PPDB", "akun belajar.id",
    "email sekolah", "printer", "wifi", "laptop", "proyektor", "router", "modem", "server proktor",
    "aplikasi PIP", "rekening BOS", "Verval PD", "NUPTK", "Sapras", "SIMPel", "Rumah Belajar", "Google Classroom",
]  # fmt: skip
SYMPTOMS = [
    "tidak bisa login", "gagal sinkronisasi", "error saat menyimpan data", "lambat sekali", "mati total",
    "tidak muncul", "menolak kata sandi", "terputus terus", "tidak terdeteksi", "minta verifikasi ulang",
    "data hilang", "tidak bisa mencetak", "tidak bisa diunggah", "belum cair", "terkunci", "kedaluwarsa",
    "menampilkan layar putih", "tidak sesuai", "tertahan di proses", "tidak terhubung ke jaringan",
]  # fmt: skip
CONTEXTS = [
    "sejak pagi", "setelah pembaruan", "di ruang guru", "di laboratorium komputer", "saat jam pelajaran",
    "ketika ujian berlangsung", "menjelang batas waktu pelaporan", "setelah ganti operator",
    "di semua perangkat", "hanya di satu komputer", "setelah listrik padam", "sejak minggu lalu",
]  # fmt: skip
PLACES = [
    "Bandung", "Garut", "Sleman", "Klaten", "Malang", "Kupang", "Ambon", "Jayapura", "Medan", "Padang",
    "Pontianak", "Makassar", "Mataram", "Palu", "Banjarmasin", "Serang", "Cirebon", "Jember", "Kendari",
]  # fmt: skip
ACTIONS = [
    "Restart perangkat", "Perbarui aplikasi ke versi terbaru", "Bersihkan cache peramban",
    "Reset kata sandi lewat operator", "Periksa kabel jaringan", "Hubungi dinas pendidikan",
    "Ulangi sinkronisasi di luar jam sibuk", "Pasang ulang driver", "Periksa data di Dapodik",
    "Ajukan verifikasi ulang", "Tunggu proses pusat", "Ganti port USB",
]  # fmt: skip
EXTRA = [
    "operator", "kepala sekolah", "bendahara", "guru honorer", "siswa kelas 6", "wali kelas", "tata usaha",
    "pengawas", "komite", "peserta didik baru", "semester genap", "tahun ajaran baru", "triwulan kedua",
]  # fmt: skip
QUERIES = [
    "dapodk tdk bisa masuk", "tidak bisa login dapodik", "wifi sekolh mati", "internet sekolah putus",
    "printer tidak bisa cetak", "dana bos blm cair", "akun belajar.id terkunci", "pmm lambat",
    "erapor data hilang", "anbk server proktor gagal sinkron", "siplah pesanan tertahan",
    "nuptk tidak muncul", "laptop mati total", "router terputus terus", "kata sandi ditolak ppdb",
    "info gtk tidak sesuai", "verval pd minta verifikasi", "simpkb terkunci", "email sekolah error",
    "proyektor tidak terdeteksi", "I forgot my password", "school wifi keeps disconnecting",
    "printer offline", "google classroom layar putih", "rumah belajar tidak bisa diunggah",
]  # fmt: skip


def generate(count: int, seed: int = 7) -> list[kb.NewArticle]:
    """Articles from templates with varied words, places and school numbers."""
    rng = random.Random(seed)
    articles = []
    for n in range(count):
        system, symptom = rng.choice(SYSTEMS), rng.choice(SYMPTOMS)
        school = f"{rng.choice(['SDN', 'SMPN', 'SMAN', 'SMKN', 'MIN'])} {rng.randint(1, 40)} {rng.choice(PLACES)}"
        problem = (
            f"{system} {symptom} {rng.choice(CONTEXTS)} di {school}, dilaporkan oleh {rng.choice(EXTRA)}"
            f" (NPSN {20_000_000 + n})"
        )
        solution = f"{rng.choice(ACTIONS)}. {rng.choice(ACTIONS)} bila masih {symptom}."
        tags = [
            system.lower(),
            rng.choice(["akun", "jaringan", "perangkat", "dana", "data", "aplikasi"]),
        ]
        articles.append(kb.NewArticle(problem, solution, tuple(tags), "id"))
    return articles


@dataclass
class BenchResult:
    articles: int
    queries: int
    runs: int
    p50_ms: float
    p95_ms: float
    per_run: list[tuple[float, float]]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def run_bench(
    dsn: str, *, articles: int = 50_000, runs: int = 3, batch: int = 5_000
) -> BenchResult:
    """Fill the database at `dsn` (migrated here) with generated articles and time the queries.

    Each run times every query once; p50/p95 are the medians over the runs.
    """
    pool = await create_pool(dsn, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            generated = generate(articles)
            for start in range(0, len(generated), batch):
                async with conn.transaction():
                    await kb.publish_many(conn, generated[start : start + batch])
            # As autovacuum would after an import: flush the GIN pending lists, fresh statistics.
            for table in ("kb_articles", "kb_stems", "kb_words"):
                await conn.execute(f"VACUUM ANALYZE {table}")
            loaded = await conn.fetchval(
                "SELECT count(*) FROM kb_articles WHERE status = 'published'"
            )
            for query in QUERIES[:3]:  # warm the caches once
                await kb.search(conn, query)
            per_run = []
            for _ in range(runs):
                timings = []
                for query in QUERIES:
                    started = time.perf_counter()
                    await kb.search(conn, query, limit=10)
                    timings.append((time.perf_counter() - started) * 1000)
                per_run.append((_percentile(timings, 0.5), _percentile(timings, 0.95)))
    finally:
        await pool.close()
    return BenchResult(
        articles=loaded, queries=len(QUERIES), runs=runs,
        p50_ms=statistics.median(p50 for p50, _ in per_run),
        p95_ms=statistics.median(p95 for _, p95 in per_run), per_run=per_run,
    )  # fmt: skip


if __name__ == "__main__":
    # python -m workers.tools.kb_bench DATABASE_URL [ARTICLES]: the database is filled, so give it a scratch one.
    result = asyncio.run(
        run_bench(sys.argv[1], articles=int(sys.argv[2]) if len(sys.argv) > 2 else 50_000)
    )
    print(f"{result.articles} articles, {result.queries} queries x {result.runs} runs:"
          f" p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms")  # fmt: skip
