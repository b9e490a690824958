"""What a worker's text asks for: ``SAFE``, ``OK``, ``EXTEND 30``, ``HOME``, ``HELP``.

:func:`parse` ignores case, punctuation and extra words. Help wins over everything (``not
safe`` is help: a worker who says so is not checked in), then ``EXTEND`` (``30``, ``45
mins``, ``1h``, ``1 hour 30``, ``1.5h``; bare: the default), then ``HOME`` (not ``not
home yet``), then ``SAFE``/``OK``. ``heading home`` is ``SAFE``: the visit is over and the
worker on the way, never "safe at home", which would close a visit with a journey after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Command(StrEnum):
    SAFE = "safe"
    EXTEND = "extend"
    HOME = "home"
    HELP = "help"
    OPT_OUT = "opt_out"  # a word the provider takes as "stop texting me" (see below)
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Parsed:
    command: Command
    minutes: int | None = None  # EXTEND: as asked (None: unreadable or bare)


# Twilio's default opt-out keywords (Advanced Opt-Out): a text that is exactly one of these
# makes Twilio block every later text to the sender from that number, alerts included,
# until they text START. visitwatch cannot stop that; it makes sure the admins hear of it.
OPT_OUT_WORDS = frozenset(
    {"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "revoke", "optout"}
)
_HELP = re.compile(r"\b(help|sos|unsafe)\b|\bnot\s+(safe|ok|okay)\b")
_EXTEND = re.compile(r"\bextend\w*\b(?P<rest>.*)", re.S)
_TRAVEL_HOME = re.compile(
    r"\b(heading|going|way|leaving|driving|walking|travelling|traveling|off)\s+(\w+\s+)?home\b"
)
_NOT_HOME = re.compile(r"\bnot\s+(\w+\s+)?home\b")
_HOME = re.compile(r"\bhome\b")
_SAFE = re.compile(r"\b(safe|ok|okay)\b")
_DURATION = re.compile(
    r"(?P<n>\d{1,4}(?:[.,]\d{1,2})?)\s*(?P<unit>hours?|hrs?|h|minutes?|mins?|m)?"
    r"(?:\s*(?P<extra>\d{1,2})\s*(?:minutes?|mins?|m)?)?(?![\w.])"
)


def parse(body: str) -> Parsed:
    """The command in a text (see the module's note for the order)."""
    text = re.sub(r"[^\w.,:\s]", " ", body.lower().replace("o.k.", "ok"))
    text = re.sub(r"\s+", " ", text)
    if text.strip(" .,:") in OPT_OUT_WORDS:
        return Parsed(Command.OPT_OUT)
    if _HELP.search(text):
        return Parsed(Command.HELP)
    extend = _EXTEND.search(text)
    if extend:
        return Parsed(Command.EXTEND, _minutes(extend.group("rest")))
    if _TRAVEL_HOME.search(text):
        return Parsed(Command.SAFE)
    if _HOME.search(_NOT_HOME.sub(" ", text)):
        return Parsed(Command.HOME)
    if _SAFE.search(text):
        return Parsed(Command.SAFE)
    return Parsed(Command.UNKNOWN)


def _minutes(rest: str) -> int | None:
    """``30``, ``30m``, ``45 mins``, ``1h``, ``1 hour 30``, ``1.5h``; None: bare (30)."""
    found = _DURATION.search(rest)
    if not found:
        return None
    amount = float(found.group("n").replace(",", "."))
    if (found.group("unit") or "m").startswith("h"):
        return round(amount * 60) + int(found.group("extra") or 0)
    return round(amount)
