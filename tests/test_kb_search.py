"""Knowledge-base search against PostgreSQL: an evaluation set of articles and differently phrased queries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from normalizer.stem import stem_word, stems
from tests.support import db
from ticketing import kb
from ticketing.db import create_pool, migrate

# (key, problem, solution, tags, language)
ARTICLES: list[tuple[str, str, str, list[str], str]] = [
    ("dapodik-login", "Tidak bisa login ke aplikasi Dapodik, muncul pesan username atau password salah",
     "Operator sekolah mereset password melalui menu Lupa Password di Dapodik, lalu masuk dengan kata sandi baru.",
     ["dapodik", "login"], "id"),
    ("dapodik-sync", "Sinkronisasi Dapodik gagal, muncul pesan koneksi ke server terputus",
     "Periksa koneksi, perbarui aplikasi Dapodik ke versi terbaru, ulangi sinkronisasi di luar jam sibuk.",
     ["dapodik", "sinkronisasi"], "id"),
    ("internet-putus", "Koneksi internet di sekolah terputus sejak pagi, semua komputer tidak bisa online",
     "Restart modem dan router, periksa kabel dari ISP; bila tetap mati laporkan gangguan ke penyedia layanan.",
     ["internet", "jaringan"], "id"),
    ("wifi-mati", "Wifi sekolah mati di ruang guru, perangkat tidak bisa terhubung ke jaringan nirkabel",
     "Nyalakan ulang access point, pastikan adaptor daya terpasang, cek lampu indikator.",
     ["wifi", "jaringan"], "id"),
    ("belajarid-sandi", "Lupa kata sandi akun belajar.id sehingga tidak bisa membuka email",
     "Operator sekolah mengatur ulang kata sandi akun belajar.id di laman pengelola akun.",
     ["belajar.id", "email"], "id"),
    ("belajarid-siswa", "Siswa baru belum menerima akun belajar.id",
     "Pastikan siswa sudah terdaftar di Dapodik dengan NISN valid; akun dibuat otomatis setelah sinkronisasi.",
     ["belajar.id", "siswa"], "id"),
    ("bos-cair", "Dana BOS tahap 1 belum cair ke rekening sekolah",
     "Pastikan laporan tahap sebelumnya sudah diunggah dan data rekening sekolah di Dapodik sesuai.",
     ["bos", "dana"], "id"),
    ("bos-arkas", "Tidak bisa mengunggah laporan penggunaan dana BOS di aplikasi ARKAS",
     "Perbarui ARKAS, lakukan kirim data ulang setelah tutup buku bulanan.",
     ["bos", "arkas"], "id"),
    ("pip-masuk", "Bantuan PIP siswa belum masuk ke rekening, bagaimana cara mengecek penerima PIP",
     "Cek status penerima di laman pip.kemdikbud.go.id dengan NISN dan NIK siswa.",
     ["pip", "bantuan"], "id"),
    ("pip-aktivasi", "Rekening SimPel PIP siswa belum diaktivasi sehingga dana bantuan tidak bisa dicairkan",
     "Siswa dan orang tua datang ke bank penyalur membawa surat keterangan kepala sekolah untuk aktivasi rekening.",
     ["pip", "rekening"], "id"),
    ("printer-macet", "Printer di ruang tata usaha tidak bisa mencetak karena kertas macet",
     "Matikan printer, buka penutup, tarik kertas yang tersangkut perlahan, nyalakan kembali.",
     ["printer"], "id"),
    ("printer-deteksi", "Printer tidak terdeteksi di laptop setelah pembaruan Windows",
     "Pasang ulang driver printer dari situs produsen dan sambungkan kabel USB ke port lain.",
     ["printer", "driver"], "id"),
    ("erapor", "Nilai siswa tidak muncul di rapor digital (e-Rapor) sehingga rapor tidak bisa dicetak",
     "Pastikan nilai sudah dikirim oleh guru mapel dan wali kelas sudah memvalidasi, lalu tarik data ulang.",
     ["rapor", "e-rapor"], "id"),
    ("anbk-token", "Peserta gagal masuk ANBK karena token asesmen tidak valid",
     "Proktor merilis token baru dari server, pastikan jam komputer klien sama dengan server.",
     ["anbk", "asesmen"], "id"),
    ("anbk-proktor", "Server proktor ANBK tidak bisa sinkron dengan server pusat",
     "Periksa status server pusat, unduh ulang paket sinkronisasi, restart layanan VHD.",
     ["anbk", "proktor"], "id"),
    ("siplah", "Pesanan pembelian di SIPLah tidak diproses oleh penyedia",
     "Hubungi penyedia lewat fitur negosiasi; bila lebih dari 7 hari batalkan pesanan dan pilih penyedia lain.",
     ["siplah", "pengadaan"], "id"),
    ("nuptk", "Pengajuan NUPTK guru baru belum diproses dan statusnya tidak muncul di Info GTK",
     "Lengkapi dokumen SK pengangkatan di Dapodik, tunggu verifikasi dinas pendidikan kabupaten.",
     ["nuptk", "gtk"], "id"),
    ("pmm-login", "Aplikasi Platform Merdeka Mengajar (PMM) menolak masuk dengan akun belajar.id",
     "Keluar dari semua akun Google di perangkat, masuk kembali memakai akun belajar.id guru.",
     ["pmm", "login"], "id"),
    ("pmm-sertifikat", "Sertifikat pelatihan mandiri di PMM tidak muncul setelah menyelesaikan topik",
     "Sertifikat terbit setelah aksi nyata divalidasi; tunggu hingga 14 hari kerja.",
     ["pmm", "sertifikat"], "id"),
    ("portal-password", "Forgot my password for the help desk portal and need a password reset",
     "Use the Forgot password link on the sign-in page; the reset link is valid for one hour.",
     ["password", "portal"], "en"),
    ("wifi-en", "School Wi-Fi network keeps disconnecting every few minutes",
     "Move the access point away from metal cabinets and change the wireless channel to a less crowded one.",
     ["wifi", "network"], "en"),
    ("printer-en", "Printer shows offline and documents are stuck in the print queue",
     "Clear the print queue, restart the print spooler service, set the printer online again.",
     ["printer"], "en"),
    ("email-locked", "Email account locked after too many failed sign-in attempts",
     "Wait 30 minutes or ask the administrator to unlock the account, then change the password.",
     ["email", "account"], "en"),
    ("laptop-slow", "Laptop is very slow and freezes after startup",
     "Disable startup programs, free disk space, and run a malware scan.",
     ["laptop", "performance"], "en"),
    ("projector", "Projector in the classroom shows no signal from the laptop",
     "Check the HDMI cable and press Windows+P to duplicate the display to the projector.",
     ["projector"], "en"),
    ("tunjangan", "Data tunjangan sertifikasi guru di Info GTK tidak sesuai",
     "Perbaiki data jam mengajar dan rombel di Dapodik, lalu sinkronkan; Info GTK diperbarui esok hari.",
     ["gtk", "tunjangan"], "id"),
    ("nisn", "NISN siswa tidak ditemukan saat verval peserta didik",
     "Ajukan verval PD dengan dokumen akta kelahiran dan kartu keluarga melalui operator sekolah.",
     ["nisn", "verval"], "id"),
    ("ppdb", "Aplikasi PPDB online error ketika calon siswa baru mendaftar",
     "Bersihkan cache peramban, coba di luar jam sibuk, laporkan nomor pendaftaran ke panitia.",
     ["ppdb"], "id"),
    ("simpkb", "Akun SIMPKB terkunci setelah berkali-kali salah memasukkan password",
     "Tunggu 24 jam atau minta admin dinas membuka kunci akun SIMPKB.",
     ["simpkb", "akun"], "id"),
    ("laptop-bantuan", "Laptop bantuan DAK untuk sekolah rusak dan tidak mau menyala",
     "Klaim garansi ke penyedia dengan nomor seri dan berita acara serah terima.",
     ["laptop", "dak"], "id"),
    ("virus", "Komputer terkena virus, semua file berubah menjadi shortcut",
     "Pindai dengan antivirus, tampilkan file tersembunyi dengan attrib -h -s, hapus file .lnk.",
     ["virus", "komputer"], "id"),
    ("zoom-suara", "Suara tidak terdengar ketika rapat daring memakai Zoom atau Google Meet",
     "Pilih perangkat speaker yang benar di pengaturan audio dan izinkan mikrofon di peramban.",
     ["zoom", "audio"], "id"),
    ("erapor-en", "How to upload student grades into the e-Rapor application",
     "Download the grade template, fill it in, and import it from the Grades menu.",
     ["rapor", "grades"], "en"),
    ("website", "Situs web sekolah tidak bisa diakses karena domain sch.id kedaluwarsa",
     "Perpanjang domain sch.id melalui pengelola domain dengan surat kuasa kepala sekolah.",
     ["website", "domain"], "id"),
    ("belajarid-inbox", "Not receiving any emails in my belajar.id account inbox",
     "Check the spam folder and filters; make sure the mailbox storage is not full.",
     ["belajar.id", "email"], "en"),
    ("kuota", "Bantuan kuota data internet Kemendikbud untuk siswa belum masuk ke nomor HP",
     "Pastikan nomor ponsel siswa terdaftar di Dapodik dan aktif; kuota dikirim bertahap per operator seluler.",
     ["kuota", "bantuan"], "id"),
    ("kepsek-en", "How to update the principal's data in Dapodik after a new headmaster is appointed",
     "Enter the new principal's appointment letter in Dapodik GTK and synchronize.",
     ["dapodik", "principal"], "en"),
]  # fmt: skip

# (query as an agent types it, the article it must find)
QUERIES: list[tuple[str, str]] = [
    ("dapodk tdk bisa masuk", "dapodik-login"),
    ("tidak bisa login dapodik", "dapodik-login"),
    ("pasword dapodik salah terus", "dapodik-login"),
    ("sinkron dapodik eror koneksi", "dapodik-sync"),
    ("internet sekolah putus", "internet-putus"),
    ("internetnya mati semua komputer offline", "internet-putus"),
    ("wifi sekolh mati", "wifi-mati"),
    ("lupa sandi email belajar id", "belajarid-sandi"),
    ("akun belajar.id siswa baru belum ada", "belajarid-siswa"),
    ("dana bos blm cair", "bos-cair"),
    ("upload laporan bos arkas gagal", "bos-arkas"),
    ("pip belum masuk rekening siswa", "pip-masuk"),
    ("aktivasi rekening simpel pip", "pip-aktivasi"),
    ("printer macet kertas nyangkut", "printer-macet"),
    ("printr tidak terbaca di laptop", "printer-deteksi"),
    ("nilai erapor tdk muncul", "erapor"),
    ("token anbk ga valid", "anbk-token"),
    ("proktor anbk gagal sinkronisasi", "anbk-proktor"),
    ("pesanan siplah gak diproses", "siplah"),
    ("status nuptk belum keluar", "nuptk"),
    ("pmm tidak bisa masuk", "pmm-login"),
    ("sertifikat pmm belum muncul", "pmm-sertifikat"),
    ("I forgot my password", "portal-password"),
    ("school wifi disconnects all the time", "wifi-en"),
    ("print queue stuck printer offline", "printer-en"),
    ("account locked too many login attempts", "email-locked"),
    ("laptop freezing very slow", "laptop-slow"),
    ("projecter no signal", "projector"),
    ("tunjangan sertifikasi tdk sesuai info gtk", "tunjangan"),
    ("nisn tidak ditemukan verval pd", "nisn"),
    ("ppdb eror pendaftaran", "ppdb"),
    ("simpkb kekunci", "simpkb"),
    ("laptop bantuan rusak ga nyala", "laptop-bantuan"),
    ("file jadi shortcut kena virus", "virus"),
    ("suara zoom tidak terdengar", "zoom-suara"),
    ("how to upload grades erapor", "erapor-en"),
    ("website sekolah tidak bisa dibuka", "website"),
    ("not getting emails belajar.id", "belajarid-inbox"),
    ("kuota belajar siswa belum masuk", "kuota"),
    ("change headmaster in dapodik", "kepsek-en"),
    ("komputer lab gak konek internet", "internet-putus"),
    ("cara cek siswa penerima bantuan pip", "pip-masuk"),
    ("kertas nyangkut di printer TU", "printer-macet"),
    ("rapor siswa gak bisa diprint", "erapor"),
    ("can't open the school website", "website"),
    ("dapodik says my password is wrong", "dapodik-login"),
    ("peserta ujian tidak bisa login asesmen", "anbk-token"),
    ("belanja sekolah lewat siplah tertahan", "siplah"),
]


@pytest.fixture(scope="module")
def kb_url() -> Iterator[str]:
    """A database of its own, so the evaluation sees exactly its articles."""
    url = db.create_database("loket_kb")
    yield url
    db.drop_database(url)


@pytest.fixture
async def pool(kb_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(kb_url, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


async def load_articles(conn: asyncpg.Connection) -> dict[str, int]:
    ids = {}
    async with conn.transaction():
        await conn.execute("TRUNCATE kb_articles, kb_stems, kb_words, kb_usage, ticket_suggestions")
        for key, problem, solution, tags, language in ARTICLES:
            article = await kb.create_article(conn, problem=problem, solution=solution, tags=tags)
            assert article["language"] == language, (key, article["language"])
            ids[key] = article["id"]
    return ids


def test_stems_undo_affixes_and_chat_spelling() -> None:
    assert stems("Pencairan dana BOS belum masuk") == ["cair", "dana", "bos", "masuk"]
    assert stems("passwordnya tdk bisa direset") == ["password", "reset"]
    assert stems("Cannot log in to my e-mail accounts") == ["login", "email", "account"]
    assert stems("menyinkronkan") == stems("sinkron")


def test_snippet_escapes_html_and_marks_matches() -> None:
    text = "Printer <b>macet</b> & kertas tersangkut di ruang TU"
    marked = kb.snippet(text, {"printer", "sangkut"})
    assert (
        marked
        == "<mark>Printer</mark> &lt;b&gt;macet&lt;/b&gt; &amp; kertas <mark>tersangkut</mark> di ruang TU"
    )


async def test_every_query_finds_its_article_in_the_top_three(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        ids = await load_articles(conn)
        assert len(ARTICLES) >= 30 and len(QUERIES) >= 30
        top1 = top3 = 0
        missed = []
        for query, key in QUERIES:
            hits = await kb.search(conn, query, limit=3)
            found = [h.id for h in hits]
            top1 += bool(found) and found[0] == ids[key]
            top3 += ids[key] in found
            if ids[key] not in found:
                names = {v: k for k, v in ids.items()}
                missed.append((query, key, [(names[h.id], h.score) for h in hits]))
        print(f"\nKB eval: {len(QUERIES)} queries over {len(ARTICLES)} articles:"
              f" top-1 {top1 / len(QUERIES):.0%} ({top1}), top-3 {top3 / len(QUERIES):.0%} ({top3})")  # fmt: skip
        assert not missed, missed


async def test_results_are_best_first_with_highlighted_snippets(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        ids = await load_articles(conn)
        hits = await kb.search(conn, "wifi sekolh mati", limit=10)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert hits[0].id == ids["wifi-mati"]
        assert "<mark>Wifi</mark> <mark>sekolah</mark> <mark>mati</mark>" in hits[0].snippet
        # Nothing to find is an empty answer, not an error.
        assert await kb.search(conn, "   ") == []
        assert await kb.search(conn, "xqzv") == []


async def test_drafts_and_retired_articles_are_not_found_until_published(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        ids = await load_articles(conn)
        async with conn.transaction():
            draft = await kb.create_article(
                conn, problem="Aplikasi Sapras tidak bisa menyimpan data bangunan",
                solution="Perbarui aplikasi Sapras.", tags=["sapras"], status="draft",
            )  # fmt: skip
        assert [h.id for h in await kb.search(conn, "sapras tidak menyimpan")] == []
        async with conn.transaction():
            await kb.update_article(conn, draft["id"], agent_id=None, status="published")
        assert [h.id for h in await kb.search(conn, "sapras tidak menyimpan")][:1] == [draft["id"]]
        async with conn.transaction():
            await kb.update_article(conn, ids["siplah"], agent_id=None, status="retired")
        assert ids["siplah"] not in [h.id for h in await kb.search(conn, "pesanan siplah")]
        # The counts the ranking weighs words by follow what is published.
        published = await conn.fetchval(
            "SELECT count(*) FROM kb_articles WHERE status = 'published'"
        )
        assert await conn.fetchval("SELECT df FROM kb_stems WHERE stem = ''") == published
        assert (
            await conn.fetchval("SELECT df FROM kb_stems WHERE stem = $1", stem_word("siplah")) == 0
        )
        expected = await conn.fetchval(
            "SELECT count(*) FROM kb_articles WHERE status = 'published'"
            " AND search_tsv @@ to_tsquery('simple', 'dapodik')"
        )
        assert await conn.fetchval("SELECT df FROM kb_stems WHERE stem = 'dapodik'") == expected


@pytest.mark.slow
def test_search_latency_at_fifty_thousand_articles() -> None:
    from workers.tools.kb_bench import run_bench

    url = db.create_database("loket_kb_bench")
    try:
        result = asyncio.run(run_bench(url, articles=50_000, runs=3))
    finally:
        db.drop_database(url)
    print(f"\nKB search at {result.articles} articles, {result.queries} queries x {result.runs} runs:"
          f" p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms (medians of the runs)")  # fmt: skip
    assert result.articles == 50_000 and result.queries > 0


def test_suggestion_stage_picks_tickets_with_a_callers_message() -> None:
    from aiokafka.structs import ConsumerRecord

    from workers.pipeline.bus import PoisonMessage
    from workers.pipeline.kb_suggest import tickets_to_suggest

    def record(value: bytes) -> ConsumerRecord:
        return ConsumerRecord("loket.events", 0, 0, 0, 0, None, value, None, 0, len(value), ())

    events = [
        b'{"type": "message", "direction": "in", "ticket_id": 7, "outcome": "new"}',
        b'{"type": "message", "direction": "in", "ticket_id": 8, "outcome": "bounce"}',
        b'{"type": "message", "direction": "in", "ticket_id": 7, "outcome": "append"}',
        b'{"type": "message", "direction": "in", "ticket_id": 9, "outcome": "reopen"}',
        b'{"type": "delivery", "ticket_id": 10}',
    ]
    assert tickets_to_suggest([record(e) for e in events]) == [7, 9]
    with pytest.raises(PoisonMessage):
        tickets_to_suggest([record(b"not json")])
    with pytest.raises(PoisonMessage):
        tickets_to_suggest([record(b'{"type": "message", "direction": "in", "ticket_id": "x"}')])
