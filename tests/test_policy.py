"""Policies: recognising visits, reading entries, applying the rules, loading settings."""

from __future__ import annotations

import random
import re
import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from visitwatch.core.calendar import Attendee, CalendarEvent
from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import format_duration
from visitwatch.policies import Policy, load_preset, parse_policy
from visitwatch.policies.model import VisitDetails
from visitwatch.policies.rules import FINDINGS_BY_NAME, RULE_NAMES

LONDON = ZoneInfo("Europe/London")
# Winter: London is UTC+0, so local clock times equal UTC ones in the simple cases.
JAN_10 = datetime(2025, 1, 10, 14, 0, tzinfo=UTC)
# Summer (BST): London is UTC+1.
JULY_1 = datetime(2025, 7, 1, 13, 0, tzinfo=UTC)  # 14:00 in London

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
SEED_FILES = {
    "pan-lancashire": "pan-lancashire-lone-working-policy.txt",
    "leading-futures": "leading-futures-home-visits-and-lone-working-policy.txt",
}
PRESETS = tuple(SEED_FILES)

PAN = Policy(load_preset("pan-lancashire"))
LF = Policy(load_preset("leading-futures"))

COMPLETE_DESCRIPTION = (
    "Risk assessment: complete\nReturn by: 15:30\nMobile: 07700 900123\nWorker: Sam Jones"
)


def entry(
    subject: str = "HV: Smith family",
    description: str = COMPLETE_DESCRIPTION,
    *,
    start: datetime = JAN_10,
    end: datetime | str | None = "default",
    location: str = "12 High Street, Preston PR1 2AB",
    categories: tuple[str, ...] = (),
    **changes: Any,
) -> CalendarEvent:
    """A calendar entry as a connector hands it over: times aware UTC."""
    return CalendarEvent(
        source="outlook",
        uid="AAMkAGI2TG93AAA=",
        recurrence_id="",
        subject=subject,
        start=start,
        end=start + timedelta(hours=1) if end == "default" else end,  # type: ignore[arg-type]
        description=description,
        location=location,
        categories=categories,
        organizer="sam.jones@council.example",
        owner="sam.jones@council.example",
        **changes,
    )


def details_of(event: CalendarEvent, policy: Policy = PAN, tz: ZoneInfo = LONDON) -> VisitDetails:
    return policy.extract(event, policy.recognise(event) or "home_visit", tz)


def rules_fired(event: CalendarEvent, policy: Policy = PAN) -> set[str]:
    return {finding.rule for finding in policy.check(event, details_of(event, policy))}


def seed_text(preset: str) -> str:
    path = SEEDS / SEED_FILES[preset]
    if not path.is_file():
        # A clone without the project's shared folder beside it (CI has it): the quotes
        # cannot be checked against texts that are not there.
        pytest.skip(f"seed policy texts not found at {path} (../shared/seeds beside the clone)")
    return path.read_text(encoding="utf-8")


def squash(text: str) -> str:
    """Runs of whitespace as one space: the seeds wrap some sentences over lines."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- recognition


@pytest.mark.parametrize(
    ("subject", "categories", "expected"),
    [
        ("Smith family", ("Home Visit",), "home_visit"),
        ("Smith family", ("  home visit ",), "home_visit"),
        ("Home visit - Smith family", (), "home_visit"),
        ("Home-visit Smith", (), "home_visit"),
        ("homevisit: Smith", (), "home_visit"),
        ("HV: Smith family", (), "home_visit"),
        ("  hv - Smith family", (), "home_visit"),
        ("Lone working - late office session", (), "lone_working"),
        ("Office, late", ("Lone Working",), "lone_working"),
        ("Lone working home visit - Smith", (), "home_visit"),
        ("Team meeting", (), None),
        ("Supervision", ("Blue category",), None),
        ("HVAC engineer in the office", (), None),
        ("Shove it", (), None),
    ],
)
def test_recognise_by_category_and_subject(
    subject: str, categories: tuple[str, ...], expected: str | None
) -> None:
    """Entries are classified by Outlook category or subject pattern, case-insensitively."""
    assert PAN.recognise(entry(subject, categories=categories)) == expected


def test_all_day_entries_are_not_visits_unless_configured() -> None:
    """An all-day "Home visit" block is ignored unless include_all_day is set."""
    event = entry("Home visit week", all_day=True)
    assert PAN.recognise(event) is None
    settings, problems = parse_policy({"recognition": {"include_all_day": True}})
    assert problems == []
    assert Policy(settings).recognise(event) == "home_visit"


def test_cancelled_visits_are_still_recognised() -> None:
    """Cancellation is the caller's business: the entry is still a home visit."""
    assert PAN.recognise(entry(cancelled=True)) == "home_visit"


