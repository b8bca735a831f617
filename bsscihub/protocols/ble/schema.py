"""Tables of the BLE family: gateways, beacon nodes, readings (one per beacon broadcast) and samples.

Samples hold one row per quantity per reading: the time series that charts and range queries read.
"""

from bsscihub.store import Migration

MIGRATIONS = [
    Migration(
        "ble",
        1,
        """
        CREATE TABLE ble_gateways (
            id TEXT PRIMARY KEY,
            first_seen {real} NOT NULL,
            last_seen {real} NOT NULL,
            state TEXT NOT NULL,
            since {real} NOT NULL,
            messages {bigint} NOT NULL DEFAULT 0
        );
        CREATE TABLE ble_nodes (
            mac TEXT PRIMARY KEY,
            first_seen {real} NOT NULL,
            last_seen {real} NOT NULL,
            gateway TEXT NOT NULL,
            rssi INTEGER,
            readings {bigint} NOT NULL DEFAULT 0,
            last_values TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE ble_readings (
            id {pk},
            mac TEXT NOT NULL,
            time {real} NOT NULL,
            receivers TEXT NOT NULL,
            data TEXT NOT NULL
        );
        CREATE INDEX ble_readings_mac_time ON ble_readings (mac, time);
        CREATE INDEX ble_readings_time ON ble_readings (time);
        CREATE TABLE ble_samples (
            mac TEXT NOT NULL,
            quantity TEXT NOT NULL,
            time {real} NOT NULL,
            value {real} NOT NULL
        );
        CREATE INDEX ble_samples_series ON ble_samples (mac, quantity, time);
        CREATE INDEX ble_samples_time ON ble_samples (time)
        """,
    ),
]
