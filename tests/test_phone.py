"""Phone normalization and sender identities: examples from the help desk and property tests."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from channels.types import Identity
from normalizer.identity import identity_for
from normalizer.phone import looks_like_phone, normalize_phone


@pytest.mark.parametrize(
    ("typed", "e164", "display"),
    [
        ("0812-3456-7890", "+6281234567890", "+62 812-3456-7890"),
        ("+62 812 3456 7890", "+6281234567890", "+62 812-3456-7890"),
        ("62812345678 90", "+6281234567890", "+62 812-3456-7890"),
        ("(021) 7418780", "+62217418780", "+62 21 7418780"),
        ("021-7418780", "+62217418780", "+62 21 7418780"),
        ("6221 7418780", "+62217418780", "+62 21 7418780"),
        ("  0812 3456 7890\n", "+6281234567890", "+62 812-3456-7890"),
        ("(+62) 812.3456.7890", "+6281234567890", "+62 812-3456-7890"),
        ("+62 (0)21 741 8780", "+62217418780", "+62 21 7418780"),
        ("62 0812 3456 7890", "+6281234567890", "+62 812-3456-7890"),
        ("812-3456-7890", "+6281234567890", "+62 812-3456-7890"),
        ("tel:+6281234567890", "+6281234567890", "+62 812-3456-7890"),
        ("+1 650 253 0000", "+16502530000", "+1 650-253-0000"),
        ("+44 20 7946 0958", "+442079460958", "+44 20 7946 0958"),
        ("+60 12-345 6789", "+60123456789", "+60 12-345 6789"),
    ],
)
def test_examples_map_to_one_e164_form(typed: str, e164: str, display: str) -> None:
    assert normalize_phone(typed) == Identity(kind="phone", value=e164, display=display, valid=True)


@pytest.mark.parametrize(
    "typed",
    ["500-005", "1500005", "1500-005", "14045", "112", "110", " 14045 ", "7418780", "0812", "62"],
)
def test_short_codes_and_invalid_numbers_stay_as_typed(typed: str) -> None:
    assert normalize_phone(typed) == Identity(
        kind="phone", value=typed.strip(), display=None, valid=False
    )


@pytest.mark.parametrize("typed", ["TELKOMSEL", "0812+3456", "+", "", "   ", "0812-34x6-7890"])
def test_text_that_is_not_a_number_is_kept(typed: str) -> None:
    identity = normalize_phone(typed)
    assert identity.valid is False
    assert identity.value == typed.strip()


def test_fax_kind_and_bad_kind() -> None:
    assert normalize_phone("021-7418780", kind="fax") == Identity(
        kind="fax", value="+62217418780", display="+62 21 7418780", valid=True
    )
    with pytest.raises(ValueError, match="kind"):
        normalize_phone("021-7418780", kind="email")


def test_other_default_region() -> None:
    assert normalize_phone("012-345 6789", region="MY").value == "+60123456789"
    assert normalize_phone("(650) 253-0000", region="US").value == "+16502530000"


# Valid Indonesian national significant numbers: mobile (8xx…) and fixed lines with area code.
_MOBILE_PREFIXES = ["811", "812", "813", "821", "822", "852", "853", "857", "878", "895", "896"]
_AREA_CODES = ["21", "22", "24", "31", "61", "274", "361", "411", "751"]

mobile_nsn = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from(_MOBILE_PREFIXES),
    st.text("0123456789", min_size=7, max_size=8),
)
fixed_nsn = st.builds(
    lambda area, rest: (area, rest),
    st.sampled_from(_AREA_CODES),
    st.text("0123456789", min_size=7, max_size=8),
)
separators = st.sampled_from(["", " ", "-", ".", " - ", "  "])


@st.composite
def grouped(draw: st.DrawFn, digits: str) -> str:
    """`digits` cut into random groups joined by random separators."""
    cuts = sorted(draw(st.sets(st.integers(1, len(digits) - 1), max_size=4)))
    groups = [digits[a:b] for a, b in zip([0, *cuts], [*cuts, len(digits)], strict=True)]
    out = groups[0]
    for group in groups[1:]:
        out += draw(separators) + group
    return out


@st.composite
def formatted_number(draw: st.DrawFn) -> tuple[str, str]:
    """(a way a person could type the number, its E.164 form)."""
    if draw(st.booleans()):
        nsn = draw(mobile_nsn)
        head, tail = nsn[:3], nsn[3:]
        prefixes = ["0", "62", "+62", "+62 ", "+62-", "(+62) ", "+62 (0)", "62 0", ""]
    else:
        head, tail = draw(fixed_nsn)
        nsn = head + tail
        prefixes = ["0", "62", "+62", "+62 ", "(+62) ", "+62 (0)", "62-"]
    assume(normalize_phone("+62" + nsn).valid)
    prefix = draw(st.sampled_from(prefixes))
    head_text = head
    if prefix in ("0", "") and draw(st.booleans()):
        head_text = f"({prefix}{head})"
        prefix = ""
    typed = (
        draw(st.sampled_from(["", " ", "\t"]))
        + prefix
        + head_text
        + draw(separators)
        + draw(grouped(tail))
        + draw(st.sampled_from(["", " ", "\n"]))
    )
    return typed, "+62" + nsn


@given(formatted_number())
def test_any_formatting_of_a_number_gives_the_same_identity(case: tuple[str, str]) -> None:
    typed, e164 = case
    identity = normalize_phone(typed)
    assert identity.valid, typed
    assert identity.value == e164, typed
    assert identity == normalize_phone(e164)


short_code = st.one_of(
    st.sampled_from(["110", "112", "113", "115", "118", "119", "129", "147", "14045", "108"]),
    st.builds(lambda d: "1500" + d, st.text("0123456789", min_size=3, max_size=3)),
    st.builds(lambda d: "500" + d, st.text("0123456789", min_size=3, max_size=3)),
)


@given(short_code, separators, st.sampled_from(["", " ", "\t "]))
def test_short_codes_are_never_rewritten(code: str, separator: str, padding: str) -> None:
    typed = padding + code[:3] + separator + code[3:] + padding
    identity = normalize_phone(typed)
    assert identity == Identity(kind="phone", value=typed.strip(), display=None, valid=False)


@given(st.text(max_size=30))
def test_result_is_e164_or_the_trimmed_input(text: str) -> None:
    identity = normalize_phone(text)
    if identity.valid:
        assert re.fullmatch(r"\+[1-9]\d{6,14}", identity.value)
        assert identity.display is not None and identity.display.startswith("+")
        # Normalizing a normalized number changes nothing.
        assert normalize_phone(identity.value) == identity
    else:
        assert identity.value == text.strip()
        assert identity.display is None


def test_looks_like_phone() -> None:
    assert looks_like_phone("0812-3456-7890")
    assert looks_like_phone(" +62 (21) 741.8780 ")
    assert looks_like_phone("112")
    assert not looks_like_phone("12")
    assert not looks_like_phone("budi@example.com")
    assert not looks_like_phone("Budi 0812")
    assert not looks_like_phone("")


@given(st.text(alphabet="0123456789 +()-.", max_size=20))
def test_looks_like_phone_counts_digits(text: str) -> None:
    assert looks_like_phone(text) == (sum(ch.isdigit() for ch in text) >= 3)


@given(
    st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=5), st.text(max_size=10)
)
def test_letters_are_never_a_phone(letters: str, rest: str) -> None:
    assert not looks_like_phone(rest + letters + rest)


# --- identity_for -------------------------------------------------------------------------------


def test_identity_for_phone_channels() -> None:
    assert identity_for("sms", "+6281234567890") == normalize_phone("0812-3456-7890")
    assert identity_for("phone", "0812 3456 7890") == normalize_phone("+62 812 3456 7890")
    assert identity_for("fax", "021-7418780") == Identity(
        kind="fax", value="+62217418780", display="+62 21 7418780", valid=True
    )
    # A service number texting us keeps its short code.
    assert identity_for("sms", "500-005") == Identity(kind="phone", value="500-005", valid=False)


def test_identity_for_named_sms_sender_is_kept_but_invalid() -> None:
    assert identity_for("sms", "BANK-ABC") == Identity(kind="phone", value="BANK-ABC", valid=False)


@pytest.mark.parametrize(
    ("channel", "sender"),
    [
        ("sms", ""),
        ("sms", "   "),
        ("sms", "unknown"),
        ("sms", "a sender name far too long for SMS"),
        ("fax", "Anonymous"),
        ("fax", "FAX"),
        ("phone", "private"),
        ("email", "no-at-sign"),
        ("email", "two@@example.com"),
        ("email", "a@b@c"),
        ("email", "budi @example.com"),
        ("email", "@example.com"),
        ("email", "budi@"),
        ("telegram", ""),
        ("facebook", "12 34"),
        ("walk_in", "Pak Budi"),
    ],
)
def test_identity_for_garbage_is_none(channel: str, sender: str) -> None:
    assert identity_for(channel, sender) is None


def test_identity_for_email_is_lower_cased() -> None:
    assert identity_for("email", " Budi.Santoso@Kemenkes.GO.ID ") == Identity(
        kind="email", value="budi.santoso@kemenkes.go.id"
    )
    assert identity_for("email", "<Budi@Example.com>", "Budi") == Identity(
        kind="email", value="budi@example.com"
    )


@pytest.mark.parametrize("channel", ["facebook", "twitter", "telegram"])
def test_identity_for_platforms_keeps_the_user_id(channel: str) -> None:
    assert identity_for(channel, " 1234567890123 ", "  Budi   Santoso ") == Identity(
        kind=channel, value="1234567890123", display="Budi Santoso"
    )
    assert identity_for(channel, "987", None) == Identity(kind=channel, value="987")


def test_identity_for_walk_in_and_unknown_channel() -> None:
    assert identity_for("walk_in", "0812-3456-7890") == normalize_phone("0812-3456-7890")
    assert identity_for("walk_in", "Budi@Example.com") == Identity(
        kind="email", value="budi@example.com"
    )
    with pytest.raises(ValueError, match="unknown channel"):
        identity_for("pigeon", "coo")
