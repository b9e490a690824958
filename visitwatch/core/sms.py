"""Text messages that fit: the GSM 03.38 alphabet and the segment arithmetic (3GPP TS 23.038).

A text in the GSM-7 alphabet travels 160 characters in one segment, or 153 per segment
when split; one character outside it (a curly quote, an ``ë``) turns the whole message into
UCS-2, 70 or 67 per segment, and a two-segment alert becomes five. So texts are written in
GSM-7: typographic punctuation becomes its plain form, accents outside the alphabet are
dropped (``Zoë`` -> ``Zoe``), and anything left becomes ``?``. Then :func:`fit` keeps the
link whole and shortens the words before it.
"""

from __future__ import annotations

import unicodedata

from visitwatch.core.notification import Message

GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENDED = frozenset("^{}\\[~]|€\f")  # two septets each (escape + character)
SINGLE, MULTI = 160, 153  # septets in one segment; in each part of a split message
SEGMENTS = 2  # what an alert may take, link included

_PLAIN = str.maketrans(
    {
        "‘": "'", "’": "'", "‚": "'", "′": "'",
        "“": '"', "”": '"', "„": '"', "″": '"',
        "–": "-", "—": "-", "‐": "-", "‑": "-", "−": "-",
        "…": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "•": "-", "\t": " ",
    }
)  # fmt: skip


def to_gsm(text: str) -> str:
    """``text`` in the GSM-7 alphabet (see the module's note)."""
    out = []
    for char in text.translate(_PLAIN):
        if char in GSM_BASIC or char in GSM_EXTENDED:
            out.append(char)
            continue
        bare = "".join(
            c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
        )
        out.append(bare if bare and all(c in GSM_BASIC for c in bare) else "?")
    return "".join(out)


def septets(text: str) -> int:
    """Length in GSM-7 septets (``text`` already in the alphabet)."""
    return sum(2 if char in GSM_EXTENDED else 1 for char in text)


def segments(text: str) -> int:
    """How many segments ``text`` (already GSM-7) takes."""
    length = septets(text)
    return 1 if length <= SINGLE else -(-length // MULTI)


def fit(body: str, tail: str = "", limit: int = SEGMENTS) -> str:
    """``body`` then ``tail`` (a link, kept whole) in GSM-7, within ``limit`` segments.

    The body is cut at a word, marked ``...``, when the whole would not fit.
    """
    body, tail = to_gsm(body.strip()), to_gsm(tail.strip())
    joiner = " " if body and tail else ""
    budget = (SINGLE if limit == 1 else MULTI * limit) - septets(tail) - len(joiner)
    if septets(body) > budget:
        room = max(0, budget - 3)
        cut = body
        while septets(cut) > room:
            cut = cut[: max(0, len(cut) - (septets(cut) - room))]
        if " " in cut[1:]:
            cut = cut[: cut.rindex(" ")]
        body = cut.rstrip(" ,.;:-") + "..." if cut else ""
        joiner = " " if body and tail else ""
    return f"{body}{joiner}{tail}"


def text_of(message: Message) -> str:
    """What a text message says for ``message``: the short form the daemon composed, or
    for a row written before there was one, its subject fitted with its link."""
    return message.short or fit(message.subject, message.link)
