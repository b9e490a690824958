"""Sends the record could not say were made (a full disk), kept in memory until it can.

When the record itself cannot be written, what a lane sent is remembered here and written
when the disk frees; :meth:`UnrecordedSends.send` delivers alerts that could not even be
queued straight from memory. Either way the row that catches up later is marked sent, never
sent a second time.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.core.notification import Message
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.episode import Episode

log = structlog.get_logger(__name__)


class UnrecordedSends:
    """What went out while the record could not be written, by row id or notification key."""

    def __init__(
        self,
        channels: Mapping[str, Channel],
        configs: Mapping[str, ConnectorConfig],
        clock: Clock,
    ) -> None:
        self.channels = channels
        self.configs = configs
        self.clock = clock
        # Sent, but the record could not say so yet (disk full): row id -> when.
        self._sent: dict[int, datetime] = {}
        # Sent from memory (never queued: the record could not be written): key -> when.
        self._from_memory: dict[str, datetime] = {}
        self._from_memory_busy: set[str] = set()
        self._lock = threading.Lock()
        self._broken = Episode(log, "record_unwritable", "record_writable_again")

    def send(self, items: Iterable[tuple[str, Message]], *, local_ok: bool = False) -> int:
        """Deliver messages the record could not queue, straight from memory.

        Used when the database cannot be written (a full disk) or delivery has stalled.
        ``items`` pairs each message with the notification key it would have had, less the
        channel ("" for none). Each goes to every channel that can take it and needs no
        local write (unless ``local_ok``), on a thread of its own; a key already sent (or
        being sent) is not sent again, and when the record catches up, the row with that
        key is marked sent instead of going out twice. Returns how many sends started.
        """
        handed = 0
        for prefix, message in items:
            for name, channel in self.channels.items():
                if channel.writes_locally and not local_ok:
                    continue
                config = self.configs.get(name)
                if (
                    config is not None
                    and config.kinds is not None
                    and message.kind not in config.kinds
                ):
                    continue
                field_name = channel.address_field
                if field_name and not getattr(message.recipient, field_name, ""):
                    continue
                key = f"{prefix}|{name}" if prefix else ""
                with self._lock:
                    if key and (key in self._from_memory or key in self._from_memory_busy):
                        continue
                    if key:
                        self._from_memory_busy.add(key)
                threading.Thread(
                    target=self._send_one,
                    args=(channel, replace(message, channel=name), key),
                    name=f"unrecorded:{name}",
                    daemon=True,
                ).start()
                handed += 1
        return handed

    def _send_one(self, channel: Channel, message: Message, key: str) -> None:
        try:
            channel.send(message)
        except Exception as err:
            log.error(
                "notification_unrecorded_failed",
                kind=message.kind,
                channel=channel.name,
                visit_id=message.visit_id,
                error=str(err),
            )
        else:
            if key:
                with self._lock:
                    self._from_memory[key] = self.clock.now()
            log.warning(
                "notification_sent_unrecorded",
                kind=message.kind,
                channel=channel.name,
                visit_id=message.visit_id,
            )
        finally:
            with self._lock:
                self._from_memory_busy.discard(key)

    def sent_at(self, row: dict[str, Any]) -> datetime | None:
        """When ``row`` went out unrecorded (by a lane, or from memory by its key), if it did."""
        with self._lock:
            return self._sent.get(row["id"]) or self._from_memory.get(row["key"])

    def recorded(self, row: dict[str, Any]) -> None:
        """The record now says ``row`` was sent: forget it."""
        with self._lock:
            self._sent.pop(row["id"], None)
            self._from_memory.pop(row["key"], None)

    def record_failed(
        self,
        rows: list[dict[str, Any]],
        outcomes: list[BaseException | None],
        now: datetime,
        err: sqlite3.Error,
        *,
        sent: bool = True,
    ) -> None:
        """The results for ``rows`` could not be written: remember which were sent."""
        if sent:
            with self._lock:
                for row, outcome in zip(rows, outcomes, strict=True):
                    if outcome is None:
                        self._sent[row["id"]] = now
        self._broken.begin(error=str(err), waiting=len(rows))

    def record_works(self) -> None:
        """A write went through: the episode of an unwritable record (if any) is over."""
        self._broken.end()
