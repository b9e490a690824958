"""ICS (iCalendar) feeds read over HTTP(S) or from a local file.

The work is done in four steps, each in its own module, as Home Assistant's remote
calendar splits it: :mod:`~visitwatch.connectors.ics_fetch` reads the bytes (a conditional
GET, or a file), :mod:`~visitwatch.connectors.ics_repair` takes a damaged feed apart,
:mod:`~visitwatch.connectors.ics_parse` parses it and expands each series on its own
(:mod:`~visitwatch.connectors.ics_expand`, :mod:`~visitwatch.connectors.ics_convert`), so
one broken entry becomes an :class:`EventProblem` instead of hiding everybody else's
visits. Every time leaves this package as aware UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.connectors.ics_convert import Feed
from visitwatch.connectors.ics_fetch import FeedReader, describe_url, redact_url
from visitwatch.connectors.ics_parse import FeedParser, Limits
from visitwatch.core.calendar import FetchResult, TimeWindow, utc_window
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option
from visitwatch.core.private_files import file_name_part

__all__ = ["IcsSource", "redact_url"]

log = structlog.get_logger(__name__)


class IcsSource(CalendarSource):
    """Occurrences from one iCalendar feed (Google, Outlook, Nextcloud, a file...)."""

    type_name: ClassVar[str] = "ics"
    options: ClassVar[dict[str, Option]] = {
        "url": Option(
            "url",
            help="http(s) address of the feed; give secret addresses as { env = ... }",
        ),
        "path": Option("path", help="a local .ics file, instead of url"),
        "owner": Option("str", default="", help="staff id the calendar belongs to"),
        "timeout": Option(
            "duration", positive=True, default="30s", help="how long one download may take"
        ),
        "max_bytes": Option(
            "int",
            positive=True,
            default=20_000_000,
            help="a larger feed is refused (the read fails)",
        ),
        "max_line": Option(
            "int",
            positive=True,
            default=1_000_000,
            help="longer lines (unfolded) are left out and reported",
        ),
        "max_entries": Option(
            "int",
            positive=True,
            default=20_000,
            help="entries (VEVENTs) read from one feed; the rest reported",
        ),
        "max_occurrences": Option(
            "int",
            positive=True,
            default=500,
            help="a series with more in the window is reported; its first is watched",
        ),
        "series_budget": Option(
            "duration", positive=True, default="2s", help="time one series may take to expand"
        ),
        "parse_budget": Option(
            "duration",
            positive=True,
            default="60s",
            help="time one read may take to parse and expand",
        ),
    }

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        url, path = settings.get("url"), settings.get("path")
        if (url is None) != (path is None):
            return []
        given = "both were given" if url is not None else "neither was given"
        return [
            ConfigProblem(
                "url",
                f"give exactly one of url or path ({given})",
                'url = "https://..." (or { env = "NAME" }) for a feed, path for a file',
            )
        ]

    @classmethod
    def owner(cls, settings: Mapping[str, Any]) -> str:
        return str(settings.get("owner") or "")

    def __init__(self, name: str, settings: dict[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        # Settings passed the option schema and settings_problems: exactly one of url
        # (an http(s) address, perhaps a Secret) and path is given, every limit positive.
        url, path = self.settings.get("url"), self.settings.get("path")
        fetched, where = describe_url(url) if url is not None else (None, str(path))
        timeout: timedelta = self.settings["timeout"]
        self._reader = FeedReader(
            name,
            url=fetched,
            path=path,
            where=where,
            timeout=timeout.total_seconds(),
            max_bytes=self.settings["max_bytes"],
            user_agent=context.user_agent,
            cache_file=context.state_dir / f"ics-{file_name_part(name)}.json",
        )
        self._parser = FeedParser(
            Feed(name, self.settings["owner"], context.timezone),
            where,
            Limits(
                max_line=self.settings["max_line"],
                max_entries=self.settings["max_entries"],
                max_occurrences=self.settings["max_occurrences"],
                series_budget=self.settings["series_budget"].total_seconds(),
                parse_budget=self.settings["parse_budget"].total_seconds(),
            ),
        )

    def fetch(self, window: TimeWindow, known: str | None = None) -> FetchResult:
        try:
            read = self._reader.read()
            if known is not None and read.fingerprint == known:
                # The caller already holds what this body says: skip parsing altogether.
                return FetchResult(fingerprint=read.fingerprint, unchanged=True)
            if read.body is None:
                # A 304 after a restart for a body the caller no longer holds as processed.
                read = self._reader.read(conditional=False)
            assert read.body is not None  # only a conditional read answers without a body
            result = self._parser.parse(read.body, utc_window(window))
        except ConnectorError:
            raise
        except Exception as err:
            # The contract allows nothing but ConnectorError out of a source; the text of
            # an arbitrary library error may quote the feed, so only its type is shown.
            log.warning("ics.unexpected_error", source=self.name, error=type(err).__name__)
            log.debug("ics.unexpected_error_detail", source=self.name, exc_info=True)
            raise ConnectorError(
                f"source {self.name!r}: unexpected error reading the feed ({type(err).__name__})"
            ) from err
        if read.validators is not None:
            # Only remember a body that parsed: a login page must not become the copy we
            # reuse on the next 304.
            self._reader.remember(read.body, read.validators)
        return result

    def check(self) -> str:
        now = datetime.now(UTC)
        result = self.fetch(TimeWindow.around(now, timedelta(days=1), timedelta(days=14)))
        text = f"feed read: {len(result.events)} entries in window"
        if result.problems:
            text += f", {len(result.problems)} problem(s)"
        if not result.complete:
            text += "; the read was incomplete (damaged, cut off or over a limit)"
        return text

    def close(self) -> None:
        self._reader.close()
