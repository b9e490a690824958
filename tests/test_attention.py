"""Admin notices stay visible in `status` and /healthz until their cause is resolved."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.conftest import T0, World, home_visit, tick
from tests.daemon_process import channel_block
from tests.scripted import OK, PERMANENT, Script
from tests.web_world import enable_web
from visitwatch.daemon import cli, status
from visitwatch.daemon.heartbeat import META_ERROR, META_FAILING_SINCE
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import ts
from visitwatch.daemon.web.app import create_app

DEADLINE = T0 + timedelta(hours=2)
LATER = DEADLINE + timedelta(hours=1)
ADMIN_OUTBOX = channel_block("outbox", "outbox", path="outbox.jsonl", kinds=["admin"])


@pytest.fixture(autouse=True)
def _world_clock(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """`visitwatch status` reads the world's clock, as the other checks here do."""
    monkeypatch.setattr(status, "Service", lambda config: Service(config, clock=world.clock))


def _status(world: World, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    config = str(world.config_file)
    assert cli.main(["--config", config, "status", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{\n") :])  # after any log lines
    assert cli.main(["--config", config, "status"]) == 0
    return data, capsys.readouterr().out


def test_a_dead_letter_a_failing_channel_and_the_heartbeat_need_attention_until_resolved(
    world: World, scripted_channels: dict[str, Script], capsys: pytest.CaptureFixture[str]
) -> None:
    """Shown in status (text and JSON) and /healthz (still 200, no error text) while they
    last; gone once the visit is resolved, the channel delivers and the monitor answers."""
    enable_web(world)
    world.channels = channel_block("sms", "scripted") + ADMIN_OUTBOX
    world.write_calendar(
        home_visit(), home_visit("visit-2", start=LATER - timedelta(hours=1), end=LATER)
    )
    service = world.service()
    scripted_channels.setdefault("sms", Script()).set(PERMANENT)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)  # Asha's reminder is refused: sms fails, the reminder reached nobody
    service.store.set_meta(META_FAILING_SINCE, ts(DEADLINE) or "")
    service.store.set_meta(META_ERROR, "http://hc.example/...: connection refused")

    data, shown = _status(world, capsys)
    topics = {(a["topic"], a["name"]) for a in data["attention"]}
    assert {("channel", "sms"), ("heartbeat", "heartbeat_url")} <= topics
    [dead] = [a for a in data["attention"] if a["topic"] == "undelivered"]
    assert "reminder notification for visit" in dead["problem"] and "via sms" in dead["problem"]
    assert "NEEDS ATTENTION (3)" in shown
    assert "channel sms: is not delivering" in shown and "last error: sms: recipient" in shown

    service.activity.started = service.activity.last_dispatch = world.clock.now()
    client = create_app(service.web_context()).test_client()
    answer = client.get("/healthz")
    assert answer.status_code == 200  # one failing channel is not a 503 (ops.py)
    public = answer.get_json()["attention"]
    assert {(a["topic"], a["name"]) for a in public} == topics
    assert all("detail" not in a for a in public)
    assert "recipient rejected" not in json.dumps(public)

    scripted_channels["sms"].set(OK)
    visit = service.store.one("SELECT id FROM visits WHERE uid = 'visit-1'")
    assert visit is not None
    service.watcher.actions.check_in(visit["id"], by="asha.khan@example.org")
    world.at(LATER + timedelta(seconds=5))
    tick(service)  # visit-2's reminder goes out on sms: it delivers again
    service.store.set_meta(META_FAILING_SINCE, "")
    data, shown = _status(world, capsys)
    assert data["attention"] == []
    assert "NEEDS ATTENTION" not in shown
    assert client.get("/healthz").get_json()["attention"] == []


def test_a_source_not_read_for_three_poll_intervals_needs_attention(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """A calendar nobody has read lately (a daemon that stopped) shows, with the fix."""
    world.write_calendar(home_visit())
    service = world.service()
    tick(service)
    world.at(T0 + timedelta(minutes=16))  # poll_interval 5 min
    data, shown = _status(world, capsys)
    [stale] = data["attention"]
    assert stale["topic"] == "source" and stale["name"] == "team"
    assert stale["problem"].startswith("not read for 16 min")
    assert "visitwatch doctor" in shown
    tick(service)
    assert _status(world, capsys)[0]["attention"] == []
