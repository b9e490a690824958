"""Channels for the texts probe (``tests/test_texts_probe.py``): a place that records
what it was given, so a test can see what reached a shared channel."""

from __future__ import annotations

from typing import ClassVar

from visitwatch.connectors.base import Channel
from visitwatch.core.notification import Message


class RecordingPlace(Channel):
    """A broadcast channel (a Teams channel, a webhook receiver) that keeps every post."""

    type_name: ClassVar[str] = "probe_place"
    broadcast: ClassVar[bool] = True
    posts: ClassVar[list[Message]] = []

    def send(self, message: Message) -> None:
        self.posts.append(message)
