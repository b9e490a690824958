"""What every channel promises the dispatcher, as a test class to subclass.

A channel's test module subclasses :class:`ChannelContract` and provides four fixtures:

``make_channel``
    A no-argument factory returning the channel, its settings passed through
    ``validate_options`` and ``settings_problems`` as the config loader does (use
    :func:`build_channel`).
``delivered``
    A no-argument function returning what the far side has received so far, oldest first,
    as :class:`Delivered` (the subject and the text as the receiver sees them): a real
    loopback server, the file, the captured stream, or ``responses`` for Microsoft Graph.
``break_far_side``
    A function ``break_far_side(permanent)`` that makes every later send fail, the way the
    real far side fails: temporarily (a full disk, a 5xx, a closed connection) or for good
    (a refusal no retry can fix). A channel that cannot fail for good sets
    ``fails_permanently = False``.
``secrets``
    The secret values the channel was built with (passwords, keys, tokens): never logged.

Every test below then runs against the channel: each kind is delivered, failures are
classed as temporary or permanent, a recipient the channel cannot reach is a permanent
error naming their id, and logs carry no secrets and (above debug) no personal data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, NotificationKind, Recipient
from visitwatch.core.options import ConnectorContext, validate_options

# Personal data that may reach the far side but never a log above debug. Plain words only:
# HTML channels escape punctuation, and the text must be findable as the receiver sees it.
ZARA = Recipient(
    id="staff-7731", name="Zara Quinn", email="zara.quinn@example.org", mobile="07700 900999"
)
NO_ADDRESS = Recipient(id="staff-8842", name="Yusuf Noor")
PLACE = "9 Elm Row"


@dataclass(frozen=True)
class Delivered:
    """One message as the far side received it."""

    subject: str
    text: str


def contract_message(
    kind: str = NotificationKind.OVERRUN, *, id: int = 42, recipient: Recipient = ZARA
) -> Message:
    return Message(
        id=id,
        kind=str(kind),
        visit_id="visit-5150",
        recipient=recipient,
        channel="contract",
        subject=f"{kind} for the visit to {PLACE}",
        text=f"{recipient.name} has not checked in from {PLACE} ({kind})",
        created=datetime(2026, 11, 23, 14, 15, tzinfo=UTC),
    )


def build_channel(
    cls: type[Channel], table: dict[str, Any], context: ConnectorContext, name: str = "contract"
) -> Any:
    """Validate ``table`` as the config loader does (options, then across them); build it."""
    settings, problems = validate_options(table, cls.options, "channels[0]", context.config_dir)
    assert problems == [], [str(p) for p in problems]
    problems = cls.settings_problems(settings)
    assert problems == [], [str(p) for p in problems]
    return cls(name, settings, context)


class ChannelContract:
    """Subclass it (named ``Test...``) and provide the fixtures the module docstring lists."""

    fails_permanently: ClassVar[bool] = True
    # A text-message channel carries the short form the daemon composed (two segments),
    # or for a row written before there was one its subject, never the e-mail text.
    sends_short_form: ClassVar[bool] = False

    @pytest.fixture
    def secrets(self) -> list[str]:
        return []

    @pytest.fixture
    def channel(self, make_channel: Callable[[], Channel]) -> Iterator[Channel]:
        channel = make_channel()
        yield channel
        channel.close()

    @pytest.mark.parametrize("kind", list(NotificationKind))
    def test_each_kind_arrives_with_its_subject_and_text(
        self,
        channel: Channel,
        delivered: Callable[[], list[Delivered]],
        kind: NotificationKind,
    ) -> None:
        """Every notification kind is accepted and reaches the far side intact."""
        message = contract_message(kind)
        if self.sends_short_form:
            link = "https://vw.example.org/s/Ab3dEf9hJk2m"
            short = replace(message, id=43, short=f"{kind}: no check-in from Zara. Ack: {link}")
            channel.send(message)
            channel.send(short)
            assert [d.text for d in delivered()] == [message.subject, short.short]
            return
        channel.send(message)
        [got] = delivered()
        assert got.subject == message.subject
        assert message.text in got.text

    def test_several_messages_arrive_in_order(
        self, channel: Channel, delivered: Callable[[], list[Delivered]]
    ) -> None:
        """send_many delivers each message once, in order, and reports each as accepted."""
        messages = [contract_message(kind, id=n) for n, kind in enumerate(NotificationKind)]
        assert channel.send_many(messages) == [None] * len(messages)
        assert [d.subject for d in delivered()] == [m.subject for m in messages]

    def test_a_temporary_failure_is_retryable(
        self,
        channel: Channel,
        break_far_side: Callable[[bool], None],
        delivered: Callable[[], list[Delivered]],
    ) -> None:
        """A far side that may recover gives a ConnectorError with permanent=False."""
        break_far_side(False)
        with pytest.raises(ConnectorError) as caught:
            channel.send(contract_message())
        assert caught.value.permanent is False
        assert delivered() == []

    def test_a_permanent_failure_is_not_retried(
        self,
        channel: Channel,
        break_far_side: Callable[[bool], None],
        delivered: Callable[[], list[Delivered]],
    ) -> None:
        """A refusal no retry can fix gives a ConnectorError with permanent=True."""
        if not self.fails_permanently:
            pytest.skip(f"{type(channel).__name__} has no failure a retry cannot fix")
        break_far_side(True)
        with pytest.raises(ConnectorError) as caught:
            channel.send(contract_message())
        assert caught.value.permanent is True
        assert delivered() == []

    def test_a_recipient_without_an_address_is_a_permanent_error_by_id(
        self, channel: Channel, delivered: Callable[[], list[Delivered]]
    ) -> None:
        """No address for the channel: permanent, the person's fault (the channel stays
        healthy), naming the staff id and not the name.

        A channel that needs no address (address_field None) delivers to anyone instead.
        """
        message = contract_message(recipient=NO_ADDRESS)
        if channel.address_field is None:
            channel.send(message)
            assert [d.subject for d in delivered()] == [message.subject]
            return
        with pytest.raises(ConnectorError) as caught:
            channel.send(message)
        assert caught.value.permanent is True
        assert caught.value.recipient_fault is True
        assert NO_ADDRESS.id in str(caught.value)
        assert NO_ADDRESS.name not in str(caught.value)
        assert delivered() == []

    @pytest.mark.parametrize("failure", ["none", "temporary", "permanent"])
    def test_logs_hold_no_secrets_and_no_personal_data_above_debug(
        self,
        make_channel: Callable[[], Channel],
        break_far_side: Callable[[bool], None],
        secrets: list[str],
        failure: str,
    ) -> None:
        """Sent or failed, no log holds a secret; above debug none holds a name or text."""
        if failure == "permanent" and not self.fails_permanently:
            pytest.skip("no permanent failure to log")
        message = contract_message()
        with capture_logs() as logs:
            channel = make_channel()
            if failure != "none":
                break_far_side(failure == "permanent")
            try:
                channel.send(message)
            except ConnectorError as err:
                # The dispatcher logs the error's text at warning level.
                logs.append({"log_level": "warning", "error": str(err)})
            channel.close()
        everything = json.dumps(logs, default=str)
        for secret in secrets:
            assert secret not in everything
        loud = json.dumps([e for e in logs if e["log_level"] != "debug"], default=str)
        private = (ZARA.name, ZARA.email, ZARA.mobile, PLACE, message.subject, message.text)
        for value in private:
            assert value not in loud, value
