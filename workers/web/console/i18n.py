"""The console's languages: Bahasa Indonesia (default) and English, from workers/web/console/locales/*.json."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from channels.registry import CHANNEL_KINDS

LANGUAGES: tuple[str, ...] = ("id", "en")
DEFAULT_LANGUAGE = "id"
LANG_COOKIE = "lang"
_LOCALES = Path(__file__).resolve().parent / "locales"


@cache
def catalog(lang: str) -> dict[str, str]:
    """The strings of one language; unknown languages get the default one.

    A channel's name (`channel.<name>`) is its label in `channels.registry` unless the
    locale file translates it, so a new channel needs no line here.
    """
    if lang not in LANGUAGES:
        lang = DEFAULT_LANGUAGE
    strings: dict[str, str] = {f"channel.{k.name}": k.label for k in CHANNEL_KINDS}
    strings.update(json.loads((_LOCALES / f"{lang}.json").read_text(encoding="utf-8")))
    return strings


def language(cookie: str | None) -> str:
    """The language a `lang` cookie asks for, if it is one we have."""
    return cookie if cookie in LANGUAGES else DEFAULT_LANGUAGE


class Translator:
    """`t("key", name=...)`: the string in this language, else in the default, else the key itself.

    Falling back to the key keeps a missing translation visible instead of breaking a page.
    """

    def __init__(self, lang: str):
        self.lang = language(lang)
        self.strings = catalog(self.lang)
        self.fallback = catalog(DEFAULT_LANGUAGE)

    def __call__(self, key: str, **values: object) -> str:
        text = self.strings.get(key) or self.fallback.get(key) or key
        return text.format(**values) if values else text

    def has(self, key: str) -> bool:
        return key in self.strings or key in self.fallback
