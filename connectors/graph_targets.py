"""Which calendars a Graph source reads: configured mailboxes and calendars as targets.

A mailbox with no ``calendars`` setting is read through its default calendar. Named
calendars are looked up by id or by name (case-insensitive) once per mailbox; a name not
found is a reason given back to the caller, never a silent skip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from visitwatch.connectors.graph_client import GraphClient, mailbox_path


@dataclass(frozen=True)
class Target:
    """One calendar to read: a mailbox's default calendar or a named one."""

    mailbox: str
    calendar: str  # as configured; "" for the default calendar
    prefix: str  # "/users/x" or "/users/x/calendars/{id}"

    @property
    def ident(self) -> str:
        return f"{self.mailbox.lower()}|{self.calendar}"


def unique_mailboxes(mailboxes: Iterable[str]) -> list[str]:
    """The mailboxes, trimmed, each once: addresses are case-insensitive."""
    unique: dict[str, str] = {}
    for mailbox in mailboxes:
        if mailbox.strip():
            unique.setdefault(mailbox.strip().lower(), mailbox.strip())
    return list(unique.values())


class CalendarTargets:
    """Resolves mailboxes to the calendars to read, remembering calendar ids."""

    def __init__(self, client: GraphClient, calendars: Iterable[str]) -> None:
        self.client = client
        self.calendars = [c.strip() for c in calendars if c.strip()]
        # Calendar ids by mailbox, resolved once (names rarely change; ids never do).
        self._calendar_ids: dict[str, dict[str, str]] = {}

    def resolve(self, mailbox: str) -> tuple[list[Target], list[str]]:
        """The calendars to read in ``mailbox``, and a reason for each one not found.

        Raises :class:`~visitwatch.core.errors.ConnectorError` when the mailbox's calendars
        cannot be listed.
        """
        base = mailbox_path(mailbox)
        if not self.calendars:
            return [Target(mailbox, "", base)], []
        ids = self._calendar_ids.get(mailbox)
        if ids is None:
            ids = {}
            for page in self.client.pages(
                f"{base}/calendars", params={"$select": "id,name"}, mailbox=mailbox
            ):
                for calendar in page.get("value", []):
                    known, cal_name = str(calendar.get("id", "")), str(calendar.get("name", ""))
                    ids[known] = known
                    ids.setdefault(cal_name.casefold(), known)
        targets: list[Target] = []
        missing: list[str] = []
        for wanted in self.calendars:
            cal_id = ids.get(wanted) or ids.get(wanted.casefold())
            if cal_id is None:
                missing.append(
                    f"mailbox {mailbox}: no calendar named {wanted!r}; check the calendars "
                    "setting against the calendar's name in Outlook"
                )
                continue
            targets.append(Target(mailbox, wanted, f"{base}/calendars/{quote(cal_id, safe='')}"))
        if not missing:
            # Kept only when complete: a calendar created after a typo is noticed next time.
            self._calendar_ids[mailbox] = ids
        return targets, missing
