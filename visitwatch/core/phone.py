"""Mobile numbers in one form: E.164 (``+447700900123``), by Google's libphonenumber rules.

Staff write numbers as they say them (``07700 900123``, ``+44 7700 900123``,
``0044 7700-900123``); providers want E.164, and an inbound text names its sender in E.164.
Normalising once, where a number enters (config, Microsoft 365, an inbound text), means
comparing numbers is comparing strings.
"""

from __future__ import annotations

import phonenumbers

DEFAULT_REGION = "GB"  # how a number without a country code is read


class InvalidNumber(ValueError):
    """Not a number a text message can reach; the message says why, for people."""


def e164(number: str, region: str = DEFAULT_REGION) -> str:
    """``number`` in E.164; :class:`InvalidNumber` when it cannot be a valid number."""
    text = number.strip()
    if not text:
        raise InvalidNumber("is empty")
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as err:
        raise InvalidNumber(f"is not a phone number ({_reason(err)})") from None
    # "Possible" (the right length for a mobile in its country), not "valid" (in an
    # allocated range):
    # allocations change faster than the library, and Ofcom's drama range (07700 900xxx),
    # used in examples and tests, is unallocated. A possible number the network refuses is
    # a permanent failure at the provider, reported like any other.
    if not phonenumbers.is_possible_number_for_type(parsed, phonenumbers.PhoneNumberType.MOBILE):
        raise InvalidNumber(
            f"is not a possible mobile number: wrong length for its country (read as {region} "
            "unless it starts with + or 00)"
        )
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def e164_or_none(number: str, region: str = DEFAULT_REGION) -> str | None:
    """``number`` in E.164, or None when it is not a valid number."""
    try:
        return e164(number, region)
    except InvalidNumber:
        return None


def _reason(err: phonenumbers.NumberParseException) -> str:
    reasons = {
        phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
        phonenumbers.NumberParseException.NOT_A_NUMBER: "not a number",
        phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
        phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
        phonenumbers.NumberParseException.TOO_LONG: "too long",
    }
    return reasons.get(err.error_type, "unreadable")


def readable(number: str, region: str = DEFAULT_REGION) -> str:
    """``number`` as people write it: national within ``region`` ("07700 900123"),
    international otherwise ("+33 6 12 34 56 78"); as given when it cannot be read."""
    try:
        parsed = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException:
        return number
    national = parsed.country_code == phonenumbers.country_code_for_region(region)
    style = phonenumbers.PhoneNumberFormat
    return phonenumbers.format_number(parsed, style.NATIONAL if national else style.INTERNATIONAL)
