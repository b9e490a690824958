"""A Graph scenario (write-back, directory, Outlook mail) through whichever visitwatch runs it.

python tests/probe_graph.py TESTS_ROOT FOLDER   (TESTS_ROOT: the checkout whose
tests/graph_server.py serves Graph). Prints JSON: CLI results, Graph PATCHes, sent mail,
the outbox and the database, for a diff between two checkouts.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, sys.argv[1])
sys.path.insert(1, str(Path(__file__).parent))

import certifi
from probe_driver import NOW, _cli, dump

from tests.graph_server import FakeGraph, graph_event, toml_table

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SHARED, SENDER = "home-visits@contoso.org", "visitwatch@contoso.org"
ASHA, MARIA = "asha.khan@contoso.org", "maria.jones@contoso.org"


def main(folder: Path) -> None:
    at = lambda h, m=0: NOW.__setitem__(slice(None), [T0 + timedelta(hours=h - 12, minutes=m)])  # noqa: E731
    with FakeGraph(roles=("Calendars.ReadWrite", "Mail.Send", "User.Read.All")) as graph:
        graph.add_person(ASHA, "Asha Khan", manager=MARIA, mobile="+44 7700 900123")
        graph.add_person(MARIA, "Maria Jones", mobile="+44 7700 900321")
        graph.add_person(SENDER, "visitwatch")
        os.environ["VW_GRAPH_SECRET"] = graph.client_secret
        os.environ["REQUESTS_CA_BUNDLE"] = certifi.where()
        body = "Risk assessment: complete\nMobile: 07700 900123"
        hour = lambda h, m=0: T0 + timedelta(hours=h - 12, minutes=m)  # noqa: E731
        graph.events[SHARED] = [
            graph_event(f"e{i}", f"Home visit {i}", hour(s), hour(e), body=body,
                        location="14 Brook Street, Preston", attendees=[ASHA])
            for i, (s, e) in enumerate([(13, 14), (13, 14), (14, 15), (13, 13.5)], 1)
        ]  # fmt: skip
        graph.events[SHARED][3] = graph_event(
            "e4", "Home visit 4", hour(13), hour(13, 30), body="", attendees=[ASHA]
        )
        config = folder / "visitwatch.toml"
        config.write_text(
            '[daemon]\ndatabase = "visitwatch.db"\n\n'
            '[[staff]]\nid = "sam.webster@contoso.org"\nname = "Sam Webster"\nrole = "director"\n\n'
            + toml_table("sources", {"name": "hv", "type": "graph", "mailboxes": [SHARED],
                                     "shared": True, "directory": True, "write_back": True,
                                     **graph.config_table("VW_GRAPH_SECRET")})
            + toml_table("channels", {"name": "outlook", "type": "graph_mail", "sender": SENDER,
                                      **graph.config_table("VW_GRAPH_SECRET")})
            + toml_table("channels", {"name": "outbox", "type": "outbox"})
            + '\n[policy]\npreset = "pan-lancashire"\n',
            encoding="utf-8",
        )  # fmt: skip
        calls = []
        step = lambda *argv: calls.append(_cli(["--config", str(config), *argv]))  # noqa: E731
        at(12)
        step("sync")
        step("check")
        at(13, 20)
        step("sync")
        ids = {r["uid"]: r["id"] for r in _visits(folder)}
        first = sorted(ids.values())
        step("checkin", ids[_uid(graph, "e1")])
        step("help", ids[_uid(graph, "e3")], "--by", "Asha Khan")
        step("sync")
        at(14, 1)
        step("sync")
        at(14, 16)
        step("sync")
        step("ack", ids[_uid(graph, "e2")], "--by", "Maria Jones")
        step("checkin", ids[_uid(graph, "e3")], "--extend", "45m")
        step("sync")
        at(14, 50)
        step("ack", ids[_uid(graph, "e2")], "--by", "Maria Jones", "--safe")
        step("sync")
        at(16)
        step("sync")
        step("status", "--json", "--all")
        result = {
            "first": first,
            "calls": calls,
            "patches": [repr(p) for p in graph.patches],
            "sent": [
                {
                    "to": [r["emailAddress"]["address"] for r in m["message"]["toRecipients"]],
                    "subject": m["message"]["subject"],
                    "importance": m["message"].get("importance"),
                }
                for m in graph.sent
            ],
            "requests": [f"{r.method} {r.path}" for r in graph.requests],
            **dump(folder),
        }
    print(json.dumps(result, indent=1, default=str).replace(str(folder), "FOLDER"))


def _uid(graph: FakeGraph, event_id: str) -> str:
    return next(e["iCalUId"] for e in graph.events[SHARED] if e["id"] == event_id)


def _visits(folder: Path) -> list[dict[str, Any]]:
    import sqlite3

    conn = sqlite3.connect(folder / "visitwatch.db")
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT id, uid FROM visits")]


if __name__ == "__main__":
    main(Path(sys.argv[2]))
