"""``visitwatch status``: what is watched, what is due, what could not be delivered."""

from __future__ import annotations

import argparse
import http.client
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from visitwatch.core.calendar import TimeWindow
from visitwatch.daemon import channel_health
from visitwatch.daemon.attention import needs_attention
from visitwatch.daemon.config import Config
from visitwatch.daemon.lifecycle import TERMINAL
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import from_ts, ts


def status_data(service: Service, include_all: bool = False) -> dict[str, Any]:
    now = service.clock.now()
    daemon = service.config.daemon
    window = TimeWindow.around(now, daemon.window_past, daemon.window_ahead)
    ended = ", ".join(f"'{state}'" for state in sorted(TERMINAL))
    where = "" if include_all else f" AND state NOT IN ({ended})"
    visits = service.store.query(
        f'SELECT * FROM visits WHERE start < ? AND "end" >= ?{where} ORDER BY start',
        (ts(window.end), ts(window.start)),
    )
    return {
        "now": ts(now),
        "last_sweep_at": service.store.get_meta("last_sweep_at"),
        "attention": [
            a.as_dict()
            for a in needs_attention(service.store, service.config, now, service.source_errors)
        ],
        "visits": [
            {
                "id": v["id"],
                "worker": v["worker_label"],
                "worker_id": v["worker_id"],
                "state": v["state"],
                "start": v["start"],
                "deadline": v["deadline"],
                "subject": "(private)" if v["private"] else v["subject"],
                "kind": v["kind"],
                "findings": [f["rule"] for f in json.loads(v["findings"])],
                "acknowledged_by": v["acknowledged_by"],
                "source": v["source"],
            }
            for v in visits
        ],
        "sources": service.store.query("SELECT * FROM sources ORDER BY name")
        + [{"name": n, "last_error": e} for n, e in service.source_errors.items()],
        "problems": service.store.query("SELECT source, uid, reason, last_seen FROM problems"),
        "channels": [
            s.as_dict()
            for s in channel_health.states(service.store, [c.name for c in service.config.channels])
        ],
        "undelivered": service.store.query(
            "SELECT id, visit_id, kind, channel, recipient_id, status, attempts, last_error,"
            " next_attempt_at FROM notifications WHERE status = 'failed'"
            " OR (status = 'pending' AND attempts > 0) ORDER BY id"
        ),
        "pending": service.store.query(
            "SELECT COUNT(*) AS n FROM notifications WHERE status = 'pending'"
        )[0]["n"],
    }


def cmd_status(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]) -> int:
    service = Service(load(args))
    try:
        data = status_data(service, args.all)
    finally:
        service.close()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    tz = service.config.daemon.timezone

    def local(text: str | None) -> str:
        moment = from_ts(text)
        return fmt_local(moment, tz) if moment else "-"

    print(f"last sweep: {local(data['last_sweep_at'])}")
    if data["attention"]:
        print(f"\nNEEDS ATTENTION ({len(data['attention'])})")
        for a in data["attention"]:
            since = f" (since {local(a['since'])})" if a["since"] else ""
            print(f"  {a['topic']} {a['name']}: {a['problem']}{since}")
            if a["detail"]:
                print(f"    last error: {a['detail']}")
            print(f"    fix: {a['fix']}")
    print(f"\nVISITS ({len(data['visits'])})")
    for v in data["visits"]:
        flags = ", ".join(v["findings"]) or "compliant"
        print(
            f"  {v['id']}  {v['state']:<12} {v['worker'][:22]:<22} "
            f"start {local(v['start'])}  back by {local(v['deadline'])}  [{flags}]"
        )
    print("\nSOURCES")
    for s in data["sources"]:
        health = f"ERROR: {s['last_error']}" if s.get("last_error") else "ok"
        print(f"  {s['name']}: {health}; last success {local(s.get('last_success_at'))}")
        if s.get("incomplete"):
            print(f"    INCOMPLETE: the last {s['incomplete']} reads (nothing removed)")
        if s.get("held_removals"):
            count = len(json.loads(s["held_removals"]))
            confirmed = (
                f"; confirmed by {s['held_confirmed_by']}, applied at the next read"
                if s.get("held_confirmed_at")
                else f"; confirm with `visitwatch sources confirm {s['name']}`"
            )
            print(
                f"    HELD since {local(s.get('held_since'))}: a read would remove {count} of "
                f"{s.get('held_live')} watched visits{confirmed}"
            )
    print("\nCHANNELS")
    for c in data["channels"]:
        print(f"  {_channel_line(c, local)}")
    if data["problems"]:
        print(f"\nUNREADABLE ENTRIES ({len(data['problems'])})")
        for p in data["problems"]:
            print(f"  {p['source']} uid={p['uid'] or '(whole feed)'}: {p['reason']}")
    print(f"\nNOTIFICATIONS: {data['pending']} pending")
    for n in data["undelivered"]:
        print(
            f"  #{n['id']} {n['kind']} via {n['channel']} to {n['recipient_id']}: {n['status']},"
            f" {n['attempts']} attempts, last error: {n['last_error']}"
        )
    return 0


