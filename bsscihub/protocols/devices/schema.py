"""Tables of the `devices` family: the registry, telemetry samples, commands, device keys, firmware, OTA.

Telemetry is one row per value; (device, type, time) is indexed for range queries and bucketed charts.
"""

from bsscihub.store import Migration

MIGRATIONS = [
    Migration(
        "devices",
        1,
        """
        CREATE TABLE dev_devices (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            first_seen {real} NOT NULL,
            last_seen {real},
            registered_via TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT '',
            status_detail TEXT NOT NULL DEFAULT '{}',
            status_time {real},
            firmware TEXT NOT NULL DEFAULT '',
            messages {bigint} NOT NULL DEFAULT 0
        );
        CREATE TABLE dev_telemetry (
            device TEXT NOT NULL,
            type TEXT NOT NULL,
            time {real} NOT NULL,
            value {real} NOT NULL
        );
        CREATE INDEX dev_telemetry_series ON dev_telemetry (device, type, time);
        CREATE INDEX dev_telemetry_time ON dev_telemetry (time);
        CREATE TABLE dev_commands (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            name TEXT NOT NULL,
            args TEXT NOT NULL,
            state TEXT NOT NULL,
            result TEXT,
            error TEXT,
            created_at {real} NOT NULL,
            deadline {real} NOT NULL,
            answered_at {real},
            actor TEXT NOT NULL
        );
        CREATE INDEX dev_commands_device ON dev_commands (device, created_at);
        CREATE INDEX dev_commands_state ON dev_commands (state);
        CREATE TABLE dev_keys (
            device TEXT PRIMARY KEY,
            prefix TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            created_at {real} NOT NULL,
            last_used_at {real}
        );
        CREATE TABLE dev_firmware (
            id {pk},
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL UNIQUE,
            size {bigint} NOT NULL,
            created_at {real} NOT NULL,
            actor TEXT NOT NULL
        );
        CREATE TABLE dev_ota (
            id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            firmware {bigint} NOT NULL,
            token_hash TEXT NOT NULL,
            state TEXT NOT NULL,
            progress INTEGER NOT NULL DEFAULT 0,
            error TEXT NOT NULL DEFAULT '',
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            deadline {real} NOT NULL,
            actor TEXT NOT NULL
        );
        CREATE INDEX dev_ota_device ON dev_ota (device, created_at)
        """,
    ),
    Migration(
        "devices",
        2,
        """
        ALTER TABLE dev_ota ADD COLUMN url TEXT;
        ALTER TABLE dev_ota ADD COLUMN version TEXT;
        ALTER TABLE dev_ota ADD COLUMN checksum TEXT
        """,
    ),
    Migration(
        "devices",
        3,
        """
        CREATE TABLE dev_org_keys (
            id {pk},
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            created_at {real} NOT NULL,
            created_by TEXT NOT NULL,
            revoked_at {real},
            last_used_at {real},
            registrations {bigint} NOT NULL DEFAULT 0
        )
        """,
    ),
    # Firmware images in the database, a part per row, so that every hub of a cluster serves them and
    # streams them out a part at a time (they were files in one hub's data_dir/firmware).
    Migration(
        "devices",
        4,
        """
        CREATE TABLE dev_firmware_parts (
            sha256 TEXT NOT NULL,
            part INTEGER NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (sha256, part)
        )
        """,
    ),
    # The image parts move into the core blob store (bsscihub.blobs, core migration `blobs` 1), which the
    # gate family's files share: one part logic for every family.
    Migration(
        "devices",
        5,
        """
        INSERT INTO blob_parts (owner, blob_id, part, data)
            SELECT 'devices.firmware', sha256, part, data FROM dev_firmware_parts;
        DROP TABLE dev_firmware_parts
        """,
    ),
]
