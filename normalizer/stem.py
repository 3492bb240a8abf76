"""Text to stemmed search tokens: Indonesian (PySastrawi) and English (Snowball), chat spellings undone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import snowballstemmer
from Sastrawi.Stemmer.StemmerFactory import StemmerFactory
from Sastrawi.StopWordRemover.StopWordRemoverFactory import StopWordRemoverFactory

_WORD = re.compile(r"[0-9a-z]+")

# Written forms of one word, joined before tokenizing so "log in" and "e-mail" are one token.
_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(?:log|sign)[\s-]?(?:in|on)\b"), "login"),
    (re.compile(r"\b(?:log|sign)[\s-]?out\b"), "logout"),
    (re.compile(r"\be-mail\b"), "email"),
    (re.compile(r"\bwi-?fi\b"), "wifi"),
    (re.compile(r"\bkata[\s-]?sandi\b"), "password"),
    (re.compile(r"\bpass[\s-]?word\b"), "password"),
    (re.compile(r"\bcan['’]?t\b|\bcannot\b"), "can not"),
    (re.compile(r"\bwon['’]t\b"), "will not"),
    (re.compile(r"\b(\w+)n['’]t\b"), r"\1 not"),
)

# Chat spellings callers and agents type, to the word they stand for.
SLANG: dict[str, str] = {
    "tdk": "tidak", "tak": "tidak", "gak": "tidak", "ga": "tidak", "gk": "tidak", "nggak": "tidak",
    "ngga": "tidak", "engga": "tidak", "enggak": "tidak", "kagak": "tidak", "g": "tidak",
    "yg": "yang", "sdh": "sudah", "udah": "sudah", "udh": "sudah", "dah": "sudah", "blm": "belum",
    "blum": "belum", "bs": "bisa", "bsa": "bisa", "gmn": "bagaimana", "gimana": "bagaimana",
    "knp": "kenapa", "krn": "karena", "karna": "karena", "dgn": "dengan", "utk": "untuk",
    "untk": "untuk", "sy": "saya", "aku": "saya", "lg": "lagi", "trs": "terus", "jg": "juga",
    "dr": "dari", "pd": "pada", "tp": "tapi", "aja": "saja", "skrg": "sekarang", "sklh": "sekolah",
    "sekul": "sekolah", "pwd": "password", "pw": "password", "passwd": "password", "sandinya": "sandi",
    "mksh": "terima", "makasih": "terima", "thx": "thanks", "pls": "please", "plz": "please",
    "eror": "error", "erorr": "error", "lemot": "lambat", "lelet": "lambat", "hpnya": "hp",
    "ol": "online", "donlot": "download", "aplod": "upload", "dlm": "dalam", "bgt": "sekali",
}  # fmt: skip

# Sastrawi's stop words minus the ones that carry a help-desk problem ("tidak bisa masuk",
# "pengguna" = guna, "buat akun").
_KEEP = {
    "masuk", "keluar", "kata", "kerja", "bulan", "hari", "baru", "naik", "tambah", "akhir", "awal",
    "jawab", "jawaban", "guna", "gunakan", "buat", "besar", "kecil", "lama", "data", "jumlah",
    "tanya", "pertanyaan", "tahu", "lihat", "kirim", "ganti", "mulai", "sama", "satu", "dua",
}  # fmt: skip
_ENGLISH_STOP = set(
    "a about above after again all am an and any are as at be been before being below between both but"
    " by can could did do does doing down during each few for from further had has have having he her"
    " here hers him his how i if in into is it its itself just me more most my myself no nor not now of"
    " off on once only or other our ours out over own same she should so some such than that the their"
    " them then there these they this those through to too under until up very was we were what when"
    " where which while who whom why will with would you your yours please hi hello dear thanks thank"
    " help get got still anymore keep keeps since today yesterday also".split()
)
STOP_WORDS: frozenset[str] = frozenset(
    (set(StopWordRemoverFactory().get_stop_words()) - _KEEP) | _ENGLISH_STOP | {"terima", "kasih"}
)

# English verbs used with Indonesian affixes ("diupload", "direset", "nginstal", "resetin").
LOAN_ROOTS: frozenset[str] = frozenset(
    "upload download reset login logout install instal update klik scan print save share delete"
    " edit cancel submit input backup restart reboot sync setting format copy paste block hack"
    " charge aktivasi approve verifikasi cek check email link posting refresh tag".split()
)
_LOAN_AFFIXED = re.compile(
    r"^(?:di|ter|ke|meng|men|mem|me|nge|ng)?(?P<root>[a-z]+?)(?:kan|in|nya)?$"
)

# Indonesian clitics Sastrawi leaves on words it does not know ("passwordnya", "wifiku").
_CLITICS = ("nya", "lah", "kah", "pun", "ku", "mu")

_sastrawi = StemmerFactory().create_stemmer()
_dictionary = _sastrawi.delegatedStemmer.dictionary
_english = snowballstemmer.stemmer("english")


@lru_cache(maxsize=200_000)
def stem_word(word: str) -> str:
    """The stem of one lower-case word: its Indonesian root where Sastrawi knows one, else English."""
    word = SLANG.get(word, word)
    if word.isdigit() or len(word) < 3 or _dictionary.contains(word):
        return word
    root: str = _sastrawi.stem(word)
    if root and root != word and " " not in root:
        return root
    loan = _LOAN_AFFIXED.match(word)
    if loan and loan.group("root") in LOAN_ROOTS:
        return loan.group("root")
    if word.endswith("isasi") and len(word) > 8:
        return stem_word(word[: -len("isasi")])
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) - len(clitic) >= 3:
            return stem_word(word[: -len(clitic)])
    return str(_english.stemWord(word))


def normalize(text: str) -> str:
    """Lower case with multi-word spellings joined ("log in" → "login"); punctuation kept."""
    lowered = text.lower()
    for pattern, replacement in _PHRASES:
        lowered = pattern.sub(replacement, lowered)
    return lowered


@dataclass(frozen=True)
class Token:
    """One word of a text: as written (lower case), its stem, and where it is."""

    word: str
    stem: str
    start: int
    end: int


def tokens(text: str, *, keep_stop_words: bool = False) -> list[Token]:
    """The words of `text` with their stems and offsets in the lower-cased text, stop words dropped."""
    lowered = text.lower()
    found = []
    for match in _WORD.finditer(lowered):
        word = SLANG.get(match.group(), match.group())
        if not keep_stop_words and word in STOP_WORDS:
            continue
        stem = stem_word(word)
        if not keep_stop_words and stem in STOP_WORDS:
            continue
        found.append(Token(word, stem, match.start(), match.end()))
    return found


def stems(text: str) -> list[str]:
    """The stems of the meaningful words of `text`, in order (with repeats)."""
    return [t.stem for t in tokens(normalize(text))]


def stemmed_text(text: str) -> str:
    """`stems` joined by spaces: what is stored for PostgreSQL's 'simple' full-text configuration."""
    return " ".join(stems(text))


