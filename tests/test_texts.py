"""Mobile numbers in one form, and text messages that fit in two segments with the link whole."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from visitwatch.core import phone, sms
from visitwatch.daemon.config import ConfigError, load_config

LINK = "https://visits.example.org/s/Ab3dEf9hJk2mQ"


@pytest.mark.parametrize(
    "written",
    ["07700 900123", "07700900123", "+44 7700 900123", "0044 7700-900123", "(07700) 900 123"],
)
def test_uk_numbers_as_people_write_them_become_one_e164_form(written: str):
    """However staff write a UK mobile, the stored and compared form is +447700900123."""
    assert phone.e164(written) == "+447700900123"


@pytest.mark.parametrize("written", ["12345", "0770090012", "077009001234567", "call me", ""])
def test_a_number_no_text_can_reach_is_refused_with_a_reason(written: str):
    """Too short, too long or not a number: InvalidNumber, with words for the admin."""
    with pytest.raises(phone.InvalidNumber) as caught:
        phone.e164(written)
    assert str(caught.value)


def test_numbers_read_as_people_write_them():
    """A UK number reads nationally; a foreign one keeps its country code."""
    assert phone.readable("+447700900123") == "07700 900123"
    assert phone.readable("+33612345678") == "+33 6 12 34 56 78"


def test_the_staff_directory_stores_mobiles_in_e164_and_names_a_bad_one(tmp_path: Path):
    """[[staff]] mobiles are normalised when read; an impossible one is a config problem."""
    path = tmp_path / "visitwatch.toml"
    body = """
        [[staff]]
        id = "asha@example.org"
        name = "Asha"
        mobile = "07700 900123"

        [[staff]]
        id = "ben@example.org"
        name = "Ben"
        mobile = "0770 090"
        role = "director"

        [[channels]]
        name = "outbox"
        type = "outbox"
    """
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "staff[1].mobile" in str(caught.value)
    assert "possible mobile number" in str(caught.value)
    path.write_text(textwrap.dedent(body).replace('"0770 090"', '"+44 7700 900456"'))
    staff = load_config(path).directory
    assert staff.get("asha@example.org").mobile == "+447700900123"
    assert [m.id for m in staff.by_mobile("+447700900456")] == ["ben@example.org"]


def test_typography_becomes_gsm7_so_a_text_stays_in_its_cheap_alphabet():
    """Curly quotes, dashes and accents outside GSM-7 would turn a text into UCS-2."""
    assert sms.to_gsm("Zoë O’Neil — “late”…") == 'Zoe O\'Neil - "late"...'
    assert sms.to_gsm("Müller, José, 5€") == "Müller, José, 5€"  # in the alphabet already
    assert sms.to_gsm("王") == "?"


def test_segments_follow_the_gsm_arithmetic():
    """160 septets in one segment, 153 per part after; the euro sign counts twice."""
    assert sms.segments("x" * 160) == 1
    assert sms.segments("x" * 161) == 2
    assert sms.segments("x" * 306) == 2
    assert sms.segments("x" * 307) == 3
    assert sms.segments("€" * 80) == 1
    assert sms.segments("€" * 81) == 2


def test_a_long_alert_is_cut_at_a_word_and_the_link_kept_whole():
    """Whatever the body, the text fits two segments and ends with the whole link."""
    body = "OVERDUE: Zoë O’Neil is 12 min past the expected return from 14 Acacia Avenue. " * 6
    text = sms.fit(body, LINK)
    assert sms.segments(text) <= 2
    assert text.endswith("... " + LINK)
    assert text.startswith("OVERDUE: Zoe O'Neil")
    assert sms.fit("Short news", LINK) == f"Short news {LINK}"
    assert sms.segments(sms.fit("x" * 400, "", limit=1)) == 1
