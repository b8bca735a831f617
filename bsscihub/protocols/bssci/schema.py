"""The mioty family's tables: base stations, sensors, uplink copies, downlinks (revoked certificate
serials live in the hub's core `revoked_certs`, shared with the web's certificate pages).

EUIs are stored as 16 lower-case hex digits (an EUI64 overflows a signed 64-bit column); flags are 0/1 integers.
"""

from bsscihub.store import Migration

MIGRATIONS = [
    Migration(
        "mioty",
        1,
        """
        CREATE TABLE mioty_base_stations (
            eui TEXT PRIMARY KEY,
            vendor TEXT,
            model TEXT,
            name TEXT,
            sw_version TEXT,
            version TEXT,
            bidi INTEGER NOT NULL DEFAULT 0,
            geo TEXT,
            peer TEXT,
            cert_serial TEXT,
            cert_subject TEXT,
            first_seen {real} NOT NULL,
            last_seen {real} NOT NULL,
            online INTEGER NOT NULL DEFAULT 0,
            since {real} NOT NULL,
            last_status TEXT,
            status_time {real},
            revoked INTEGER NOT NULL DEFAULT 0,
            revoked_reason TEXT,
            revoked_at {real}
        );
        CREATE TABLE mioty_revoked_certs (
            serial TEXT PRIMARY KEY,
            bs_eui TEXT,
            reason TEXT NOT NULL,
            revoked_at {real} NOT NULL
        );
        CREATE TABLE mioty_sensors (
            eui TEXT PRIMARY KEY,
            nw_key {blob} NOT NULL,
            short_addr INTEGER NOT NULL,
            bidi INTEGER NOT NULL,
            dual_chan INTEGER NOT NULL DEFAULT 0,
            repetition INTEGER NOT NULL DEFAULT 0,
            wide_carr_off INTEGER NOT NULL DEFAULT 0,
            long_blk_dist INTEGER NOT NULL DEFAULT 0,
            ep_class TEXT,
            sync_burst INTEGER,
            attached INTEGER NOT NULL DEFAULT 1,
            attached_at {real},
            attach_cnt {bigint},
            last_packet_cnt {bigint},
            last_seen {real},
            best_bs TEXT,
            best_snr {real},
            created_at {real} NOT NULL,
            config_rev {bigint} NOT NULL
        );
        CREATE INDEX mioty_sensors_rev ON mioty_sensors (config_rev);
        CREATE TABLE mioty_meta (
            name TEXT PRIMARY KEY,
            value {bigint} NOT NULL
        );
        INSERT INTO mioty_meta (name, value) VALUES ('sensor_rev', 0);
        CREATE TABLE mioty_uplinks (
            id {pk},
            ep_eui TEXT NOT NULL,
            packet_cnt {bigint} NOT NULL,
            bs_eui TEXT NOT NULL,
            received {real} NOT NULL,
            rx_time {bigint} NOT NULL,
            rx_duration {bigint},
            snr {real} NOT NULL,
            rssi {real} NOT NULL,
            eq_snr {real},
            profile TEXT,
            mode TEXT,
            subpackets TEXT,
            data {blob} NOT NULL,
            format {bigint} NOT NULL,
            dl_open INTEGER NOT NULL,
            response_exp INTEGER NOT NULL,
            dl_ack INTEGER NOT NULL,
            published INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX mioty_uplinks_ep ON mioty_uplinks (ep_eui, received);
        CREATE INDEX mioty_uplinks_received ON mioty_uplinks (received);
        CREATE INDEX mioty_uplinks_unpublished ON mioty_uplinks (ep_eui, packet_cnt) WHERE published = 0;
        CREATE TABLE mioty_downlinks (
            id {pk},
            ep_eui TEXT NOT NULL,
            data {blob} NOT NULL,
            format {bigint},
            prio {real},
            response_exp INTEGER,
            created {real} NOT NULL,
            actor TEXT NOT NULL,
            targets TEXT NOT NULL,
            status TEXT NOT NULL,
            result_bs TEXT,
            tx_time {bigint},
            packet_cnt {bigint},
            error TEXT,
            acked INTEGER NOT NULL DEFAULT 0,
            updated {real} NOT NULL
        );
        CREATE INDEX mioty_downlinks_ep ON mioty_downlinks (ep_eui, id)
        """,
    ),
    Migration(
        "mioty",
        2,
        # Revoked serials move to the core table, so that a revocation made while this family was
        # not running (from the web, say) is still refused when it starts. '0x1a2b' -> '1a2b'.
        """
        INSERT INTO revoked_certs (serial, reason, revoked_at, actor)
            SELECT substr(serial, 3), reason, revoked_at, 'mioty' FROM mioty_revoked_certs WHERE true
            ON CONFLICT (serial) DO NOTHING;
        DROP TABLE mioty_revoked_certs
        """,
    ),
    Migration(
        "mioty",
        3,
        # Downlinks: how many times each was handed to a station (it is queued again whenever a
        # station drops it); the pending ones are read at every start.
        """
        ALTER TABLE mioty_downlinks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX mioty_downlinks_status ON mioty_downlinks (status)
        """,
    ),
    Migration(
        "mioty",
        4,
        # The network session key an over-the-air attach derives: what attPrp propagates for the end
        # point from then on, so it must outlive a restart. NULL: provisioned, propagate nw_key.
        "ALTER TABLE mioty_sensors ADD COLUMN sn_key {blob}",
    ),
    Migration(
        "mioty",
        5,
        # The hub that keeps each pending downlink (moves it through its states): one hub at a time in
        # a cluster, changed only by a conditional write. NULL: nobody keeps it (the next to look takes it).
        "ALTER TABLE mioty_downlinks ADD COLUMN node TEXT",
    ),
    Migration(
        "mioty",
        6,
        # A cluster: when the lease holder last warned about a sensor's silence (a hub taking the lease
        # over does not warn again about it; NULL: never, or one hub, which keeps that in memory), and
        # the hub that wrote the configuration last (NULL: no hub, e.g. `sensors import`): it reported it.
        """
        ALTER TABLE mioty_sensors ADD COLUMN warned_at {real};
        ALTER TABLE mioty_sensors ADD COLUMN config_node TEXT
        """,
    ),
]