@pytest.mark.parametrize(
    ("location", "description", "expected"),
    [
        ("12 High Street", "", "home_visit"),
        ("", "Address: 12 High Street", "home_visit"),
        ("", "<p>&nbsp;- Visit address - 12 High Street</p>", "home_visit"),
        ("", "Return by: 15:30", None),
        ("   ", "Address:", None),
    ],
)
def test_require_location(location: str, description: str, expected: str | None) -> None:
    """With require_location, only entries with a location or an Address: line are visits."""
    settings, problems = parse_policy({"recognition": {"require_location": True}})
    assert problems == []
    event = entry(location=location, description=description)
    assert Policy(settings).recognise(event) == expected


def test_require_location_does_not_drop_lone_working_sessions() -> None:
    """A lone-working session in the building has no address and is still watched."""
    settings, _ = parse_policy({"recognition": {"require_location": True}})
    assert Policy(settings).recognise(entry("Lone working", location="")) == "lone_working"


def test_leading_futures_recognises_working_alone() -> None:
    """The Leading Futures preset also knows "working alone" sessions in the provision."""
    assert LF.recognise(entry("Working alone - closing up")) == "lone_working"


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("description", "categories", "raw", "complete"),
    [
        ("Risk assessment: complete", (), "complete", True),
        ("risk assessment - done", (), "done", True),
        ("  *  RISK ASSESSMENT   :   Completed  ", (), "Completed", True),
        ("RA: RA-0113", (), "RA-0113", True),
        ("RA = RA0113", (), "RA0113", True),
        ("• RA ref: ra-0113", (), "ra-0113", True),
        ("RA-0113", (), "RA-0113", True),
        ("Risk assessment: in date", (), "in date", True),
        ("Risk assessment: approved", (), "approved", True),
        ("Risk assessment: signed off by TM", (), "signed off by TM", True),
        ("Risk assessment: yes", (), "yes", True),
        ("Risk assessment complete", (), "complete", True),
        ("", ("RA complete",), "complete", True),
        ("", ("Risk assessment complete",), "complete", True),
        ("Risk assessment: pending", (), "pending", False),
        ("Risk assessment: no", (), "no", False),
        ("Risk assessment: not done", (), "not done", False),
        ("Risk assessment: to do", (), "to do", False),
        ("Risk assessment: expired", (), "expired", False),
        ("RA: RA-0113 (expired)", (), "RA-0113 (expired)", False),
        ("Risk assessment: not complete", (), "not complete", False),
        ("Notes: parents at home", (), "", False),
        ("", (), "", False),
    ],
)
def test_extract_risk_assessment(
    description: str, categories: tuple[str, ...], raw: str, complete: bool
) -> None:
    """Risk assessment lines and categories are read as written and judged complete or not."""
    details = details_of(entry(description=description, categories=categories))
    assert (details.risk_assessment, details.risk_assessment_complete) == (raw, complete)


def test_complete_risk_assessment_wins_over_a_stale_line() -> None:
    """A "RA complete" category outranks an old "Risk assessment: pending" line."""
    event = entry(description="Risk assessment: pending", categories=("RA complete",))
    details = details_of(event)
    assert details.risk_assessment_complete
    assert details.risk_assessment == "complete"


@pytest.mark.parametrize(
    ("line", "local_hour", "local_minute"),
    [
        ("Return by: 15:30", 15, 30),
        ("return by:15:30", 15, 30),
        ("Back by 3.30pm", 15, 30),
        ("back by 3:30 p.m.", 15, 30),
        ("Check-in by: 15:30", 15, 30),
        ("Check in by - 4pm", 16, 0),
        ("Expected return: 16:00", 16, 0),
        ("Expected return time = 16.45", 16, 45),
        ("Return time: 1530", 15, 30),
        ("- Return by (approx): 15:30 then straight to office", 15, 30),
        ("**Return by:** 15:30", 15, 30),
        ("Due back by 12pm", 12, 0),
        ("Return by: noon", 12, 0),
    ],
)
def test_extract_expected_return_clock_time(line: str, local_hour: int, local_minute: int) -> None:
    """Return and check-in times in the ways workers write them, on the visit's date."""
    details = details_of(entry(description=line, start=JAN_10))  # 14:00 local, UTC+0
    expected = datetime(2025, 1, 10, local_hour, local_minute, tzinfo=LONDON).astimezone(UTC)
    if expected <= JAN_10:  # noon is before the 14:00 start: the next day
        expected = datetime(2025, 1, 11, local_hour, local_minute, tzinfo=LONDON).astimezone(UTC)
    assert details.expected_return == expected
    assert details.expected_return_from == "description"


def test_return_time_in_bst_is_converted_to_utc() -> None:
    """In July, "Return by: 15:30" in Europe/London is 14:30 UTC."""
    details = details_of(entry(description="Return by: 15:30", start=JULY_1))
    assert details.expected_return == datetime(2025, 7, 1, 14, 30, tzinfo=UTC)


