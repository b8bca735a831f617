"""The gate-controller family: Raspberry Pi gate units that register over REST and talk over MQTT.

Registry, per-unit broker credentials, command relay, app access, sharing tokens and signed file URLs.
"""
