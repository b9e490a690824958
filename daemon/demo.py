"""The demo: a generated calendar, a bundled config, short timings, real daemon.

Everything is written to one folder (wiped each run): the config, the calendar, the SQLite
record and the outbox. The calendar is made relative to now so that, within about a minute,
the console shows a compliance notice, a worker's reminder and a manager's overrun alert.

The pages are served on a free loopback port (``public_base_url`` points at it), so the
messages carry working check-in and acknowledge links; the introduction prints the first
two, for a new user to tap through in a browser.
"""

from __future__ import annotations

import shutil
import socket
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

from icalendar import Calendar, Event

from visitwatch.core.errors import VisitwatchError
from visitwatch.daemon.config import load_config
from visitwatch.daemon.entries import visit_id
from visitwatch.daemon.web.links import Links, Signer, load_keys

SOURCE = "demo-calendar"
OVERRUN_UID = "overrun-visit@demo.visitwatch"
SOON_UID = "unassessed-visit@demo.visitwatch"
OVERRUN_WORKER = "asha.khan@demo.visitwatch"
OVERRUN_MANAGER = "maria.jones@demo.visitwatch"
OVERRUN_ENDED = timedelta(seconds=90)  # before the demo starts
TEMPLATE_PORT = 8470  # demo.toml's placeholder port, replaced by a free one
COMPLIANT_UID = "compliant-visit@demo.visitwatch"


def calendar(now: datetime) -> bytes:
    """Three visits, timed from ``now`` (aware UTC)."""
    cal = Calendar()
    cal.add("prodid", "-//visitwatch//demo//EN")
    cal.add("version", "2.0")

    def visit(
        uid: str,
        subject: str,
        start: datetime,
        end: datetime,
        description: str,
        location: str,
        attendee: str,
    ) -> None:
        event = Event()
        event.add("uid", uid)
        event.add("summary", subject)
        event.add("dtstart", start)
        event.add("dtend", end)
        event.add("dtstamp", now)
        event.add("last-modified", now - timedelta(days=1))
        event.add("description", description)
        event.add("location", location)
        event.add("categories", ["Home Visit"])
        event.add("attendee", f"mailto:{attendee}", parameters={"CN": attendee.split("@")[0]})
        cal.add_component(event)

    # Already past its expected return, nobody has checked in.
    visit(
        OVERRUN_UID,
        "Home visit - Carter family",
        now - timedelta(hours=1, minutes=15),
        now - OVERRUN_ENDED,
        "Risk assessment: complete (RA-0113)\nWorker mobile: 07700 900123\n"
        "Purpose: review of child in need plan",
        "14 Brook Street, Preston PR1 3XX",
        OVERRUN_WORKER,
    )
    # Starts soon, and the worker has not completed a risk assessment.
    visit(
        SOON_UID,
        "HV: Patel family",
        now + timedelta(minutes=10),
        now + timedelta(hours=1),
        "Purpose: first visit after referral",
        "22 Hill Road, Chorley PR7 1AA",
        "ben.okafor@demo.visitwatch",
    )
    # Everything the policy asks for; ends in 45 seconds, so its reminder comes soon.
    visit(
        COMPLIANT_UID,
        "Home visit - Nowak family",
        now - timedelta(minutes=40),
        now + timedelta(seconds=45),
        "Risk assessment: complete\nWorker mobile: 07700 900789\n",
        "3 Mill Lane, Leyland PR25 2BB",
        "chloe.davies@demo.visitwatch",
    )
    return cal.to_ical()


# Written into every demo folder: only a folder carrying it is ever wiped.
MARKER = ".visitwatch-demo"


class DemoFolderInUse(VisitwatchError):
    pass


def free_port() -> int:
    """A loopback port nothing listens on now (the daemon binds it a moment later)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def prepare(folder: Path, now: datetime | None = None, port: int | None = None) -> Path:
    """Write config and calendar into ``folder`` (wiping an earlier demo); return the config.

    Only a folder an earlier demo created (it carries the marker file) is wiped; an empty
    or missing folder is used; anything else is refused, so a mistyped ``--dir`` can never
    delete someone's files.
    """
    now = now or datetime.now(UTC)
    if folder.exists():
        if (folder / MARKER).is_file():
            shutil.rmtree(folder)
        elif folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        else:
            raise DemoFolderInUse(
                f"{folder} exists and was not made by `visitwatch demo`; the demo wipes its "
                "folder on each run, so it will not use this one. Pick a new --dir."
            )
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("made by `visitwatch demo`; wiped on its next run\n")
    (folder / "calendar.ics").write_bytes(calendar(now))
    template = resources.files("visitwatch.daemon").joinpath("demo.toml").read_text()
    port = port or free_port()
    template = template.replace(f"127.0.0.1:{TEMPLATE_PORT}", f"127.0.0.1:{port}")
    template = template.replace(f"port = {TEMPLATE_PORT}", f"port = {port}")
    config_file = folder / "visitwatch.toml"
    config_file.write_text(template, encoding="utf-8")
    return config_file


def first_links(config_file: Path, now: datetime | None = None) -> tuple[str, str]:
    """Asha's check-in link and her manager's acknowledge link, as the messages carry them."""
    config = load_config(config_file)
    signer = Signer(load_keys(config.web.signing_key, config.daemon.state_dir))
    links = Links(signer, config.daemon.public_base_url, config.web.link_ttl)
    overrun = visit_id(SOURCE, OVERRUN_UID, "")
    issued = now or datetime.now(UTC)
    deadline = issued - OVERRUN_ENDED
    return (
        links.checkin(overrun, OVERRUN_WORKER, deadline, issued),
        links.ack(overrun, OVERRUN_MANAGER, deadline, issued),
    )


def introduction(folder: Path, config_file: Path) -> str:
    overrun = visit_id(SOURCE, OVERRUN_UID, "")
    compliant = visit_id(SOURCE, COMPLIANT_UID, "")
    cfg = f"--config {config_file}"
    checkin_link, ack_link = first_links(config_file)
    return f"""\
visitwatch demo: state in {folder}
  - Asha Khan's home visit ended 90 seconds ago; she has not checked in.
  - Ben Okafor's visit starts in 10 minutes with no risk assessment recorded.
  - Chloe Davies' visit is compliant and ends in 45 seconds.
Within about a minute you will see the compliance notice, the reminders and the manager's
overrun alert below; they are also appended to {folder / "outbox.jsonl"}.

The messages carry links to the pages this demo serves on this machine. Open them in a
browser (a phone-sized window shows what staff see):
  Asha's check-in page:          {checkin_link}
  Maria's acknowledge page:      {ack_link}

From another terminal (with the virtual environment's bin/ on PATH):
  visitwatch {cfg} status
  visitwatch {cfg} checkin {overrun}          # Asha is safe: all clear
  visitwatch {cfg} checkin {compliant} --extend 10m
  visitwatch {cfg} ack {compliant} --by "Maria Jones"
Stop with Ctrl-C.
"""