def test_return_time_uses_the_local_date_not_the_utc_date() -> None:
    """A 00:30 BST start is the previous day in UTC; the return is on the local date."""
    start = datetime(2025, 7, 1, 23, 30, tzinfo=UTC)  # 2 July 00:30 in London
    details = details_of(entry(description="Back by 02:00", start=start))
    assert details.expected_return == datetime(2025, 7, 2, 1, 0, tzinfo=UTC)


def test_return_time_earlier_than_start_means_next_day() -> None:
    """An evening visit "back by 00:30" returns after midnight, not before it started."""
    start = datetime(2025, 1, 10, 22, 0, tzinfo=UTC)
    details = details_of(entry(description="Return by: 00:30", start=start, end=None))
    assert details.expected_return == datetime(2025, 1, 11, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Return by: 2025-07-01T16:00", datetime(2025, 7, 1, 15, 0, tzinfo=UTC)),
        ("Return by: 2025-07-01 16:00+01:00", datetime(2025, 7, 1, 15, 0, tzinfo=UTC)),
        ("Expected return: 2025-07-01T15:00Z", datetime(2025, 7, 1, 15, 0, tzinfo=UTC)),
    ],
)
def test_return_time_as_iso_datetime(line: str, expected: datetime) -> None:
    """ISO datetimes are taken as written; without an offset, in the organisation's zone."""
    assert details_of(entry(description=line, start=JULY_1)).expected_return == expected


@pytest.mark.parametrize(
    ("end", "expected_return"),
    [
        (JAN_10 + timedelta(minutes=90), JAN_10 + timedelta(minutes=90)),
        (None, JAN_10 + timedelta(hours=1)),  # the preset's default_duration
    ],
)
def test_expected_return_defaults_to_the_entry_end(
    end: datetime | None, expected_return: datetime
) -> None:
    """Without a return line the entry's end (or start + default duration) is the deadline."""
    details = details_of(entry(description="Notes: none", end=end))
    assert details.expected_return == expected_return
    assert details.expected_return_from == "event_end"


@pytest.mark.parametrize("line", ["Return by: later", "Back by 4", "Return by:"])
def test_unreadable_return_time_falls_back_to_the_end(line: str) -> None:
    """A return line without a readable time is not guessed at: the entry's end is used."""
    details = details_of(entry(description=line))
    assert details.expected_return_from == "event_end"


def test_no_default_return_when_switched_off() -> None:
    """With return_defaults_to_end = false, no return line means no deadline."""
    settings, problems = parse_policy({"requirements": {"return_defaults_to_end": False}})
    assert problems == []
    policy = Policy(settings)
    details = policy.extract(entry(description=""), "home_visit", LONDON)
    assert (details.expected_return, details.expected_return_from) == (None, "")


MESSY_DESCRIPTION = (
    "<html><body><p>Hi team,</p><p>&nbsp;</p>"
    "<ul><li>Risk&nbsp;assessment&nbsp;:&nbsp;RA-0113</li>"
    "<li>Return by: 3.30pm</li></ul>"
    "<div>Address: 4 Mill Lane, Blackburn BB1 1AA</div>"
    "<div>Worker mobile: 07700 900456</div>"
    "<div>Visiting worker: Priya Shah &lt;priya.shah@council.example&gt;</div>"
    "<div>Going home after: Yes</div>"
    "<div>Pairs: yes</div><div>Second worker: Tom Reed</div></body></html>"
)
WINDOWS_DESCRIPTION = MESSY_DESCRIPTION.replace("<div>", "").replace("</div>", "\r\n")


@pytest.mark.parametrize("description", [MESSY_DESCRIPTION, WINDOWS_DESCRIPTION])
def test_extract_every_field_from_a_messy_description(description: str) -> None:
    """HTML leftovers, entities and Windows line endings do not hide any field."""
    details = details_of(entry(description=description, location=""))
    assert details.risk_assessment == "RA-0113"
    assert details.risk_assessment_complete
    assert details.expected_return == datetime(2025, 1, 10, 15, 30, tzinfo=UTC)
    assert details.address == "4 Mill Lane, Blackburn BB1 1AA"
    assert details.worker_mobile == "07700 900456"
    assert details.worker_hint == "Priya Shah <priya.shah@council.example>"
    assert details.going_home_after
    assert details.pair_required
    assert details.second_worker == "Tom Reed"


def test_location_wins_over_an_address_line() -> None:
    """The entry's Location field is the address; an Address: line is the fallback."""
    details = details_of(entry(location=" 1 Church St ", description="Address: 2 Other Rd"))
    assert details.address == "1 Church St"


