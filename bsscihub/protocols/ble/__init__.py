"""The BLE family: gateways that scan BLE beacons and publish what they hear over MQTT.

Beacons heard by several gateways within `ble.dedup_window` become one reading, nearest gateway first.
"""
