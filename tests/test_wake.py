"""A person's action from the command line reaches the running daemon at once (SIGUSR1)."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import home_visit, ics_calendar
from tests.daemon_process import VISITWATCH, Daemon, poll_until, write_config
from visitwatch.connectors.outbox import read_outbox


def test_a_help_request_from_the_cli_is_delivered_by_the_daemon_without_waiting_a_tick(
    tmp_path: Path,
):
    """With a 30 s sweep interval, `visitwatch help` still reaches the ladder within seconds."""
    now = datetime.now(UTC).replace(microsecond=0)
    (tmp_path / "calendar.ics").write_text(
        ics_calendar(home_visit(start=now - timedelta(minutes=10), end=now + timedelta(hours=1)))
    )
    config = write_config(tmp_path, daemon='sweep_interval = "30s"\npoll_interval = "30s"\n')
    daemon = Daemon(config)
    try:
        daemon.start()
        database = tmp_path / "visitwatch.db"
        assert poll_until(lambda: _visit_id(database) is not None, 15), daemon.log_tail()
        time.sleep(1)  # the daemon is now asleep until its next tick, up to 30 s away
        asked = time.monotonic()
        done = subprocess.run(
            [*VISITWATCH, "--config", str(config), "help", _visit_id(database)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "delivers the notifications now" in done.stdout
        outbox = tmp_path / "outbox.jsonl"
        arrived = poll_until(lambda: any(r["kind"] == "help" for r in read_outbox(outbox)), 20)
        assert arrived, daemon.log_tail()
        assert time.monotonic() - asked < 10  # not the 30 s tick (a hang check)
    finally:
        daemon.close()


def _visit_id(database: Path) -> str | None:
    import sqlite3

    try:
        with sqlite3.connect(database) as conn:
            row = conn.execute("SELECT id FROM visits LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None