@pytest.mark.parametrize(
    ("line", "mobile"),
    [
        ("Mobile: 07700 900123", "07700 900123"),
        ("worker mobile - +44 7700 900123", "+44 7700 900123"),
        ("PHONE = 07700900123", "07700900123"),
        ("Mob: 07700 900123", "07700 900123"),
    ],
)
def test_extract_worker_mobile(line: str, mobile: str) -> None:
    """Mobile numbers under their usual labels."""
    assert details_of(entry(description=line)).worker_mobile == mobile


@pytest.mark.parametrize(
    ("line", "worker"),
    [
        ("Worker: sam.jones@council.example", "sam.jones@council.example"),
        ("Visiting worker - Sam Jones", "Sam Jones"),
        ("Second worker: Tom", ""),  # the second worker is not the visiting worker
    ],
)
def test_extract_worker_hint(line: str, worker: str) -> None:
    """A Worker: line names who is out on the visit."""
    assert details_of(entry(description=line)).worker_hint == worker


@pytest.mark.parametrize(
    ("description", "categories", "going_home"),
    [
        ("Going home after: yes", (), True),
        ("going home after visit - Y", (), True),
        ("Going directly home after visit", (), True),
        ("", ("Going home after",), True),
        ("Going home after: no", (), False),
        ("", (), False),
    ],
)
def test_extract_going_home_after(
    description: str, categories: tuple[str, ...], going_home: bool
) -> None:
    """ "Going home after: yes" (or the category) marks a visit that ends at home."""
    details = details_of(entry(description=description, categories=categories))
    assert details.going_home_after is going_home


@pytest.mark.parametrize(
    ("description", "categories", "pairs", "second"),
    [
        ("Pairs: yes", (), True, ""),
        ("Visit in pairs: YES\nWith: Tom Reed", (), True, "Tom Reed"),
        ("Pair visit\nCo-worker: Tom Reed", (), True, "Tom Reed"),
        ("Visit alone: no\nSecond worker - Tom", (), True, "Tom"),
        ("", ("Pair visit",), True, ""),
        ("", ("pairs",), True, ""),
        ("Pairs: no", (), False, ""),
        ("Pairs: not required", (), False, ""),
        ("Visit alone: yes", (), False, ""),
        ("Pair of wellies in the boot", (), False, ""),
        ("Pairs: yes\nWith: none", (), True, ""),
    ],
)
def test_extract_pairs(
    description: str, categories: tuple[str, ...], pairs: bool, second: str
) -> None:
    """Pair visits are read from lines or categories, with the second worker's name."""
    details = details_of(entry(description=description, categories=categories))
    assert (details.pair_required, details.second_worker) == (pairs, second)


@pytest.mark.parametrize(
    ("categories", "checked_in", "help_requested"),
    [
        (("Home Visit", "Safe"), True, False),
        (("checked in ",), True, False),
        (("NEED HELP",), False, True),
        (("Home Visit",), False, False),
    ],
)
def test_extract_checkin_categories(
    categories: tuple[str, ...], checked_in: bool, help_requested: bool
) -> None:
    """Check-in and help categories set in Outlook are read, whatever their case."""
    details = details_of(entry(categories=categories))
    assert (details.checked_in, details.help_requested) == (checked_in, help_requested)


def test_extraction_survives_any_text() -> None:
    """Random Unicode, control characters and half-tags never make extraction crash."""
    rng = random.Random(20250701)
    alphabet = "Return by: 15:30 RA-01 <p>&amp;\r\n\t\u2028\x00é漢😀•-=*:.0123456789apm"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        event = entry(subject=text, description=text, location="", categories=(text,))
        PAN.recognise(event)
        details = PAN.extract(event, "home_visit", LONDON)
        PAN.check(event, details)


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("description", "location", "fired"),
    [
        (COMPLETE_DESCRIPTION, "12 High Street", set()),
        ("Return by: 15:30", "12 High Street", {"risk_assessment_missing"}),
        ("RA: pending\nReturn by: 15:30", "12 High Street", {"risk_assessment_incomplete"}),
        ("Risk assessment: done", "", {"address_missing"}),
        ("RA: done\nPairs: yes", "1 Road", {"pair_without_second_worker"}),
        ("RA: done\nPairs: yes\nWith: Tom", "1 Road", set()),
        ("RA: done\nGoing home after: yes", "1 Road", {"going_home_after"}),
    ],
)
def test_rules_fire_and_stay_quiet(description: str, location: str, fired: set[str]) -> None:
    """Each rule fires exactly when its requirement is unmet."""
    assert rules_fired(entry(description=description, location=location)) == fired


