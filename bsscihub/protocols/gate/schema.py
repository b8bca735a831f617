"""The gate family's tables: units and their names, keys, status, commands, app access, shares, files.

History rows point at the unit's row id, never at its controller_id, so a rename keeps them all.
"""

from bsscihub.store import Migration

MIGRATIONS = [
    Migration(
        "gate",
        1,
        """
        CREATE TABLE gate_provisioning_keys (
            id {pk},
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            single_use INTEGER NOT NULL DEFAULT 0,
            created_at {real} NOT NULL,
            created_by TEXT NOT NULL,
            expires_at {real},
            revoked_at {real},
            uses INTEGER NOT NULL DEFAULT 0,
            last_used_at {real}
        );
        CREATE TABLE gate_units (
            id {pk},
            hardware_id TEXT NOT NULL UNIQUE,
            controller_id TEXT NOT NULL UNIQUE,
            firmware_version TEXT NOT NULL DEFAULT '',
            key_hash TEXT NOT NULL UNIQUE,
            registered_at {real} NOT NULL,
            rotated_at {real} NOT NULL,
            provisioning_key_id {bigint},
            last_seen {real},
            last_status TEXT,
            online INTEGER NOT NULL DEFAULT 0,
            online_since {real}
        );
        CREATE TABLE gate_names (
            id {pk},
            unit_id {bigint} NOT NULL REFERENCES gate_units(id) ON DELETE CASCADE,
            controller_id TEXT NOT NULL,
            started_at {real} NOT NULL,
            ended_at {real},
            actor TEXT NOT NULL
        );
        CREATE INDEX gate_names_unit ON gate_names (unit_id, started_at);
        CREATE TABLE gate_status (
            id {pk},
            unit_id {bigint} NOT NULL REFERENCES gate_units(id) ON DELETE CASCADE,
            time {real} NOT NULL,
            payload TEXT NOT NULL
        );
        CREATE INDEX gate_status_unit ON gate_status (unit_id, id);
        CREATE TABLE gate_commands (
            id TEXT PRIMARY KEY,
            unit_id {bigint} NOT NULL REFERENCES gate_units(id) ON DELETE CASCADE,
            command TEXT NOT NULL,
            args TEXT NOT NULL,
            actor TEXT NOT NULL,
            via TEXT NOT NULL,
            created_at {real} NOT NULL,
            deadline {real} NOT NULL,
            state TEXT NOT NULL,
            result TEXT,
            error TEXT,
            completed_at {real}
        );
        CREATE INDEX gate_commands_unit ON gate_commands (unit_id, created_at);
        CREATE INDEX gate_commands_state ON gate_commands (state);
        CREATE TABLE gate_app_access (
            id {pk},
            unit_id {bigint} NOT NULL REFERENCES gate_units(id) ON DELETE CASCADE,
            token_hash TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            level TEXT NOT NULL,
            via TEXT NOT NULL,
            share_id {bigint},
            created_at {real} NOT NULL,
            revoked_at {real},
            last_used_at {real},
            UNIQUE (unit_id, token_hash)
        );
        CREATE INDEX gate_app_access_token ON gate_app_access (token_hash);
        CREATE TABLE gate_shares (
            id {pk},
            unit_id {bigint} NOT NULL REFERENCES gate_units(id) ON DELETE CASCADE,
            prefix TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            level TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at {real} NOT NULL,
            expires_at {real} NOT NULL,
            revoked_at {real},
            used_by TEXT,
            used_at {real}
        );
        CREATE INDEX gate_shares_unit ON gate_shares (unit_id, created_at);
        CREATE TABLE gate_files (
            id TEXT PRIMARY KEY,
            unit_id {bigint} NOT NULL REFERENCES gate_units(id) ON DELETE CASCADE,
            direction TEXT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            max_size {bigint} NOT NULL,
            size {bigint},
            sha256 TEXT,
            created_at {real} NOT NULL,
            created_by TEXT NOT NULL,
            stored_at {real}
        );
        CREATE INDEX gate_files_unit ON gate_files (unit_id, created_at)
        """,
    ),
    Migration(
        "gate",
        2,
        """
        ALTER TABLE gate_commands ADD COLUMN relayed_at {real}
        """,
    ),
]
