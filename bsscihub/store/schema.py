"""The core schema (users, API keys, audit log); families bring their own migrations.

Dialect tokens ({pk}, {real}, {blob}, {bigint}) are replaced per backend by Store.migrate.
"""

from bsscihub.store import Migration

CORE_MIGRATIONS = [
    Migration(
        "core",
        1,
        """
        CREATE TABLE users (
            id {pk},
            name TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            created_at {real} NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE api_keys (
            id {pk},
            name TEXT NOT NULL,
            user_id {bigint} REFERENCES users(id) ON DELETE CASCADE,
            prefix TEXT NOT NULL UNIQUE,
            secret_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            created_at {real} NOT NULL,
            expires_at {real},
            revoked_at {real},
            last_used_at {real}
        );
        CREATE TABLE audit_log (
            id {pk},
            time {real} NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_log_time ON audit_log (time)
        """,
    ),
    # Web security and certificates: login tokens share api_keys (kind 'token' vs named 'key'),
    # the audit log gets indexes for its filters, issued and revoked certificates are recorded.
    Migration(
        "core",
        2,
        """
        ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'key';
        CREATE INDEX api_keys_user ON api_keys (user_id);
        CREATE INDEX audit_log_actor ON audit_log (actor, time);
        CREATE INDEX audit_log_action ON audit_log (action, time);
        CREATE TABLE issued_certs (
            serial TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            bs_eui TEXT,
            not_after {real} NOT NULL,
            issued_at {real} NOT NULL,
            actor TEXT NOT NULL
        );
        CREATE TABLE revoked_certs (
            serial TEXT PRIMARY KEY,
            reason TEXT NOT NULL DEFAULT '',
            revoked_at {real} NOT NULL,
            actor TEXT NOT NULL
        )
        """,
    ),
    # Certificates bound to a family's subject (bsscihub.pki.Binding) instead of a base-station EUI.
    # The table is rebuilt (SQLite before 3.35 cannot drop a column); the EUIs issued_certs held become
    # bssci.station bindings, and application-center certificates, recorded unbound until now, are
    # found by their audited issue (`certs issue-ac`, or the web's "kind": "application-center"; REPLACE,
    # not LIKE: a migration's statements go to the driver as they are, and psycopg reads % as a placeholder).
    Migration(
        "core",
        3,
        """
        CREATE TABLE issued_certs_v3 (
            serial TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            binding_kind TEXT,
            binding_subject TEXT NOT NULL DEFAULT '',
            not_after {real} NOT NULL,
            issued_at {real} NOT NULL,
            actor TEXT NOT NULL
        );
        INSERT INTO issued_certs_v3 (serial, name, binding_kind, binding_subject, not_after, issued_at, actor)
            SELECT serial, name, CASE WHEN bs_eui IS NULL THEN NULL ELSE 'bssci.station' END, COALESCE(bs_eui, ''),
                   not_after, issued_at, actor
            FROM issued_certs;
        UPDATE issued_certs_v3 SET binding_kind = 'scaci.ac'
            WHERE binding_kind IS NULL AND serial IN (
                SELECT target FROM audit_log WHERE action = 'cert.issue'
                AND (REPLACE(detail, '"applicationCenter": true', '') <> detail
                     OR REPLACE(detail, '"kind": "application-center"', '') <> detail));
        DROP TABLE issued_certs;
        ALTER TABLE issued_certs_v3 RENAME TO issued_certs;
        CREATE INDEX issued_certs_binding ON issued_certs (binding_kind, binding_subject)
        """,
    ),
    # The newest fencing token each leader lease wrote with (bsscihub.cluster.Fence): a cluster's stale leader's
    # writes are refused by the database.
    Migration(
        "core",
        4,
        """
        CREATE TABLE lease_fences (
            name TEXT PRIMARY KEY,
            token {bigint} NOT NULL
        )
        """,
    ),
    # The events a cluster's lease holder wrote and has not announced yet (bsscihub.cluster.LeaseEvents): a holder that
    # dies between its write and its publish leaves them to the next. Its own component, as web's.
    Migration(
        "lease_events",
        1,
        """
        CREATE TABLE lease_events (
            key TEXT PRIMARY KEY,
            lease TEXT NOT NULL,
            time {real} NOT NULL,
            family TEXT NOT NULL,
            kind TEXT NOT NULL,
            topic TEXT NOT NULL,
            payload TEXT NOT NULL,
            retain INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX lease_events_time ON lease_events (lease, time)
        """,
    ),
    # Admin sessions survive a restart: stored by the SHA-256 of the cookie value (bsscihub.web.sessions).
    # Its own component, so it never competes with a core version number.
    Migration(
        "web",
        1,
        """
        CREATE TABLE web_sessions (
            id_hash TEXT PRIMARY KEY,
            user_id {bigint} NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            csrf TEXT NOT NULL,
            created {real} NOT NULL,
            last_seen {real} NOT NULL,
            source TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX web_sessions_user ON web_sessions (user_id)
        """,
    ),
    # Registry edits (renames, removals) a cluster's other hubs re-read: bsscihub.registry_sync.
    Migration(
        "registry",
        1,
        """
        CREATE TABLE registry_changes (
            id {pk},
            family TEXT NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            node TEXT NOT NULL,
            time {real} NOT NULL
        );
        CREATE INDEX registry_changes_time ON registry_changes (family, time)
        """,
    ),
    # The files families keep, a part per row: bsscihub.blobs.
    Migration(
        "blobs",
        1,
        """
        CREATE TABLE blob_parts (
            owner TEXT NOT NULL,
            blob_id TEXT NOT NULL,
            part INTEGER NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (owner, blob_id, part)
        )
        """,
    ),
]