def test_expected_return_missing_when_not_defaulted() -> None:
    """Without a return line and without defaulting to the end, the return is missing."""
    settings, _ = parse_policy({"requirements": {"return_defaults_to_end": False}})
    policy = Policy(settings)
    fired = rules_fired(entry(description="RA: done"), policy)
    assert fired == {"expected_return_missing"}
    assert rules_fired(entry(description="RA: done\nBack by 3pm"), policy) == set()


@pytest.mark.parametrize(
    ("description", "end", "fires"),
    [
        ("RA: done\nReturn by: 2025-01-10T13:00", "default", True),
        ("RA: done\nReturn by: 14:00", "default", True),  # equal to the 14:00 start
        ("RA: done", JAN_10, True),  # a zero-length entry
        ("RA: done\nReturn by: 14:01", "default", False),
    ],
)
def test_expected_return_before_start(description: str, end: Any, fires: bool) -> None:
    """A deadline at or before the start is flagged as a warning."""
    event = entry(description=description, end=end)
    findings = PAN.check(event, details_of(event))
    matching = [f for f in findings if f.rule == "expected_return_before_start"]
    assert bool(matching) is fires
    assert all(f.severity == "warning" for f in matching)


def test_lone_working_needs_no_address_or_risk_assessment() -> None:
    """A lone-working session in the building is only checked for its end time."""
    event = entry("Lone working - late in the office", description="", location="")
    assert PAN.recognise(event) == "lone_working"
    assert rules_fired(event) == set()


def test_lone_working_risk_assessment_can_be_required() -> None:
    """lone_working_risk_assessment = true extends the risk assessment rule to sessions."""
    settings, problems = parse_policy({"requirements": {"lone_working_risk_assessment": True}})
    assert problems == []
    event = entry("Lone working", description="", location="")
    assert rules_fired(event, Policy(settings)) == {"risk_assessment_missing"}


@pytest.mark.parametrize(
    ("attendees", "fires"),
    [
        ((), True),
        ((Attendee("sam.jones@council.example"),), True),  # the organiser themself
        ((Attendee("tom.reed@council.example"),), False),
        ((Attendee("tom.reed@council.example", response="declined"),), True),
        ((Attendee("room.3@council.example", role="resource"),), True),
        ((Attendee("mum@gmail.example"),), True),  # the family is not a second worker
    ],
)
def test_invited_colleague_counts_as_second_worker(
    attendees: tuple[Attendee, ...], fires: bool
) -> None:
    """Inviting a colleague to the entry records the second worker of a pair visit."""
    event = entry(description="RA: done\nPairs: yes", attendees=attendees)
    assert ("pair_without_second_worker" in rules_fired(event)) is fires


def test_switched_off_requirements_do_not_fire() -> None:
    """Requirements set to false produce no findings."""
    settings, problems = parse_policy(
        {
            "requirements": {
                "risk_assessment": False,
                "expected_return": False,
                "address": False,
                "return_defaults_to_end": False,
            }
        }
    )
    assert problems == []
    assert rules_fired(entry(description="", location=""), Policy(settings)) == set()


def test_findings_tell_the_worker_what_to_add_and_quote_the_policy() -> None:
    """Messages name the line to add; the clause is the preset's quote for that rule."""
    event = entry(description="", location="")
    findings = {f.rule: f for f in LF.check(event, details_of(event, LF))}
    assert '"Risk assessment: complete"' in findings["risk_assessment_missing"].message
    assert '"Address:' in findings["address_missing"].message
    assert (
        findings["risk_assessment_missing"].clause == LF.settings.clauses["risk_assessment_missing"]
    )
    assert all(f.severity == "error" for f in findings.values())


def test_going_home_after_quotes_leading_futures() -> None:
    """The going-home warning quotes the Leading Futures safe-arrival clause."""
    event = entry(description="RA: done\nGoing home after: yes")
    (finding,) = LF.check(event, details_of(event, LF))
    assert finding.severity == "warning"
    assert "notify the Directors upon safe arrival" in finding.clause
    assert '"Safe"' in finding.message


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_without_problems(preset: str) -> None:
    """Each shipped preset parses cleanly and has a full ladder, clauses and instructions."""
    settings, problems = parse_policy({"preset": preset})
    assert problems == []
    assert settings.name == preset
    assert [step.kind for step in settings.escalation] == ["reminder", "overrun", "escalation"]
    assert settings.escalation[-1].to == ("role:director",)
    assert settings.escalation[-1].repeat == timedelta(minutes=15)
    assert set(settings.instructions) >= {"reminder", "overrun", "escalation", "help", "all_clear"}


