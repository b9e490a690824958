"""Staff details from Microsoft 365: names, e-mail, phones and line managers.

Used when a source has ``directory = true``: instead of keeping names, mobiles and managers
in the config, visitwatch reads them from Entra (application permission ``User.Read.All``).

Two requests per person (the user, then ``/manager``) travel in ``$batch`` requests, ten
people per batch. ``/users/{x}`` accepts only an object id or a user principal name, so a
guest (whose UPN is ``name_domain#EXT#@tenant``) or a user whose address changed is not
found there: those are looked up again with ``$filter=mail eq '...'``, and how many
were found neither way is logged as a count (the addresses are often families'). Answers are cached in ``state_dir/graph-directory.json`` and re-read only
when older than ``max_age``: the directory changes rarely, and an alert must not wait for
Graph. When Graph cannot be read the cached entry is used however old it is, because a
stale mobile number is better than none when a worker is overdue.

Privacy: the cache holds names and phone numbers, so it is written with mode 0600, and
names and phones are logged at debug level only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from visitwatch.connectors.graph_client import GraphClient, mailbox_path
from visitwatch.core.errors import ConnectorError
from visitwatch.core.private_files import make_dirs

log = structlog.get_logger(__name__)

CACHE_FILE = "graph-directory.json"
CACHE_VERSION = 1
USER_FIELDS = "id,displayName,mail,userPrincipalName,mobilePhone,businessPhones"
MANAGER_FIELDS = "id,mail,userPrincipalName,displayName"


@dataclass(frozen=True)
class Person:
    """One member of staff as the directory describes them.

    ``id`` is the id it was looked up by (a staff id: usually the e-mail address).
    ``manager_id`` is the manager's address (``mail``, else ``userPrincipalName``), lower-case,
    so it can be looked up the same way; None when the directory names no manager.
    ``mobile`` is ``mobilePhone`` only (texts to a desk phone go nowhere); the first of
    ``businessPhones`` is kept in ``phone``.
    """

    id: str
    name: str
    email: str
    mobile: str
    manager_id: str | None
    phone: str = ""


@dataclass(frozen=True)
class _Entry:
    person: Person
    fetched_at: datetime


class _NotFound(Exception):
    """The directory answered that the user does not exist."""


class GraphDirectory:
    """Looks people up in Entra through ``client``, with a file cache in ``state_dir``."""

    def __init__(
        self,
        client: GraphClient,
        state_dir: Path,
        clock: Callable[[], datetime],
        max_age: timedelta = timedelta(days=1),
    ) -> None:
        self.client = client
        self.path = Path(state_dir) / CACHE_FILE
        self.clock = clock
        self.max_age = max_age
        self._lock = threading.Lock()  # lookups from the sync and dispatch threads
        self._cache: dict[str, _Entry] | None = None  # read from the file on first use
        self.unmatched = 0  # ids found neither by UPN nor by mail in the last fetch

    def lookup(self, ids: Iterable[str]) -> dict[str, Person]:
        """The people with these ids, fetched or from the cache.

        An id the directory does not know, or that could not be fetched and was never
        cached, is absent from the answer (with a warning): callers fall back to the config.
        Never raises for Graph failures.
        """
        wanted = list(dict.fromkeys(i.strip() for i in ids if i and i.strip()))
        # The lock guards the cache only. Graph is asked outside it: a fetch waiting on a
        # slow Graph in the sync thread must not hold up dispatch's lookup of a cached manager.
        with self._lock:
            cache = self._load()
            now = self.clock()
            due = [i for i in wanted if i not in cache or now - cache[i].fetched_at >= self.max_age]
            if not due:
                return {i: cache[i].person for i in wanted if i in cache}
        fetched = self._fetch(due, cached={i for i in due if i in cache})
        with self._lock:
            cache = self._load()
            changed = False
            for staff_id, person in fetched.items():
                if person is None:
                    changed = cache.pop(staff_id, None) is not None or changed
                else:
                    cache[staff_id] = _Entry(person, now)
                    changed = True
            if changed:
                self._save(cache)
            return {i: cache[i].person for i in wanted if i in cache}

    # ------------------------------------------------------------------ fetching

    def _fetch(self, ids: list[str], cached: set[str]) -> dict[str, Person | None]:
        """Each id's Person, or None when the directory does not know it.

        An id that could not be fetched is absent (its cached entry, if any, is kept).
        """
        requests_ = []
        for n, staff_id in enumerate(ids):
            path = mailbox_path(staff_id)
            requests_.append(_get(f"u{n}", f"{path}?$select={USER_FIELDS}"))
            requests_.append(_get(f"m{n}", f"{path}/manager?$select={MANAGER_FIELDS}"))
        answers = self._batch(requests_, people=len(ids), using_cache=len(cached))
        if answers is None:
            return {}
        fetched: dict[str, Person | None] = {}
        by_mail: dict[int, str] = {}
        for n, staff_id in enumerate(ids):
            try:
                person = _read_person(
                    n, staff_id, answers.get(f"u{n}"), answers.get(f"m{n}"), cached
                )
            except _NotFound:
                by_mail[n] = staff_id  # not an id or UPN: perhaps a guest's or renamed mail
                continue
            if person is not None:
                fetched[staff_id] = person
        if by_mail:
            fetched.update(self._fetch_by_mail(by_mail, cached))
        self.unmatched = sum(1 for i in ids if i in fetched and fetched[i] is None)
        if self.unmatched:
            # A count only: the ids are often families' addresses on an invitation.
            log.warning("directory.not_matched", count=self.unmatched, looked_up=len(ids))
        return fetched

    def _fetch_by_mail(self, ids: Mapping[int, str], cached: set[str]) -> dict[str, Person | None]:
        """People ``/users/{x}`` did not find, looked up by ``mail``, then their managers."""
        found: dict[str, Person | None] = {}
        answers = self._batch([
            _get(f"f{n}", f"/users?$filter={quote(_mail_filter(i), safe='')}&$select={USER_FIELDS}")
            for n, i in ids.items()
        ], people=len(ids))  # fmt: skip
        if answers is None:
            return found
        users: dict[int, Mapping[str, Any]] = {}
        for n, staff_id in ids.items():
            answer = answers.get(f"f{n}")
            body = answer.get("body") if answer is not None else None
            if answer is None or answer.get("status") != 200 or not isinstance(body, dict):
                _person_failed(n, _failure(answer), using_cache=staff_id in cached)
                continue
            matches = [u for u in body.get("value") or [] if isinstance(u, dict)]
            if len(matches) == 1 and matches[0].get("id"):
                users[n] = matches[0]
            else:
                # None, or several users sharing the address: not someone we can name.
                log.debug("directory.not_found", staff_id=staff_id, matches=len(matches))
                found[staff_id] = None
        if not users:
            return found
        managers = self._batch([
            _get(f"m{n}", f"{mailbox_path(str(u['id']))}/manager?$select={MANAGER_FIELDS}")
            for n, u in users.items()
        ], people=len(users))  # fmt: skip
        if managers is None:
            return found
        for n, user in users.items():
            # The user was found (status 200), so _NotFound cannot come out of this.
            person = _read_person(
                n, ids[n], {"status": 200, "body": user}, managers.get(f"m{n}"), cached
            )
            if person is not None:
                found[ids[n]] = person
        return found

    def _batch(
        self, requests_: list[dict[str, str]], **context: Any
    ) -> dict[str, dict[str, Any]] | None:
        """The inner answers by id, or None when the batch itself failed (logged with ``context``)."""
        try:
            return self.client.batch(list(requests_))
        except ConnectorError as err:
            log.warning("directory.fetch_failed", error=str(err), **context)
            return None

    # ------------------------------------------------------------------ the cache file

    def _load(self) -> dict[str, _Entry]:
        if self._cache is not None:
            return self._cache
        self._cache = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return self._cache
        except (OSError, ValueError) as err:
            # A damaged cache only costs a fetch; it must not stop lookups.
            log.warning("directory.cache_unreadable", path=str(self.path), error=str(err))
            return self._cache
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return self._cache
        for staff_id, record in (data.get("people") or {}).items():
            try:
                self._cache[staff_id] = _Entry(
                    Person(**record["person"]), datetime.fromisoformat(record["fetched_at"])
                )
            except (KeyError, TypeError, ValueError):
                continue  # one bad record is simply fetched again
        return self._cache

    def _save(self, cache: Mapping[str, _Entry]) -> None:
        data = {
            "version": CACHE_VERSION,
            "people": {
                staff_id: {"fetched_at": e.fetched_at.isoformat(), "person": asdict(e.person)}
                for staff_id, e in sorted(cache.items())
            },
        }
        text = json.dumps(data, indent=1, ensure_ascii=False)
        try:
            make_dirs(self.path.parent)
            # Written to a 0600 temporary file and renamed over: never a moment when the
            # names and phones are world-readable, never a half-written cache.
            fd, temporary = tempfile.mkstemp(prefix=".graph-directory-", dir=self.path.parent)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    file.write(text)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as err:
            # The answers are still in memory; only the next start pays for a fetch.
            log.warning("directory.cache_not_written", path=str(self.path), error=str(err))


def _get(request_id: str, url: str) -> dict[str, str]:
    """One GET inside a ``$batch``."""
    return {"id": request_id, "method": "GET", "url": url}


def _mail_filter(address: str) -> str:
    """``mail eq '...'`` with the address quoted for OData (a quote is doubled)."""
    return "mail eq '" + address.replace("'", "''") + "'"


class _Failed(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code


def _person_failed(lookup: int, failed: _Failed, *, using_cache: bool) -> None:
    # The lookup's position, not the id: ids are addresses, often families'.
    log.warning(
        "directory.person_failed",
        lookup=lookup,
        status=failed.status,
        code=failed.code,
        using_cache=using_cache,
    )


def _read_person(
    lookup: int,
    staff_id: str,
    user: Mapping[str, Any] | None,
    manager: Mapping[str, Any] | None,
    cached: set[str],
) -> Person | None:
    """The Person, or None (logged) when an answer failed; raises _NotFound."""
    try:
        person = _person(staff_id, user, manager)
    except _Failed as failed:
        _person_failed(lookup, failed, using_cache=staff_id in cached)
        return None
    log.debug("directory.fetched", staff_id=staff_id, name=person.name)
    return person


def _failure(answer: Mapping[str, Any] | None) -> _Failed:
    if answer is None:
        return _Failed(0, "no answer")
    body = answer.get("body")
    error = body.get("error", {}) if isinstance(body, dict) else {}
    return _Failed(int(answer.get("status") or 0), str(error.get("code", "")))


def _person(
    staff_id: str, user: Mapping[str, Any] | None, manager: Mapping[str, Any] | None
) -> Person:
    """The Person from the two inner ``$batch`` answers; raises _NotFound or _Failed."""
    if user is None or user.get("status") != 200:
        if user is not None and user.get("status") == 404:
            raise _NotFound(staff_id)
        raise _failure(user)
    if manager is None or manager.get("status") not in (200, 404):
        raise _failure(manager)  # an unknown manager is not "no manager": keep the cache
    body = user.get("body") or {}
    phones = [p for p in body.get("businessPhones") or [] if p]
    manager_id: str | None = None
    if manager.get("status") == 200:
        boss = manager.get("body") or {}
        address = boss.get("mail") or boss.get("userPrincipalName") or boss.get("id")
        manager_id = str(address).lower() if address else None
    return Person(
        id=staff_id,
        name=str(body.get("displayName") or ""),
        email=str(body.get("mail") or "").lower(),
        mobile=str(body.get("mobilePhone") or ""),
        manager_id=manager_id,
        phone=str(phones[0]) if phones else "",
    )
