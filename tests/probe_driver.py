"""Run one scenario through whichever visitwatch this interpreter imports; print what people see.

    python tests/probe_driver.py FOLDER SCENARIO.json   (run as a script, not with -m, so an
    older checkout's interpreter imports its own visitwatch)

A scenario is a JSON list of steps: {"at": ISO}, {"calendar": ICS text}, {"config": TOML
text}, {"cli": [args]} (the real CLI, its clock fixed at the step's time), {"tick": [steps]}
(sync/sweep/dispatch in a Service), {"sql": statement}. The result (JSON on stdout) holds
every CLI call's exit code and output, then the outbox, visits, audit, checkins and
notifications, for a diff between two checkouts.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import visitwatch.daemon.clock as clock_module
from visitwatch.daemon.cli import main as cli_main
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service

NOW: list[datetime] = []
clock_module.SystemClock.now = lambda self: NOW[0]  # type: ignore[method-assign]

VISIT_COLUMNS = [
    "id",
    "state",
    "step",
    "repeats",
    "deadline",
    "extended_until",
    "next_action_at",
    "checked_in_at",
    "checked_in_by",
    "acknowledged_at",
    "acknowledged_by",
    "help_requested_at",
    "ended_at",
    "prestart_notice_sent",
    "worker_id",
    "worker_known",
    "expected_return",
    "start",
    "end",
]


def run(folder: Path, steps: list[dict[str, Any]]) -> dict[str, Any]:
    config = folder / "visitwatch.toml"
    calls: list[dict[str, Any]] = []
    for step in steps:
        if "at" in step:
            NOW[:] = [datetime.fromisoformat(step["at"])]
        elif "calendar" in step:
            (folder / "calendar.ics").write_text(step["calendar"], encoding="utf-8")
        elif "config" in step:
            config.write_text(step["config"], encoding="utf-8")
        elif "cli" in step:
            calls.append(_cli(["--config", str(config), *step["cli"]]))
        elif "tick" in step:
            service = Service(load_config(config), clock_module.FrozenClock(NOW[0]))
            try:
                for name in step["tick"]:
                    getattr(service, {"sync": "sync_all"}.get(name, name))()
            except Exception as err:
                calls.append({"argv": step["tick"], "rc": f"RAISED {type(err).__name__}: {err}"})
            finally:
                service.close()
        elif "sql" in step:
            with sqlite3.connect(folder / "visitwatch.db") as conn:
                conn.execute(step["sql"])
    return {"calls": calls, **dump(folder)}


def _cli(argv: list[str]) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc: Any = cli_main(argv)
        except SystemExit as exit_:
            rc = exit_.code
        except Exception:
            rc = "TRACEBACK " + traceback.format_exc().splitlines()[-1]
    return {"argv": argv[2:], "rc": rc, "out": out.getvalue(), "err": _errors(err.getvalue())}


def _errors(text: str) -> str:
    """Stderr without log lines (their timestamps and order are not what we compare)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(("visitwatch", "usage")))


def dump(folder: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    outbox = folder / "outbox.jsonl"
    if outbox.exists():
        records = [json.loads(line) for line in outbox.read_text().splitlines() if line]
        result["outbox"] = [
            {k: r.get(k) for k in ("kind", "to", "recipient", "subject", "text", "body")}
            for r in records
        ]
    db = folder / "visitwatch.db"
    if not db.exists():
        return result
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    result["visits"] = [
        {c: r[c] for c in VISIT_COLUMNS}
        for r in conn.execute("SELECT * FROM visits ORDER BY start, id")
    ]
    result["audit"] = [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]
    result["checkins"] = [dict(r) for r in conn.execute("SELECT * FROM checkins ORDER BY id")]
    result["notifications"] = [
        dict(r) | dict.fromkeys(("created", "updated", "next_attempt_at"))
        for r in conn.execute("SELECT * FROM notifications ORDER BY id")
    ]
    return result


if __name__ == "__main__":
    folder, scenario = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps(run(folder, json.loads(scenario.read_text())), indent=1, default=str))