def test_preset_ladders_and_titles() -> None:
    """The two ladders differ where the policies do: +45m vs +30m to the Directors."""
    pan, lf = load_preset("pan-lancashire"), load_preset("leading-futures")
    assert pan.title == "Pan Lancashire SCB Manual 1.1.5 Lone Working Policy"
    assert lf.title == "Leading Futures Home Visits and Lone Working Policy (June 2025)"
    assert [s.after for s in pan.escalation] == [
        timedelta(0),
        timedelta(minutes=15),
        timedelta(minutes=45),
    ]
    assert [s.after for s in lf.escalation] == [
        timedelta(0),
        timedelta(minutes=15),
        timedelta(minutes=30),
    ]
    assert "Team Manager" in pan.instructions["overrun"]
    assert "Director" in lf.instructions["overrun"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_clauses_are_verbatim_quotes_of_the_seed_policy(preset: str) -> None:
    """Every clause is 'Section: "quote"' with the quote and section found in the seed."""
    text = squash(seed_text(preset))
    clauses = load_preset(preset).clauses
    expected = {*RULE_NAMES, "reminder", "overrun", "escalation", "help", "all_clear"}
    assert set(clauses) >= expected
    for name, clause in clauses.items():
        match = re.fullmatch(r'(?P<section>[^"]+): "(?P<quote>.+)"', clause, re.DOTALL)
        assert match, f"{name}: {clause!r} is not 'Section: \"quote\"'"
        assert squash(match["quote"]) in text, f"{name}: quote not found in the {preset} seed"
        for part in match["section"].split("›"):
            assert squash(part).casefold() in text.casefold(), f"{name}: no section {part!r}"


def test_pan_lancashire_quotes_the_pairs_and_timescale_clauses() -> None:
    """The pairs and overrun rules quote the exact Pan Lancashire sentences."""
    clauses = load_preset("pan-lancashire").clauses
    assert "workers should visit in pairs" in clauses["pair_without_second_worker"]
    assert clauses["overrun"].startswith('3. Home Visits: "Where there is potential risk')


def test_preset_files_have_the_admin_table_shape() -> None:
    """A preset file's top-level keys are exactly those an admin's [policy] table takes."""
    folder = resources.files("visitwatch.policies") / "presets"
    for preset in PRESETS:
        data = tomllib.loads((folder / f"{preset}.toml").read_text(encoding="utf-8"))
        settings, problems = parse_policy(data)  # the default preset, overridden by all of it
        assert problems == []
        assert settings.clauses == load_preset(preset).clauses


# --------------------------------------------------------------------------- settings


def test_admin_values_merge_over_the_preset() -> None:
    """Tables merge key by key; an admin ladder replaces the preset's whole ladder."""
    settings, problems = parse_policy(
        {
            "preset": "leading-futures",
            "title": "Our lone working policy",
            "timing": {"grace": "10m"},
            "clauses": {"overrun": "Local rule 4.2: call them"},
            "escalation": [{"after": "10m", "to": ["manager", "role:on-call"], "kind": "overrun"}],
        }
    )
    assert problems == []
    assert settings.title == "Our lone working policy"
    assert settings.grace == timedelta(minutes=10)
    assert settings.default_duration == timedelta(hours=1)  # from the preset
    assert settings.clauses["overrun"] == "Local rule 4.2: call them"
    assert "Director Notification" in settings.clauses["expected_return_missing"]
    assert len(settings.escalation) == 1
    assert settings.escalation[0].to == ("manager", "role:on-call")


def test_default_preset_is_pan_lancashire() -> None:
    """An empty [policy] table means the Pan Lancashire preset."""
    settings, problems = parse_policy({})
    assert problems == []
    assert settings == load_preset("pan-lancashire")


def test_staff_ids_are_not_checked_here() -> None:
    """Unknown staff ids in the ladder are the caller's to check, with the directory."""
    _, problems = parse_policy(
        {"escalation": [{"after": "0m", "to": ["nobody@example.org"], "kind": "reminder"}]}
    )
    assert problems == []


def test_parse_policy_reports_every_problem_with_its_key() -> None:
    """Bad input of every kind is reported at once, each at its dotted key path."""
    settings, problems = parse_policy(
        {
            "preset": "pan-lancs",
            "titel": "typo",
            "recognition": {"subject_patterns": ["ok", "(unclosed"], "categroies": []},
            "requirements": {"address": "yes"},
            "timing": {"grace": "15 minutes", "default_duration": "0m"},
            "checkin": "Safe",
            "clauses": {"overun": "x"},
            "instructions": {"reminder": 3},
            "escalation": [
                {"after": "0m", "to": ["worker"], "kind": "reminder", "repeat": "5m"},
                {"after": "30m", "to": [], "kind": "overun"},
                {"after": "15m", "to": ["role:director"], "kind": "escalation", "wait": 1},
                {"to": "manager", "kind": "escalation"},
            ],
        }
    )
    found = {problem.key: problem for problem in problems}
    expected_keys = {
        "policy.preset",
        "policy.titel",
        "policy.recognition.subject_patterns[1]",
        "policy.recognition.categroies",
        "policy.requirements.address",
        "policy.timing.grace",
        "policy.timing.default_duration",
        "policy.checkin",
        "policy.clauses.overun",
        "policy.instructions.reminder",
        "policy.escalation[0].repeat",
        "policy.escalation[1].to",
        "policy.escalation[1].kind",
        "policy.escalation[2].after",
        "policy.escalation[2].wait",
        "policy.escalation[3].after",
        "policy.escalation[3].to",
    }
    assert set(found) == expected_keys
    assert "pan-lancashire" in found["policy.preset"].hint
    assert "leading-futures" in found["policy.preset"].hint
    assert found["policy.titel"].hint == "did you mean 'title'?"
    assert found["policy.recognition.categroies"].hint == "did you mean 'categories'?"
    assert "missing )" in found["policy.recognition.subject_patterns[1]"].message
    assert found["policy.clauses.overun"].hint == "did you mean 'overrun'?"
    assert found["policy.escalation[1].kind"].hint == "did you mean 'overrun'?"
    assert "only the last step" in found["policy.escalation[0].repeat"].message
    assert "increasing" in found["policy.escalation[2].after"].message
    assert "nobody" in found["policy.escalation[1].to"].message
    # Still usable: the default preset, with the admin's valid parts applied.
    assert settings.name == "pan-lancashire"
    assert settings.recognition.subject_patterns == ("ok",)


def test_clauses_and_instructions_for_every_kind_the_daemon_looks_up_are_kept() -> None:
    """Clauses for extended, removed and worker_unknown parse and reach the settings."""
    settings, problems = parse_policy(
        {
            "clauses": {
                "extended": "4.1: extensions are agreed with the manager",
                "removed": "4.2: a cancelled visit is confirmed with the worker",
                "worker_unknown": "2.3: every visit names its worker",
            },
            "instructions": {
                "extended": "Check the new return time is realistic.",
                "removed": "Phone the worker to confirm they are safe.",
            },
        }
    )
    assert problems == []
    assert settings.clauses["extended"] == "4.1: extensions are agreed with the manager"
    assert settings.clauses["removed"] == "4.2: a cancelled visit is confirmed with the worker"
    assert settings.clauses["worker_unknown"] == "2.3: every visit names its worker"
    assert settings.instructions["removed"] == "Phone the worker to confirm they are safe."
    # The preset's own clauses are still there underneath.
    assert settings.clauses["overrun"] == load_preset("pan-lancashire").clauses["overrun"]


def test_every_notification_kind_and_finding_takes_a_clause() -> None:
    """No kind a message is sent for, and no finding, is refused as an unknown clause key."""
    kinds = [kind.value for kind in NotificationKind]
    _, problems = parse_policy(
        {
            "clauses": {name: f"clause for {name}" for name in [*kinds, *FINDINGS_BY_NAME]},
            "instructions": {kind: f"do this for {kind}" for kind in kinds},
        }
    )
    assert problems == []


def test_a_finding_raised_by_the_daemon_is_declared_but_not_run_by_the_policy() -> None:
    """worker_unknown has a severity and a clause key, but no policy rule raises it."""
    assert FINDINGS_BY_NAME["worker_unknown"].severity == "warning"
    assert FINDINGS_BY_NAME["worker_unknown"].check is None
    assert "worker_unknown" not in RULE_NAMES
    bare = entry(subject="Home visit", description="")
    findings = PAN.check(bare, details_of(bare))
    assert "risk_assessment_missing" in {finding.rule for finding in findings}
    assert "worker_unknown" not in {finding.rule for finding in findings}
    assert all(f.severity == FINDINGS_BY_NAME[f.rule].severity for f in findings)


@pytest.mark.parametrize(
    ("section", "key", "hint"),
    [
        ("clauses", "worker_unkown", "did you mean 'worker_unknown'?"),
        ("clauses", "extnded", "did you mean 'extended'?"),
        ("instructions", "remvoed", "did you mean 'removed'?"),
    ],
)
def test_an_unknown_clause_or_instruction_key_gets_a_hint(
    section: str, key: str, hint: str
) -> None:
    """A misspelt key is still refused, with the closest accepted key suggested."""
    settings, problems = parse_policy({section: {key: "some text"}})
    assert [(p.key, p.message, p.hint) for p in problems] == [
        (f"policy.{section}.{key}", "unknown key", hint)
    ]
    assert key not in getattr(settings, section)


def test_an_unknown_clause_key_with_no_close_match_lists_the_known_keys() -> None:
    """With nothing close, the hint lists every key the table takes, the new ones included."""
    _, problems = parse_policy({"instructions": {"zzzz": "text"}})
    assert [p.key for p in problems] == ["policy.instructions.zzzz"]
    assert problems[0].hint.startswith("known keys: ")
    assert "extended" in problems[0].hint and "removed" in problems[0].hint


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"escalation": []}, "policy.escalation"),
        ({"escalation": "worker"}, "policy.escalation"),
        ({"escalation": ["15m"]}, "policy.escalation[0]"),
        ({"recognition": ["Home Visit"]}, "policy.recognition"),
        ({"title": ""}, "policy.title"),
        ({"preset": 3}, "policy.preset"),
        ({"checkin": {"categories": ["Safe", " "]}}, "policy.checkin.categories[1]"),
        ({"timing": {"grace": True}}, "policy.timing.grace"),
    ],
)
def test_parse_policy_rejects_malformed_shapes(table: dict[str, Any], key: str) -> None:
    """Wrong shapes are problems at the right key, never exceptions."""
    _, problems = parse_policy(table)
    assert key in {problem.key for problem in problems}


