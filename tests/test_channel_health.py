"""Channel health: one admin notice per outage, one when it ends, never one per failed alert."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import ClassVar

import pytest

from tests.conftest import T0, World, home_visit, many_visits, tick
from tests.daemon_process import channel_block
from tests.scripted import OK, PERMANENT, TEMPORARY, Script
from tests.web_world import enable_web
from visitwatch.connectors import registry
from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message
from visitwatch.daemon import cli
from visitwatch.daemon.channel_health import states
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import ts
from visitwatch.daemon.web.app import create_app

DEADLINE = T0 + timedelta(hours=2)
ADMIN_OUTBOX = channel_block("outbox", "outbox", path="outbox.jsonl", kinds=["admin"])
DOWN = "'sms' is not delivering"
BACK = "'sms' is delivering again"


def _notices(world: World, words: str) -> list[dict]:
    return [m for m in world.messages("admin") if words in m["subject"]]


def _sms(world: World, *visits: str, fallback: bool = True) -> Service:
    """Asha's visits alerted over "sms" (fallback: the outbox); admin notices in the outbox."""
    options = {"fallback": "outbox"} if fallback else {}
    world.channels = channel_block("sms", "scripted", **options) + ADMIN_OUTBOX
    world.write_calendar(*(visits or [home_visit()]))
    return world.service()


def _health(service: Service, name: str = "sms") -> dict:
    [state] = [s for s in states(service.store, [name])]
    return state.as_dict()


def test_a_channel_refusing_20_alerts_for_good_gives_one_notice_and_one_recovered(
    world: World, scripted_channels: dict[str, Script]
) -> None:
    """A revoked key: one outage notice, every alert reaches its person by the fallback, one
    recovered notice when it works again; no notice per failed alert."""
    service = _sms(world, *many_visits(20))
    scripted_channels.setdefault("sms", Script()).set(PERMANENT)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)  # 20 reminders refused
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)  # 20 overrun alerts refused
    tick(service)
    reached = {(m["visit_id"], m["kind"], m["recipient"]["id"]) for m in world.messages()}
    for row in service.store.query("SELECT * FROM notifications WHERE channel = 'sms'"):
        if row["kind"] != "admin":
            assert (row["visit_id"], row["kind"], row["recipient_id"]) in reached
    assert len({m["visit_id"] for m in world.messages("reminder")}) == 20
    assert len({m["visit_id"] for m in world.messages("overrun")}) == 20
    [notice] = _notices(world, DOWN)
    assert "Failing since: Mon 23 Nov 14:00 (GMT)" in notice["text"]
    assert "recipient rejected (scripted)" in notice["text"]  # the last error
    assert "What to do" in notice["text"] and "'outbox'" in notice["text"]
    assert len(world.messages("admin")) == 1  # nothing per alert
    assert _health(service)["state"] == "failing"

    scripted_channels["sms"].set(OK)
    world.at(DEADLINE + timedelta(minutes=46))  # the directors' rung goes on sms
    tick(service)
    tick(service)
    assert len(_notices(world, BACK)) == 1 and len(_notices(world, DOWN)) == 1
    assert len(world.messages("admin")) == 2
    health = _health(service)
    assert health["state"] == "healthy" and health["failing_since"] is None
    assert health["failures"] == 40 and health["sent"] >= 1


def test_a_blip_shorter_than_the_delivery_deadline_tells_nobody(
    world: World, scripted_channels: dict[str, Script]
) -> None:
    """A provider down for 30 s: failing meanwhile, healthy after, no admin notice at all."""
    service = _sms(world)
    scripted_channels.setdefault("sms", Script()).set(TEMPORARY)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)
    assert _health(service)["state"] == "failing"
    assert _health(service)["last_error"] == "sms: connection refused (scripted)"
    scripted_channels["sms"].set(OK)
    world.clock.advance(timedelta(seconds=30))
    tick(service)
    assert [m.kind for m in scripted_channels["sms"].accepted] == ["reminder"]
    assert world.messages("admin") == []
    assert _health(service)["state"] == "healthy"


class RefusesAsha(Channel):
    """Delivers to everyone but Asha Khan, whose number the provider calls invalid."""

    type_name: ClassVar[str] = "refuses_asha"
    accepted: ClassVar[list[Message]] = []

    def send(self, message: Message) -> None:
        if message.recipient.id == "asha.khan@example.org":
            raise ConnectorError("the number is not a valid mobile", permanent=True,
                                 recipient_fault=True)  # fmt: skip
        self.accepted.append(message)