def looks_english(text: str) -> bool:
    """Whether a text reads as English rather than Indonesian (for an article's language)."""
    words = _WORD.findall(text.lower())
    english = sum(1 for w in words if w in _ENGLISH_STOP)
    indonesian = sum(1 for w in words if w in STOP_WORDS and w not in _ENGLISH_STOP or w in SLANG)
    return english > indonesian


# Words one problem is told with in either language or in near-synonyms; a query stem also
# looks for the others, at a lower weight.
_SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("login", "masuk", "signin"),
    ("password", "sandi"),
    ("lupa", "forget", "forgot", "forgotten"),
    ("putus", "mati", "down", "offlin", "disconnect", "padam"),
    ("gagal", "error", "fail"),
    ("lambat", "slow"),
    ("cetak", "print"),
    ("hapus", "delet"),
    ("ubah", "ganti", "chang", "edit"),
    ("kirim", "send"),
    ("unduh", "download"),
    ("unggah", "upload"),
    ("daftar", "regist", "registrasi"),
    ("akun", "account"),
    ("sekolah", "school"),
    ("siswa", "murid", "student", "pupil"),
    ("guru", "teacher", "didik"),
    ("dana", "fund"),
    ("cair", "disbur"),
    ("sinkron", "sinkronisasi", "sync", "synchron"),
    ("instal", "install", "pasang"),
    ("cek", "check", "periksa"),
    ("blokir", "kunci", "lock", "block"),
    ("aktif", "activ", "aktivasi"),
    ("sertifikat", "certif"),
    ("nilai", "grade", "score"),
    ("uji", "exam", "test"),
    ("bantu", "assist", "aid"),
    ("jaring", "network", "internet", "koneksi", "connect"),
)
SYNONYMS: dict[str, tuple[str, ...]] = {
    stem: tuple(s for s in group if s != stem) for group in _SYNONYM_GROUPS for stem in group
}
