"""The record's schema, as named migrations.

Each migration runs once, in its own transaction, in this order (:meth:`Store.migrate`).
Append new ones; never edit one that has shipped.

``audit`` is append-only, enforced by triggers. Times are fixed-width UTC text, so string
order is time order and the deadline indexes sort correctly.
"""

from __future__ import annotations

# Ordered and named; each runs once, in its own transaction. Append, never edit.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE visits (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            uid TEXT NOT NULL,
            recurrence_id TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            worker_id TEXT NOT NULL DEFAULT '',
            worker_label TEXT NOT NULL DEFAULT '',
            worker_known INTEGER NOT NULL DEFAULT 0,
            subject TEXT NOT NULL DEFAULT '',
            address TEXT NOT NULL DEFAULT '',
            private INTEGER NOT NULL DEFAULT 0,
            start TEXT NOT NULL,
            "end" TEXT NOT NULL,
            expected_return TEXT,
            expected_return_from TEXT NOT NULL DEFAULT '',
            extended_until TEXT,
            deadline TEXT,
            risk_assessment TEXT NOT NULL DEFAULT '',
            risk_assessment_complete INTEGER NOT NULL DEFAULT 0,
            worker_mobile TEXT NOT NULL DEFAULT '',
            second_worker TEXT NOT NULL DEFAULT '',
            pair_required INTEGER NOT NULL DEFAULT 0,
            going_home_after INTEGER NOT NULL DEFAULT 0,
            findings TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            repeats INTEGER NOT NULL DEFAULT 0,
            prestart_notice_sent INTEGER NOT NULL DEFAULT 0,
            next_action_at TEXT,
            version INTEGER NOT NULL DEFAULT 0,
            help_requested_at TEXT,
            checked_in_at TEXT,
            checked_in_by TEXT,
            acknowledged_at TEXT,
            acknowledged_by TEXT,
            ended_at TEXT,
            event_fingerprint TEXT NOT NULL DEFAULT '',
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            updated TEXT NOT NULL,
            UNIQUE (source, uid, recurrence_id)
        );
        -- The sweep asks "what needs attention now?" through this index only, so its cost
        -- follows the number of due visits, not the size of the history.
        CREATE INDEX visits_next_action ON visits (next_action_at)
            WHERE next_action_at IS NOT NULL;
        CREATE INDEX visits_source_start ON visits (source, start);
        CREATE INDEX visits_start ON visits (start);

        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            visit_id TEXT,
            at TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT,
            cause TEXT NOT NULL,
            actor TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_visit ON audit (visit_id, id);
        -- The record is append-only: history cannot be edited, only added to.
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit record is append-only'); END;
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit record is append-only'); END;

        CREATE TABLE checkins (
            id INTEGER PRIMARY KEY,
            visit_id TEXT NOT NULL,
            at TEXT NOT NULL,
            action TEXT NOT NULL,
            actor TEXT NOT NULL,
            via TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX checkins_visit ON checkins (visit_id);

        CREATE TABLE notifications (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            visit_id TEXT,
            kind TEXT NOT NULL,
            recipient_id TEXT NOT NULL,
            recipient_name TEXT NOT NULL,
            recipient_email TEXT NOT NULL DEFAULT '',
            recipient_mobile TEXT NOT NULL DEFAULT '',
            recipient_relation TEXT NOT NULL DEFAULT '',
            channel TEXT NOT NULL,
            subject TEXT NOT NULL,
            text TEXT NOT NULL,
            created TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT,
            last_error TEXT,
            sent_at TEXT,
            fallback_of INTEGER
        );
        CREATE INDEX notifications_pending ON notifications (next_attempt_at)
            WHERE status = 'pending';
        CREATE INDEX notifications_visit ON notifications (visit_id);

        CREATE TABLE sources (
            name TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            last_attempt_at TEXT,
            last_success_at TEXT,
            last_error TEXT,
            failures INTEGER NOT NULL DEFAULT 0,
            fingerprint TEXT,
            processed_at TEXT,
            events INTEGER NOT NULL DEFAULT 0,
            visits INTEGER NOT NULL DEFAULT 0
        );

        CREATE TABLE problems (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            uid TEXT NOT NULL,
            reason TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            UNIQUE (source, uid, reason)
        );

        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    ),
    (
        "0002_failed_notifications_index",
        """
        -- The health check looks for recent failed deliveries after every sweep.
        CREATE INDEX notifications_failed ON notifications (created) WHERE status = 'failed';
        CREATE INDEX notifications_fallback_of ON notifications (fallback_of)
            WHERE fallback_of IS NOT NULL;
        """,
    ),
    (
        "0003_acknowledgement_timeout",
        """
        -- An acknowledgement times out: how many times an unresolved acknowledged visit has
        -- been re-alerted since the acknowledgement (lifecycle.plan counts from it).
        ALTER TABLE visits ADD COLUMN ack_realerts INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        "0004_pending_notifications_by_created",
        """
        -- The dispatcher looks for notifications waiting past the delivery deadline on every
        -- pass: through this index its cost follows what is pending, not the history.
        CREATE INDEX notifications_pending_created ON notifications (created)
            WHERE status = 'pending';
        """,
    ),
    (
        "0005_calendar_safety",
        """
        -- A read that would remove many of a source's visits is held, not applied (sync.py):
        -- which visits it would remove (JSON ids), since when, out of how many, and whether
        -- an admin confirmed it (`visitwatch sources confirm NAME`).
        ALTER TABLE sources ADD COLUMN held_removals TEXT;
        ALTER TABLE sources ADD COLUMN held_since TEXT;
        ALTER TABLE sources ADD COLUMN held_live INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE sources ADD COLUMN held_confirmed_at TEXT;
        ALTER TABLE sources ADD COLUMN held_confirmed_by TEXT;
        -- Reads in a row that were incomplete (cut short, damaged): they never remove visits.
        ALTER TABLE sources ADD COLUMN incomplete INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE sources ADD COLUMN incomplete_since TEXT;
        ALTER TABLE sources ADD COLUMN incomplete_reason TEXT;
        -- A started visit whose entry left the calendar: still watched, people were asked.
        ALTER TABLE visits ADD COLUMN removed_at TEXT;
        -- The entry's categories at the last read (JSON): a check-in or help category counts
        -- only when it is new since then, never judged by modification times.
        ALTER TABLE visits ADD COLUMN categories TEXT;
        """,
    ),
    (
        "0006_web_used_nonces",
        """
        -- Board sign-in (daemon/web): the nonces of one-time sign-in links already used, and
        -- of board sessions signed out, so neither works again. Rows past ``expires`` are
        -- of no further use (the token itself has expired) and are deleted.
        CREATE TABLE web_used_nonces (
            nonce TEXT PRIMARY KEY,
            purpose TEXT NOT NULL,
            used_at TEXT NOT NULL,
            expires TEXT NOT NULL
        );
        CREATE INDEX web_used_nonces_expires ON web_used_nonces (expires);
        """,
    ),
    (
        "0007_texts_and_short_links",
        """
        -- A text message's words (two SMS segments, GSM-7) and the page a message points to,
        -- next to the e-mail's subject and text (routing.py writes all of them at once).
        ALTER TABLE notifications ADD COLUMN short TEXT NOT NULL DEFAULT '';
        ALTER TABLE notifications ADD COLUMN link TEXT NOT NULL DEFAULT '';
        -- Short links for texts (daemon/web/short_links.py): a signed link is ~250
        -- characters, most of a two-segment text. A random code stands in for it; only the
        -- code's SHA-256 is kept, so the table alone opens nothing without the token, which
        -- is kept to redirect to. Rows past ``expires`` are deleted.
        CREATE TABLE short_links (
            code_hash TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            created TEXT NOT NULL,
            expires TEXT NOT NULL
        );
        CREATE INDEX short_links_expires ON short_links (expires);
        """,
    ),
    (
        "0008_channel_health",
        """
        -- Each channel's health, as Healthchecks keeps per integration (channel_health.py):
        -- failing since when (NULL: healthy), the last error (ConnectorError text, written
        -- without personal data), the last success, counts, and the announced outage
        -- episode (``outage_since``: one admin notice when it opens, one when it ends).
        CREATE TABLE channel_health (
            channel TEXT PRIMARY KEY,
            failing_since TEXT,
            last_error TEXT,
            last_error_at TEXT,
            last_success TEXT,
            sent INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            consecutive_failures INTEGER NOT NULL DEFAULT 0,
            recipient_failures INTEGER NOT NULL DEFAULT 0,
            outage_since TEXT
        );
        -- Outages announced before this table existed were kept in meta.
        INSERT INTO channel_health (channel, failing_since, outage_since)
            SELECT substr(key, 8), value, value FROM meta WHERE key LIKE 'outage:%';
        DELETE FROM meta WHERE key LIKE 'outage:%';
        -- A row that failed for good by its channel's fault during an outage belongs to that
        -- outage (its outage_since): the admins hear of it with the outage, not one by one;
        -- ``outage_named`` is when a notice named it (it reached nobody another way).
        ALTER TABLE notifications ADD COLUMN outage TEXT;
        ALTER TABLE notifications ADD COLUMN outage_named TEXT;
        """,
    ),
    (
        "0009_retention",
        """
        -- Retention (daemon/retention.py). Each run is one transaction that opens a
        -- retention_runs row, does its work and closes the row before it commits: an open
        -- row exists only inside that transaction, and only then may the audit and the
        -- check-ins be anonymised (to the fixed values below) or, once anonymised and older
        -- than the run's statistics cutoff, deleted. Every run also writes an audit line.
        CREATE TABLE retention_runs (
            id INTEGER PRIMARY KEY,
            started TEXT NOT NULL,
            finished TEXT,
            personal_cutoff TEXT NOT NULL,
            incident_cutoff TEXT NOT NULL,
            statistics_cutoff TEXT NOT NULL,
            body_cutoff TEXT NOT NULL,
            actor TEXT NOT NULL,
            counts TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TRIGGER retention_runs_one_open BEFORE INSERT ON retention_runs
            WHEN EXISTS (SELECT 1 FROM retention_runs WHERE finished IS NULL)
            BEGIN SELECT RAISE(ABORT, 'a retention run is already open'); END;
        CREATE TRIGGER retention_runs_closed BEFORE UPDATE ON retention_runs
            WHEN OLD.finished IS NOT NULL OR NEW.finished IS NULL OR NEW.id IS NOT OLD.id
                OR NEW.started IS NOT OLD.started OR NEW.actor IS NOT OLD.actor
                OR NEW.personal_cutoff IS NOT OLD.personal_cutoff
                OR NEW.incident_cutoff IS NOT OLD.incident_cutoff
                OR NEW.statistics_cutoff IS NOT OLD.statistics_cutoff
                OR NEW.body_cutoff IS NOT OLD.body_cutoff
            BEGIN SELECT RAISE(ABORT, 'a retention run is closed once, and never changed'); END;
        CREATE TRIGGER retention_runs_no_delete BEFORE DELETE ON retention_runs
            BEGIN SELECT RAISE(ABORT, 'the record of retention runs is append-only'); END;

        -- When retention anonymised a row (the run's start); NULL: never.
        ALTER TABLE visits ADD COLUMN anonymised TEXT;
        ALTER TABLE audit ADD COLUMN anonymised TEXT;
        ALTER TABLE checkins ADD COLUMN anonymised TEXT;
        ALTER TABLE notifications ADD COLUMN anonymised TEXT;
        -- When a notification's words (subject, text, short, link) were removed.
        ALTER TABLE notifications ADD COLUMN body_removed TEXT;
        -- Retention's daily questions, answered from the rows still to do, not the history.
        CREATE INDEX visits_unanonymised ON visits ("end") WHERE anonymised IS NULL;
        CREATE INDEX audit_unanonymised ON audit (at) WHERE anonymised IS NULL;
        CREATE INDEX audit_anonymised ON audit (at) WHERE anonymised IS NOT NULL;
        CREATE INDEX checkins_unanonymised ON checkins (at) WHERE anonymised IS NULL;
        CREATE INDEX checkins_anonymised ON checkins (at) WHERE anonymised IS NOT NULL;
        CREATE INDEX notifications_unanonymised ON notifications (created)
            WHERE anonymised IS NULL;
        CREATE INDEX notifications_with_body ON notifications (created)
            WHERE body_removed IS NULL;

        -- The audit stays append-only. The one change allowed: inside an open retention
        -- run, a row older than its personal-data cutoff loses who acted (system actors
        -- stay) and its detail, to fixed values, and is marked with the run's start; what
        -- happened, when, and to which visit never change.
        DROP TRIGGER audit_no_update;
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            WHEN NOT EXISTS (
                SELECT 1 FROM retention_runs r WHERE r.finished IS NULL
                AND OLD.anonymised IS NULL AND NEW.anonymised IS r.started
                AND OLD.at < r.personal_cutoff
                AND NEW.id IS OLD.id AND NEW.visit_id IS OLD.visit_id AND NEW.at IS OLD.at
                AND NEW.from_state IS OLD.from_state AND NEW.to_state IS OLD.to_state
                AND NEW.cause IS OLD.cause
                AND (NEW.actor IS '(anonymised)'
                     OR (NEW.actor IS OLD.actor AND OLD.actor IN ('visitwatch', 'calendar')))
                AND NEW.detail IS '{}'
            )
            BEGIN SELECT RAISE(ABORT, 'the audit record is append-only'); END;
        -- Deleted only once anonymised, older than an open run's statistics cutoff.
        DROP TRIGGER audit_no_delete;
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            WHEN NOT EXISTS (
                SELECT 1 FROM retention_runs r WHERE r.finished IS NULL
                AND OLD.anonymised IS NOT NULL AND OLD.at < r.statistics_cutoff
            )
            BEGIN SELECT RAISE(ABORT, 'the audit record is append-only'); END;
        -- Check-ins (who checked in, how) become append-only on the same terms.
        CREATE TRIGGER checkins_no_update BEFORE UPDATE ON checkins
            WHEN NOT EXISTS (
                SELECT 1 FROM retention_runs r WHERE r.finished IS NULL
                AND OLD.anonymised IS NULL AND NEW.anonymised IS r.started
                AND OLD.at < r.personal_cutoff
                AND NEW.id IS OLD.id AND NEW.visit_id IS OLD.visit_id AND NEW.at IS OLD.at
                AND NEW.action IS OLD.action AND NEW.via IS OLD.via
                AND NEW.actor IS '(anonymised)' AND NEW.detail IS '{}'
            )
            BEGIN SELECT RAISE(ABORT, 'check-ins are append-only'); END;
        CREATE TRIGGER checkins_no_delete BEFORE DELETE ON checkins
            WHEN NOT EXISTS (
                SELECT 1 FROM retention_runs r WHERE r.finished IS NULL
                AND OLD.anonymised IS NOT NULL AND OLD.at < r.statistics_cutoff
            )
            BEGIN SELECT RAISE(ABORT, 'check-ins are append-only'); END;
        """,
    ),
]