def test_a_failure_about_one_recipient_leaves_the_channel_healthy(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid number: the channel stays healthy, no outage; that person is reported."""
    monkeypatch.setitem(registry.CHANNELS, "refuses_asha", f"{__name__}:RefusesAsha")
    world.channels = channel_block("sms", "refuses_asha") + ADMIN_OUTBOX
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    tick(service)
    assert [m.kind for m in RefusesAsha.accepted] == ["overrun"]  # Maria Jones got hers
    assert _notices(world, DOWN) == []
    [notice] = _notices(world, "a reminder alert was not delivered")
    assert "Asha Khan" in notice["text"] and "not a valid mobile" in notice["text"]
    health = _health(service)
    assert health["state"] == "healthy" and health["recipient_failures"] == 1


def test_alerts_that_reached_nobody_are_named_in_one_notice_not_one_each(
    world: World, scripted_channels: dict[str, Script]
) -> None:
    """No fallback: the outage notice, then one notice naming every alert that reached nobody."""
    service = _sms(world, *many_visits(5), fallback=False)
    scripted_channels.setdefault("sms", Script()).set(PERMANENT)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)
    tick(service)
    tick(service)
    assert len(_notices(world, DOWN)) == 1
    [named] = _notices(world, "reached nobody")
    assert "5 reminder alerts on 'sms'" in named["subject"]
    failed = service.store.query("SELECT id FROM notifications WHERE status = 'failed'")
    assert len(failed) == 5
    for row in failed:
        assert f"#{row['id']} reminder" in named["text"]
    assert len(world.messages("admin")) == 2


def test_a_restart_mid_outage_does_not_announce_it_again(
    world: World, scripted_channels: dict[str, Script]
) -> None:
    """The outage is in the record: a new process neither re-announces nor forgets it."""
    service = _sms(world)
    scripted_channels.setdefault("sms", Script()).set(PERMANENT)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)
    service.close()
    service = world.service()
    assert _health(service)["outage_since"] is not None
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    tick(service)
    assert len(_notices(world, DOWN)) == 1
    assert len(world.messages("overrun")) == 1  # by the fallback
    scripted_channels["sms"].set(OK)
    world.at(DEADLINE + timedelta(minutes=46))
    tick(service)
    service.close()
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=61))
    tick(service)
    assert len(_notices(world, BACK)) == 1 and len(_notices(world, DOWN)) == 1


def test_status_and_healthz_show_each_channel(
    world: World, scripted_channels: dict[str, Script], capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing channel shows in `status`, `status --json`, /healthz (still 200) and
    /metrics; /healthz is 503 only once no channel can deliver."""
    enable_web(world)
    service = _sms(world)
    scripted_channels.setdefault("sms", Script()).set(PERMANENT)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)
    config = str(world.config_file)
    assert cli.main(["--config", config, "status", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{\n") :])  # after any log lines
    by_name = {c["channel"]: c for c in data["channels"]}
    assert by_name["sms"]["state"] == "failing" and by_name["outbox"]["state"] == "healthy"
    assert by_name["sms"]["last_error"] == "sms: recipient rejected (scripted)"
    assert cli.main(["--config", config, "status"]) == 0
    shown = capsys.readouterr().out
    assert "sms: FAILING since Mon 23 Nov 14:00 (GMT): sms: recipient rejected" in shown
    assert "outbox: ok" in shown

    service.activity.started = service.activity.last_dispatch = world.clock.now()
    client = create_app(service.web_context()).test_client()
    answer = client.get("/healthz")
    assert answer.status_code == 200
    channels = answer.get_json()["channels"]
    assert channels["sms"]["state"] == "failing" and channels["outbox"]["state"] == "healthy"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'visitwatch_channel_up{channel="sms"} 0.0' in metrics
    assert 'visitwatch_channel_up{channel="outbox"} 1.0' in metrics

    with service.store.transaction() as conn:  # the outbox's disk fails too
        conn.execute(
            "UPDATE channel_health SET failing_since = '2026-11-23T14:00:05+00:00',"
            " last_error = 'disk full' WHERE channel = 'outbox'"
        )
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert "channels: none can deliver (sms, outbox failing)" in answer.get_json()["reasons"]


def test_a_recovered_channel_with_a_late_row_in_backoff_does_not_spin_the_delivery_loop(
    world: World, scripted_channels: dict[str, Script]
) -> None:
    """Healthy again for the whole hold, but a late row waits for its retry: the delivery
    loop comes back at that retry, not at once again and again (found by a probe)."""
    service = _sms(world)
    scripted_channels.setdefault("sms", Script()).set(TEMPORARY)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)  # the reminder fails for now: pending, with a retry later
    world.at(DEADLINE + timedelta(minutes=20))
    tick(service)  # still failing past the delivery deadline: the outage opens
    assert len(_notices(world, DOWN)) == 1
    later = service.clock.now() + timedelta(hours=1)
    with service.store.transaction() as conn:  # it then delivered something else, long ago
        conn.execute(
            "UPDATE channel_health SET last_success = ?, last_error_at = ? WHERE channel = 'sms'",
            (ts(service.clock.now() + timedelta(seconds=1)), ts(service.clock.now())),
        )
        conn.execute(
            "UPDATE notifications SET next_attempt_at = ? WHERE channel = 'sms'"
            " AND status = 'pending'",
            (ts(later),),
        )
    restarted = world.service()
    world.at(service.clock.now() + timedelta(minutes=30))  # past the recovery hold
    now = restarted.clock.now()
    restarted.dispatch()
    assert len(_notices(world, BACK)) == 0  # a row is still late: not recovered yet
    due = restarted.dispatcher.next_due(after=now)
    assert due is not None and due > now, f"the loop would run again at once ({due})"