def test_parse_policy_uses_the_given_prefix() -> None:
    """Key paths start with the caller's prefix (e.g. a per-team policy table)."""
    _, problems = parse_policy({"timing": {"grace": "soon"}}, prefix="teams[0].policy")
    assert [problem.key for problem in problems] == ["teams[0].policy.timing.grace"]


def test_parse_policy_accepts_a_non_table() -> None:
    """Even a policy that is not a table yields settings and a problem, not an exception."""
    settings, problems = parse_policy("pan-lancashire")  # type: ignore[arg-type]
    assert [problem.key for problem in problems] == ["policy"]
    assert settings.name == "pan-lancashire"


def test_policy_settings_are_used_as_given() -> None:
    """A Policy built from edited settings applies them (here: no address needed)."""
    settings = replace(load_preset("pan-lancashire"), require_address=False)
    assert "address_missing" not in rules_fired(entry(location=""), Policy(settings))


# --------------------------------------------------------------------------- grace, ack_timeout


def afters(settings: Any) -> list[str]:
    return [format_duration(step.after) for step in settings.escalation]


def test_grace_moves_the_presets_manager_rung_and_keeps_the_distance_to_later_ones() -> None:
    """`grace = "5m"` over a preset: manager at +5, directors 30 minutes later (+35)."""
    settings, problems = parse_policy({"timing": {"grace": "5m"}})
    assert problems == []
    assert afters(settings) == ["0s", "5m", "35m"]
    assert settings.grace == timedelta(minutes=5)
    longer, _ = parse_policy({"preset": "leading-futures", "timing": {"grace": "20m"}})
    assert afters(longer) == ["0s", "20m", "35m"]


