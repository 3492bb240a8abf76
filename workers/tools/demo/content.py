"""What the demo's people write, and the mail and image it builds from it (no files shipped)."""

from __future__ import annotations

import struct
import zlib
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid

HELPDESK = "pengaduan@loket-demo.example.id"

# --- sample content ------------------------------------------------------------------------

EMAILS = [
    (
        "Ibu Siti Aminah, S.Pd",
        "siti.aminah@sdn3-bogor.sch.id",
        "Akun operator Dapodik terkunci",
        "Selamat pagi Bapak/Ibu,\n\nAkun operator Dapodik SD Negeri 3 Bogor terkunci sejak kemarin sore"
        " setelah tiga kali salah kata sandi. Batas sinkronisasi tanggal 31 ini.\nMohon dibantu reset.\n\n"
        "Hormat kami,\nSiti Aminah\nOperator SDN 3 Bogor",
        None,
    ),
    (
        "Bambang Sutrisno",
        "bambang.s@smpn1-klaten.sch.id",
        "Dana BOS tahap 2 belum masuk rekening",
        "Dengan hormat,\n\nSampai hari ini dana BOS tahap 2 untuk SMP Negeri 1 Klaten belum masuk ke"
        " rekening sekolah. Terlampir rekap dan tangkapan layar mutasi rekening.\n\nTerima kasih.",
        "attachments",
    ),
    (
        "Dewi Lestari",
        "dewi.lestari@gmail.com",
        "Sertifikat pelatihan guru tidak bisa diunduh",
        "Halo admin, sertifikat pelatihan Kurikulum Merdeka saya tidak bisa diunduh, muncul pesan"
        " 'file tidak ditemukan'. Mohon bantuannya.",
        "html",
    ),
    (
        "Agus Prasetyo",
        "agus.prasetyo@yahoo.co.id",
        "Jadwal ANBK susulan",
        "Selamat siang, kapan jadwal ANBK susulan untuk siswa yang sakit? Terima kasih.",
        None,
    ),
]
SMS = [
    (
        "0812-8765-4321",
        "Min, NISN anak saya tdk ditemukan di sistem PIP. Mohon bantuan. Ibu Rina, Depok",
    ),
    ("085711223344", "Kapan pendaftaran PPDB jalur zonasi dibuka? Trims"),
    ("+62 813 1122 3344", "Kartu KIP anak sy hilang, bagaimana cara urus yg baru?"),
]
TELEGRAM = [
    (
        7100001,
        "Rudi",
        "Hartono",
        "Halo, portal guru error 502 sejak pagi, tidak bisa isi presensi.",
    ),
    (7100002, "Maya", "Sari", "Selamat sore, bagaimana cara ganti email di akun SIMPKB?"),
]
FACEBOOK = [
    ("6543210000000001", "Halo admin, bagaimana cara mengurus legalisir ijazah yang hilang?"),
]
TWITTER = [
    (
        "3001969301",
        "Yusuf Ramadhan",
        "yusufr",
        "Halo min, tunjangan profesi guru bulan ini belum cair ya?",
    ),
]
CALLS = [
    # (name, organization, phone, problem, what happens next)
    (
        "Bapak Hendra Wijaya",
        "SMA Negeri 5 Surabaya",
        "031-5678901",
        "Nilai rapor siswa kelas XII tidak muncul di e-Rapor setelah sinkronisasi.",
        "open",
    ),
    (
        "Ibu Sri Wahyuni",
        "Dinas Pendidikan Kab. Sleman",
        "0274-868123",
        "Menanyakan juknis bantuan sarana prasarana tahun ini; menunggu dokumen dari pusat.",
        "pend",
    ),
    (
        "Pak Joko Susilo",
        "SDN Sukamaju 2",
        "0813-9988-7766",
        "Data guru honorer hilang dari Dapodik setelah pembaruan aplikasi.",
        "support",
    ),
    (
        "Ibu Ratna Dewi",
        "Yayasan Pendidikan Harapan",
        "021-7418780",
        "Izin operasional sekolah belum terbit padahal berkas lengkap sejak tiga bulan lalu.",
        "management",
    ),
    (
        "Bapak Ahmad Fauzi",
        "MI Al-Hidayah",
        "0857-1234-5678",
        "Lupa kata sandi akun Info GTK.",
        "resolved",
    ),
    (
        "Ibu Lina Marlina",
        None,
        "0812-3000-4000",
        "Ingin melapor pungutan liar di sekolah, tetapi memutuskan tidak jadi melapor.",
        "withdrawn",
    ),
]
TRICKLE: list[tuple[str, str, str]] = [
    ("sms", "0812-8765-4321", "Min, sudah ada kabar soal NISN anak saya?"),
    ("telegram", "7100003", "Apakah ada webinar literasi digital bulan ini?"),
    (
        "email",
        "kepala.sekolah@smkn2-medan.sch.id",
        "Surat edaran libur semester belum kami terima.",
    ),
    ("sms", "0878-5555-1212", "Bagaimana cara cek status penyaluran PIP?"),
    ("facebook", "6543210000000002", "Admin, link pendaftaran beasiswa tidak bisa dibuka."),
]


def png(width: int = 64, height: int = 40) -> bytes:
    """A small PNG (a blue bar chart on white), made here so the demo ships no image files."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            bar = (x // 8) % 2 == 0 and y > height - 6 - (x // 8) * 4
            row += bytes((30, 90, 200) if bar else (255, 255, 255))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))  # fmt: skip


def mail(name: str, address: str, subject: str, body: str, extra: str | None,
         in_reply_to: str | None = None) -> bytes:  # fmt: skip
    message = EmailMessage()
    message["From"] = formataddr((name, address))
    message["To"] = HELPDESK
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="demo.loket.example.id")
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    message.set_content(body)
    if extra == "html":
        paragraphs = "".join(f"<p>{line}</p>" for line in body.split("\n") if line)
        message.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")
    elif extra == "attachments":
        rekap = b"bulan,tahap,jumlah\nJanuari,1,125000000\nJuli,2,0\n"
        message.add_attachment(rekap, maintype="text", subtype="csv", filename="rekap-bos.csv")
        message.add_attachment(
            png(), maintype="image", subtype="png", filename="mutasi-rekening.png"
        )
    return message.as_bytes()


# What the person answers to an agent's reply, by channel (the demo sinks play it).
ANSWERS: dict[str, str] = {
    "email": "Terima kasih atas jawabannya, sudah saya coba dan berhasil.",
    "sms": "Makasih min, sdh bisa skrg.",
    "telegram": "Siap, terima kasih banyak atas bantuannya!",
    "facebook": "Baik admin, terima kasih infonya.",
    "twitter": "Oke min, makasih ya.",
}
