"""The canonical message: identities per channel, NUL characters removed, e-mail flags."""

from __future__ import annotations

from channels.types import RawInbound
from normalizer.canonical import canonicalize


def test_nul_characters_are_removed_and_noted() -> None:
    raw = RawInbound(channel="telegram", account="bot", external_id="1:2", sender="42",
                     sender_name="Bu\x00di", body_text="inter\x00net mati", subject=None)  # fmt: skip
    message = canonicalize(raw)
    assert message.raw.body_text == "internet mati"
    assert message.raw.sender_name == "Budi"
    assert message.raw.problems == ["NUL characters removed"]
    assert raw.body_text == "inter\x00net mati"  # the input is left as it was


def test_identities_per_channel() -> None:
    sms = canonicalize(
        RawInbound(channel="sms", account="k", external_id="1", sender="0812-3456-7890")
    )
    assert (sms.identity.kind, sms.identity.value) == ("phone", "+6281234567890")
    mail = canonicalize(
        RawInbound(channel="email", account="h", external_id="<a@b>", sender="Budi@Example.ORG")
    )
    assert (mail.identity.kind, mail.identity.value) == ("email", "budi@example.org")
    fax = canonicalize(RawInbound(channel="fax", account="f", external_id="x", sender="gw@fax.example.net",
                                  meta={"fax_number": "021-7418780"}))  # fmt: skip
    assert (fax.identity.kind, fax.identity.value) == ("fax", "+62217418780")
    unknown_fax = canonicalize(
        RawInbound(channel="fax", account="f", external_id="y", sender="gw@fax.example.net")
    )
    assert unknown_fax.identity is None
    shared = canonicalize(RawInbound(channel="telegram", account="b", external_id="1:3", sender="42",
                                     meta={"shared_phone": "+62 812 3456 7890"}))  # fmt: skip
    assert [(i.kind, i.value) for i in shared.extra_identities] == [("phone", "+6281234567890")]


def test_auto_reply_flag_only_for_mail() -> None:
    headers = {"auto-submitted": "auto-replied"}
    mail = canonicalize(RawInbound(channel="email", account="h", external_id="<c@d>", sender="a@b.c",
                                   headers=headers, body_text="Saya cuti"))  # fmt: skip
    assert mail.auto_reply is True
    sms = canonicalize(
        RawInbound(channel="sms", account="k", external_id="2", sender="0812", headers=headers)
    )
    assert sms.auto_reply is False
