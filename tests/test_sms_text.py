"""GSM 03.38 / UCS-2 detection, segment limits and splitting of SMS texts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels import registry
from channels.sms.text import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    PART_LIMIT,
    SINGLE_LIMIT,
    encoding_for,
    segment_count,
    split_parts,
    text_length,
)


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Sekolah kami tidak bisa mengakses internet sejak Senin", "gsm7"),
        ("Harga €5 [promo] {a|b} ~^\\", "gsm7"),
        ("Ærø Ñoño ¿Qué? @£$¥", "gsm7"),
        ("¿dónde?", "ucs2"),  # ó is not in the default alphabet (ò is)
        ("Terima kasih ✓", "ucs2"),
        ("ç minúscula", "ucs2"),  # only the capital Ç is in the default alphabet
        ("😀", "ucs2"),
        ("", "gsm7"),
    ],
)
def test_encoding_for(text: str, encoding: str) -> None:
    assert encoding_for(text) == encoding


def test_extension_characters_count_double() -> None:
    assert text_length("€", "gsm7") == 2
    assert text_length("a[b]", "gsm7") == 6
    assert segment_count("€" * 80) == 1  # 160 septets
    assert segment_count("€" * 80 + "a") == 2


def test_single_and_concatenated_limits() -> None:
    assert split_parts("a" * 160) == ["a" * 160]
    parts = split_parts("a" * 161)
    assert [len(p) for p in parts] == [153, 8]
    assert segment_count("✓" * 70) == 1
    assert [len(p) for p in split_parts("✓" * 71)] == [67, 4]
    assert segment_count("") == 1


def test_escape_sequence_is_never_split() -> None:
    # 152 plain septets then '€' (2 septets) must move whole to the next part.
    parts = split_parts("a" * 152 + "€" + "b" * 10)
    assert parts[0] == "a" * 152 and parts[1].startswith("€")


def test_surrogate_pair_is_never_split() -> None:
    parts = split_parts("✓" * 66 + "😀" + "✓" * 10)
    assert parts[0] == "✓" * 66 and parts[1].startswith("😀")
    for part in parts:
        part.encode("utf-16-be")  # a lone surrogate would raise here


gsm_text = st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=700)
any_text = st.text(max_size=400)


@given(st.one_of(gsm_text, any_text))
def test_parts_join_back_and_fit(text: str) -> None:
    parts = split_parts(text)
    assert "".join(parts) == text
    encoding = encoding_for(text)
    limit = SINGLE_LIMIT[encoding] if len(parts) == 1 else PART_LIMIT[encoding]
    for part in parts:
        assert text_length(part, encoding) <= limit
    assert all(parts) or text == ""
    assert segment_count(text) == len(parts)


def test_an_sms_entry_is_an_account_of_its_provider() -> None:
    def account(entry: dict[str, str]) -> object:
        adapter = registry.of_entry("sms", entry)
        assert adapter is not None, entry
        return adapter.account(entry)

    kannel = account(
        {
            "name": "k", "provider": "kannel", "sender": "500005",
            "sendsms_url": "http://127.0.0.1:13013/cgi-bin/sendsms",
            "username": "u", "password": "p", "inbound_secret": "0123456789abcdefXYZ",
        }
    )  # fmt: skip
    assert type(kannel).__name__ == "KannelAccount" and kannel.sender == "500005"  # type: ignore[attr-defined]
    twilio = account(
        {
            "name": "t", "provider": "twilio", "sender": "+15005550006",
            "account_sid": "AC123", "auth_token": "tok",
        }
    )  # fmt: skip
    assert type(twilio).__name__ == "TwilioAccount" and twilio.api_url == "https://api.twilio.com"  # type: ignore[attr-defined]
    assert registry.of_entry("sms", {"name": "x", "provider": "carrier-pigeon"}) is None
