"""/healthz and /metrics: what a monitor and Prometheus see of the running daemon."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import T0, World, home_visit, tick
from tests.web_world import enable_web
from visitwatch.core.errors import VisitwatchError
from visitwatch.daemon.cli import main
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service
from visitwatch.daemon.web.app import create_app


def _client(service: Service) -> FlaskClient:
    return create_app(service.web_context()).test_client()


def _running(world: World) -> Service:
    """A service whose calendar was read, swept and delivered, as if its loops had run now."""
    enable_web(world, port=8470)
    world.write_calendar(home_visit(start=T0 - timedelta(hours=2), end=T0 - timedelta(hours=1)))
    service = world.service()
    service.activity.started = T0
    tick(service)
    service.activity.last_dispatch = T0
    return service


def test_healthz_is_200_while_everything_is_fresh(world: World) -> None:
    """Record readable, sweep and delivery just ran, calendar just read: 200, no reasons."""
    answer = _client(_running(world)).get("/healthz")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["database"] == "ok"
    assert body["sweep_age_seconds"] == 0 and body["dispatch_age_seconds"] == 0
    assert body["sources"]["team"]["age_seconds"] == 0


def test_healthz_names_each_stale_loop_and_source(world: World) -> None:
    """Past 3 x sweep_interval + 30 s without a pass, and 3 x poll_interval without a read: 503."""
    service = _running(world)
    client = _client(service)
    world.at(T0 + timedelta(seconds=59))  # sweep_interval 10 s: limit 60 s
    assert client.get("/healthz").status_code == 200
    world.at(T0 + timedelta(seconds=61))
    answer = client.get("/healthz")
    assert answer.status_code == 503
    reasons = answer.get_json()["reasons"]
    assert any(r.startswith("sweep: no pass for 61 s") for r in reasons)
    assert any(r.startswith("dispatch: no pass for 61 s") for r in reasons)
    assert not any(r.startswith("source") for r in reasons)  # poll_interval 5 min: limit 15
    world.at(T0 + timedelta(minutes=15, seconds=1))
    reasons = client.get("/healthz").get_json()["reasons"]
    assert "source team: last read 901 s ago (limit 900 s)" in reasons


def test_healthz_says_when_the_loops_are_not_running(world: World) -> None:
    """An app with no daemon loops behind it is never reported healthy."""
    service = _running(world)
    service.activity.started = None
    answer = _client(service).get("/healthz")
    assert answer.status_code == 503
    assert "daemon: the sweep and delivery loops are not running" in answer.get_json()["reasons"]


def test_healthz_is_503_when_the_record_cannot_be_read(world: World) -> None:
    """A record that cannot be read is a 503 saying so, not a stack trace."""
    service = _running(world)
    with service.store.transaction() as conn:
        conn.execute("ALTER TABLE sources RENAME TO sources_gone")
    answer = _client(service).get("/healthz")
    assert answer.status_code == 503
    assert answer.get_json()["database"] == "unreadable"
    assert "database: cannot be read" in answer.get_json()["reasons"]


def test_healthz_and_metrics_carry_no_personal_data(world: World) -> None:
    """No name, address, mobile or e-mail in either answer, with an overdue visit alerted."""
    service = _running(world)
    client = _client(service)
    text = client.get("/healthz").get_data(as_text=True) + client.get("/metrics").get_data(
        as_text=True
    )
    for personal in ("Asha", "Khan", "Carter", "Brook Street", "07700", "@example.org"):
        assert personal not in text


def test_metrics_parse_and_count_what_the_record_holds(world: World) -> None:
    """Prometheus reads every family; the counts match the visits and notifications stored."""
    service = _running(world)
    answer = _client(service).get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(answer.get_data(as_text=True))}

    def samples(name: str, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
        return {
            tuple(sorted(s.labels.items())): s.value
            for s in families[name].samples
            if s.name == name + suffix
        }

    stored = service.store.query("SELECT state, COUNT(*) AS n FROM visits GROUP BY state")
    assert samples("visitwatch_visits") == {(("state", r["state"]),): r["n"] for r in stored}
    sent = service.store.query("SELECT kind, channel FROM notifications WHERE status = 'sent'")
    assert sent, "the overdue visit's reminder and alerts were delivered"
    by_kind = samples("visitwatch_notifications")
    for row in sent:
        key = (("channel", row["channel"]), ("kind", row["kind"]), ("status", "sent"))
        assert by_kind[key] >= 1
    assert samples("visitwatch_delivery_latency_seconds", "_count") == {(): len(sent)}
    assert samples("visitwatch_sweep_duration_seconds", "_count") == {(): 1}
    assert samples("visitwatch_sync_duration_seconds", "_count") == {(("source", "team"),): 1}
    assert samples("visitwatch_source_failed_reads") == {(("source", "team"),): 0}
    assert samples("visitwatch_source_consecutive_failures") == {(("source", "team"),): 0}


def test_metrics_count_a_failed_calendar_read(world: World) -> None:
    """A calendar that cannot be read shows as a failed read and a consecutive failure."""
    service = _running(world)
    world.calendar.write_text("not a calendar", encoding="utf-8")
    service.sync_all()
    text = _client(service).get("/metrics").get_data(as_text=True)
    assert 'visitwatch_source_failed_reads{source="team"} 1.0' in text
    assert 'visitwatch_source_consecutive_failures{source="team"} 1.0' in text


def test_config_refuses_pages_without_a_public_base_url(world: World) -> None:
    """[web] enabled without [daemon] public_base_url is a config error naming the key."""
    world.write_calendar()
    world.policy += "\n[web]\nenabled = true\n"
    with pytest.raises(VisitwatchError, match=r"daemon\.public_base_url.*required"):
        load_config(world.write_config())


def test_check_says_where_the_pages_are_served(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """`visitwatch check` prints the listen address and the links' base URL."""
    world.write_calendar()
    port = enable_web(world)
    assert main(["--config", str(world.write_config()), "check"]) == 0
    out = capsys.readouterr().out
    assert f"ok   pages: served at http://127.0.0.1:{port}/" in out
    assert f"links in messages open http://127.0.0.1:{port}/v/" in out


def test_check_says_messages_carry_no_links_while_the_pages_are_off(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without [web], `check` says messages carry no links and how to turn them on."""
    world.write_calendar()
    assert main(["--config", str(world.write_config()), "check"]) == 0
    out = capsys.readouterr().out
    assert "pages: off" in out and "no check-in or acknowledge links" in out
    assert "public_base_url" in out


def test_check_fails_when_the_pages_port_is_taken(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no daemon running, a busy pages port is a FAIL line naming the address."""
    world.write_calendar()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        enable_web(world, port=port)
        assert main(["--config", str(world.write_config()), "check"]) == 1
    assert f"FAIL pages: cannot serve the pages on 127.0.0.1:{port}" in capsys.readouterr().out


def test_check_warns_about_plain_http_links_beyond_this_machine(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """A public_base_url that is plain http to another host is flagged: links are credentials."""
    world.write_calendar()
    world.daemon += 'public_base_url = "http://visitwatch.example.org"\n'
    world.policy += "\n[web]\nenabled = true\n"
    main(["--config", str(world.write_config()), "check"])
    assert "WARN pages: public_base_url is not https" in capsys.readouterr().out