def _channel_line(c: dict[str, Any], local: Callable[[str | None], str]) -> str:
    """One channel's health in a line: ok, or failing since when and why."""
    if c["state"] == channel_health.HEALTHY:
        health = "ok"
    else:
        health = f"FAILING since {local(c['failing_since'])}: {c['last_error'] or 'no answer'}"
        if c["outage_since"]:
            health += f" (admins told {local(c['outage_since'])})"
    counts = f"{c['sent']} sent, {c['failures']} failed"
    if c["recipient_failures"]:
        counts += f", {c['recipient_failures']} refused for one recipient"
    return f"{c['channel']}: {health}; last success {local(c['last_success'])}; {counts}"


# ----------------------------------------------------------------------- check: the pages


def pages_check(service: Service) -> tuple[list[str], int]:
    """``visitwatch check``'s lines about the pages, and how many are failures.

    Says where the pages are served and which address links carry, or that messages carry
    no links while [web] is off. When no daemon runs, it tries the address (a busy port
    would leave the pages down); when one runs, it asks its ``/healthz``.
    """
    config = service.config
    web, base = config.web, config.daemon.public_base_url
    if not web.enabled:
        if base:
            return [
                "--   pages: off ([web] enabled = false): public_base_url is set, but messages "
                "carry no links until [web] enabled = true"
            ], 0
        return [
            "--   pages: off ([web] enabled = false): messages carry no check-in or "
            "acknowledge links; staff check in with `visitwatch checkin` or the Outlook "
            '"Safe" category. To turn them on set [web] enabled = true and [daemon] '
            "public_base_url (README: Pages and links)"
        ], 0
    from visitwatch.daemon.config_types import is_loopback
    from visitwatch.daemon.web.server import PagesUnavailable, bind

    where = f"[{web.listen}]:{web.port}" if ":" in web.listen else f"{web.listen}:{web.port}"
    lines = [
        f"ok   pages: served at http://{where}/ ; links in messages open {base}/v/... and /a/..."
    ]
    warnings = []
    if not is_loopback(web.listen):
        warnings.append(
            f"WARN pages: listening on {web.listen} serves plain http beyond this machine; "
            "listen on 127.0.0.1 behind a TLS proxy (README: Pages and links)"
        )
    if urlsplit(base).scheme != "https" and not is_loopback(urlsplit(base).hostname or ""):
        warnings.append(
            "WARN pages: public_base_url is not https: a link is a credential and would "
            "travel unencrypted; put a TLS proxy in front (README: Pages and links)"
        )
    failures = 0
    if service.lock.acquire():
        service.lock.release()
        try:
            bind(web.listen, web.port).close()
        except PagesUnavailable as err:
            lines.append(f"FAIL pages: {err}")
            failures += 1
    else:
        lines.append(_running_health(web.listen, web.port, service.lock.holder()))
    return lines + warnings, failures


def _running_health(listen: str, port: int, pid: str) -> str:
    host = "127.0.0.1" if listen in ("0.0.0.0", "") else "::1" if listen == "::" else listen
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        answer = connection.getresponse()
        body = json.loads(answer.read() or b"{}")
    except (OSError, ValueError) as err:
        return f"WARN pages: the running daemon (pid {pid}) does not answer /healthz: {err}"
    finally:
        connection.close()
    reasons = "; ".join(body.get("reasons") or []) or "all fresh"
    return f"ok   pages: the running daemon (pid {pid}) answers /healthz {answer.status}: {reasons}"
