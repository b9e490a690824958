"""Problems with visitwatch itself reach a human: a failing calendar, an undelivered alert."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from tests.conftest import T0, World, home_visit, tick
from tests.daemon_process import OUTBOX_CHANNEL, channel_block, smtp_channel
from tests.mailserver import Recorder

DEADLINE = T0 + timedelta(hours=2)


def admin_notices(world: World) -> list[dict]:
    return world.messages("admin")


def test_failing_calendar_is_reported_to_an_admin_once_per_outage(world: World):
    """After two failed reads the director (no admin on staff) hears once; again next outage."""
    world.write_calendar(home_visit(start=T0 + timedelta(hours=5), end=T0 + timedelta(hours=6)))
    service = world.service()
    tick(service)
    world.calendar.rename(world.folder / "moved.ics")
    world.clock.advance(timedelta(minutes=5))
    tick(service)
    assert admin_notices(world) == []
    for _ in range(3):
        world.clock.advance(timedelta(minutes=5))
        tick(service)
    [notice] = admin_notices(world)
    assert notice["recipient"]["id"] == "sam.webster@example.org"
    assert "'team'" in notice["subject"] and "calendar.ics" in notice["text"]

    (world.folder / "moved.ics").rename(world.calendar)  # fixed ...
    world.clock.advance(timedelta(minutes=5))
    tick(service)
    world.calendar.unlink()  # ... and broken again: a new outage, a new notice
    for _ in range(2):
        world.clock.advance(timedelta(minutes=5))
        tick(service)
    assert len(admin_notices(world)) == 2


def test_undeliverable_alert_is_reported_on_another_channel(
    world: World, smtp_server: Callable[..., tuple[Recorder, int]]
):
    """A manager alert the mail server refuses for good is reported to an admin via the outbox."""
    recorder, port = smtp_server()
    recorder.data_reply = "550 5.1.1 mailbox unavailable"
    alerts = ["reminder", "overrun", "escalation", "all_clear"]
    world.channels = smtp_channel(port, kinds=alerts) + channel_block(
        "outbox", "outbox", path="outbox.jsonl", kinds=["admin"]
    )
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)  # the alert fails permanently in this pass ...
    tick(service)  # ... and the health check after the next sweep reports it
    notices = admin_notices(world)
    assert {n["recipient"]["id"] for n in notices} == {"sam.webster@example.org"}
    overrun = [n for n in notices if "overrun" in n["subject"]]
    assert overrun and "Maria Jones" in overrun[0]["text"] and "550" in overrun[0]["text"]
    tick(service)
    assert len(admin_notices(world)) == len(notices)  # once per failed alert


def test_graph_credential_expiry_is_announced_at_30_14_and_7_days(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """secret_expires warns admins at 30, 14 and 7 days, once each, then daily once expired."""
    monkeypatch.setenv("GRAPH_SECRET", "s")
    expires = (T0 + timedelta(days=40)).date()
    world.channels = (
        OUTBOX_CHANNEL
        + f"""
[[channels]]
name = "outlook"
type = "graph_mail"
tenant_id = "contoso"
client_id = "visitwatch"
client_secret = {{ env = "GRAPH_SECRET" }}
sender = "visitwatch@example.org"
secret_expires = "{expires}"
kinds = ["overrun"]
"""
    )
    world.write_calendar()
    service = world.service()
    seen = []
    for day in range(0, 44):
        world.at(T0 + timedelta(days=day))
        service.sweep()
        service.dispatch()
        seen.append(len(admin_notices(world)))
    # Day 10 (30 left), day 26 (14 left), day 33 (7 left), then days 41, 42, 43 (expired).
    changes = [day for day in range(1, 44) if seen[day] != seen[day - 1]]
    assert seen[0] == 0 and changes == [10, 26, 33, 41, 42, 43]
    last = admin_notices(world)[-1]
    assert "has expired" in last["subject"] and "Entra" in last["text"]
