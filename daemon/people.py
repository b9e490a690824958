"""People Microsoft 365 knows and the config does not: learned into the staff directory."""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from visitwatch.connectors.base import CalendarSource, Person
from visitwatch.core.phone import e164_or_none
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import StaffMember
from visitwatch.daemon.recipients import StaffDirectory

log = structlog.get_logger(__name__)


class PeopleLearner:
    def __init__(self, staff: StaffDirectory, clock: Clock) -> None:
        self.staff = staff
        self.clock = clock
        self._not_in_directory: dict[str, datetime] = {}

    def learn(self, source: CalendarSource, ids: set[str]) -> None:
        """Fill the staff directory from the source's Microsoft 365 tenant, if it offers one.

        Config values always win; people and managers only Graph knows are added. Ids Graph
        does not know (a family's address on an invitation) are not asked about again for a
        day.
        """
        directory = source.people(self.clock.now)
        if directory is None:
            return
        now = self.clock.now()
        recently_missing = {
            i for i, when in self._not_in_directory.items() if now - when < timedelta(days=1)
        }
        ids -= recently_missing
        if not ids:
            return
        try:
            people = dict(directory.lookup(ids))
            managers = {p.manager_id for p in people.values() if p.manager_id}
            people.update(directory.lookup(managers - set(people)))
        except Exception:  # the directory is a convenience; visits are watched without it
            log.exception("directory_lookup_failed", source=source.name)
            return
        for missing in ids - set(people):
            self._not_in_directory[missing] = now
        # One holder, replaced whole: sync, escalation and health all see the new directory.
        self.staff.learn(
            StaffMember(p.id.lower(), p.name, p.email, self._mobile(p, source.name), "worker",
                        (p.manager_id or "").lower())
            for p in people.values()
        )  # fmt: skip
        log.info("directory_updated", source=source.name, people=len(people))

    @staticmethod
    def _mobile(person: Person, source: str) -> str:
        """The person's mobile in E.164; "" (with a warning) when Microsoft 365 holds a
        number that cannot be texted, so routing names them unreachable by text."""
        if not person.mobile:
            return ""
        number = e164_or_none(person.mobile)
        if number is None:
            log.warning("directory_mobile_unusable", source=source, person_id=person.id)
            return ""
        return number
