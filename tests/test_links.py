"""Signed links: what a token grants, and every way a token is refused."""

from __future__ import annotations

import base64
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from visitwatch.core.options import Secret
from visitwatch.daemon.web.links import (
    KEY_FILE,
    OLD_KEY_ENV,
    OLD_KEY_FILE,
    LinkError,
    Links,
    Purpose,
    Signer,
    load_keys,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=3)
ASHA = "asha.khan@example.org"


def test_a_token_grants_its_visit_and_person_until_it_expires() -> None:
    """A valid token names its purpose, visit, person and expiry, and nothing else."""
    signer = Signer(["k1"])
    token = signer.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    grant = signer.read(Purpose.CHECKIN, token, NOW)
    assert (grant.purpose, grant.visit_id, grant.person) == (Purpose.CHECKIN, "visit-a", ASHA)
    assert grant.expires == LATER


@pytest.mark.parametrize("where", [0, 10, -3])
def test_an_altered_token_is_refused(where: int) -> None:
    """Changing any character of a token (payload or signature) makes it invalid."""
    signer = Signer(["k1"])
    token = signer.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    chars = list(token)
    chars[where] = "A" if chars[where] != "A" else "B"
    with pytest.raises(LinkError) as err:
        signer.read(Purpose.CHECKIN, "".join(chars), NOW)
    assert "not valid" in err.value.reason


def test_a_token_for_another_visit_cannot_be_made_by_editing_the_payload() -> None:
    """Splicing two valid tokens, or changing any one character, breaks the token."""
    signer = Signer(["k1"])
    token_a = signer.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    token_b = signer.sign(Purpose.CHECKIN, "visit-b", ASHA, LATER)
    half = len(token_b) // 2
    flipped = token_a[:half] + ("A" if token_a[half] != "A" else "B") + token_a[half + 1 :]
    for forged in (token_b[:half] + token_a[half:], flipped):
        with pytest.raises(LinkError):
            signer.read(Purpose.CHECKIN, forged, NOW)


def test_a_token_is_opaque() -> None:
    """Nothing in a link reveals who it is for or which visit: no address in a proxy log."""
    token = Signer(["k1"]).sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for secret in (ASHA, ASHA.split("@")[0], "visit-a"):
        assert secret not in token and secret.encode() not in decoded


def test_a_forged_token_signed_with_another_key_is_refused() -> None:
    """A token signed with a key we do not hold is not valid."""
    token = Signer(["someone-elses-key"]).sign(Purpose.ACK, "visit-a", ASHA, LATER)
    with pytest.raises(LinkError) as err:
        Signer(["k1"]).read(Purpose.ACK, token, NOW)
    assert "not valid" in err.value.reason


def test_an_expired_token_says_so() -> None:
    """At and after its expiry a token is refused with "expired"."""
    signer = Signer(["k1"])
    token = signer.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    assert signer.read(Purpose.CHECKIN, token, LATER - timedelta(seconds=1))
    for moment in (LATER, LATER + timedelta(days=1)):
        with pytest.raises(LinkError) as err:
            signer.read(Purpose.CHECKIN, token, moment)
        assert err.value.reason == "this link has expired"


@pytest.mark.parametrize(
    ("signed", "read"),
    [
        (Purpose.CHECKIN, Purpose.ACK),
        (Purpose.ACK, Purpose.CHECKIN),
        (Purpose.CHECKIN, Purpose.SESSION),
        (Purpose.SIGN_IN, Purpose.SESSION),
    ],
)
def test_a_token_only_serves_its_own_purpose(signed: Purpose, read: Purpose) -> None:
    """A check-in token cannot acknowledge, nor open a board session, and so on."""
    signer = Signer(["k1"])
    token = signer.sign(signed, "visit-a", ASHA, LATER)
    with pytest.raises(LinkError):
        signer.read(read, token, NOW)


def test_garbage_is_a_link_error_not_a_crash() -> None:
    """Empty, truncated and random tokens are all LinkErrors with a reason to show."""
    signer = Signer(["k1"])
    token = signer.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    for bad in ("", "x", token[: len(token) // 2], "a.b.c", "%%%"):
        with pytest.raises(LinkError) as err:
            signer.read(Purpose.CHECKIN, bad, NOW)
        assert err.value.reason


def test_links_point_at_the_public_pages_and_expire_after_the_deadline() -> None:
    """Links.checkin/ack build /v/ and /a/ under public_base_url, valid until deadline + ttl."""
    signer = Signer(["k1"])
    links = Links(signer, "https://vw.example.org/", timedelta(hours=24))
    deadline = NOW + timedelta(hours=1)
    checkin = links.checkin("visit-a", ASHA, deadline, NOW)
    ack = links.ack("visit-a", "maria.jones@example.org", deadline, NOW)
    assert checkin.startswith("https://vw.example.org/v/")
    assert ack.startswith("https://vw.example.org/a/")
    grant = signer.read(Purpose.CHECKIN, checkin.rsplit("/", 1)[1], NOW)
    assert grant.expires == deadline + timedelta(hours=24)
    assert signer.read(Purpose.ACK, ack.rsplit("/", 1)[1], NOW).person == "maria.jones@example.org"


def test_the_key_file_is_created_owner_only_and_kept(tmp_path: Path) -> None:
    """On first start a 0600 key file is generated in the state dir; later starts reuse it."""
    state = tmp_path / "state"
    keys = load_keys(None, state)
    path = state / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(keys) == 1 and len(keys[0]) >= 40
    assert load_keys(None, state) == keys


def test_a_key_file_left_world_readable_is_made_owner_only(tmp_path: Path) -> None:
    """A key file someone loosened is tightened to 0600 on the next start."""
    load_keys(None, tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    load_keys(None, tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_rotation_keeps_old_links_working_and_signs_new_ones_with_the_new_key(
    tmp_path: Path,
) -> None:
    """After moving the key to .old, old links still verify; new links use only the new key."""
    old_signer = Signer(load_keys(None, tmp_path))
    old_token = old_signer.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    (tmp_path / KEY_FILE).rename(tmp_path / OLD_KEY_FILE)
    rotated = Signer(load_keys(None, tmp_path))
    assert len(rotated.keys) == 2
    assert rotated.read(Purpose.CHECKIN, old_token, NOW).visit_id == "visit-a"
    new_token = rotated.sign(Purpose.CHECKIN, "visit-a", ASHA, LATER)
    with pytest.raises(LinkError):
        old_signer.read(Purpose.CHECKIN, new_token, NOW)  # signed with the new key only
    (tmp_path / OLD_KEY_FILE).unlink()
    retired = Signer(load_keys(None, tmp_path))
    with pytest.raises(LinkError):
        retired.read(Purpose.CHECKIN, old_token, NOW)  # the old key is gone: so are its links


def test_an_old_key_from_the_environment_still_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VISITWATCH_OLD_SIGNING_KEY keeps links signed with a configured key that was replaced."""
    old_token = Signer(["old-configured"]).sign(Purpose.ACK, "visit-a", ASHA, LATER)
    monkeypatch.setenv(OLD_KEY_ENV, "old-configured")
    signer = Signer(load_keys(Secret("new-configured", "test"), tmp_path))
    assert signer.read(Purpose.ACK, old_token, NOW).visit_id == "visit-a"
    assert not (tmp_path / KEY_FILE).exists()  # a configured key: no file generated