def test_an_admin_ladder_sets_the_grace_period() -> None:
    """With the admin's own ladder and no grace, grace is its first rung beyond the worker."""
    settings, problems = parse_policy(
        {
            "escalation": [
                {"after": "0m", "to": ["worker"], "kind": "reminder"},
                {"after": "5m", "to": ["worker"], "kind": "reminder"},
                {"after": "20m", "to": ["manager"], "kind": "overrun"},
            ]
        }
    )
    assert problems == []
    assert settings.grace == timedelta(minutes=20)
    assert afters(settings) == ["0s", "5m", "20m"]


def test_grace_and_an_admin_ladder_that_disagree_are_a_problem_naming_both() -> None:
    """Grace 10m beside a ladder alerting the manager at 15m: one problem, both keys named."""
    _, problems = parse_policy(
        {
            "timing": {"grace": "10m"},
            "escalation": [
                {"after": "0m", "to": ["worker"], "kind": "reminder"},
                {"after": "15m", "to": ["manager"], "kind": "overrun"},
            ],
        }
    )
    [problem] = problems
    assert problem.key == "policy.timing.grace"
    assert "policy.escalation[1].after" in problem.message
    assert "10m" in problem.message and "15m" in problem.message


@pytest.mark.parametrize("grace", ["0m", "-5m"])
def test_grace_must_come_after_the_workers_reminder(grace: str) -> None:
    """A grace period that would alert the manager with (or before) the reminder is refused."""
    settings, problems = parse_policy({"timing": {"grace": grace}})
    assert [problem.key for problem in problems] == ["policy.timing.grace"]
    assert afters(settings) == ["0s", "15m", "45m"]  # the preset's ladder, unchanged


def test_ack_timeout_defaults_to_30_minutes_and_can_be_set() -> None:
    """`[policy.timing] ack_timeout` is read, defaults to 30 minutes, and must be positive."""
    assert parse_policy({})[0].ack_timeout == timedelta(minutes=30)
    assert parse_policy({"timing": {"ack_timeout": "45m"}})[0].ack_timeout == timedelta(minutes=45)
    _, problems = parse_policy({"timing": {"ack_timeout": "0s"}})
    assert [problem.key for problem in problems] == ["policy.timing.ack_timeout"]
