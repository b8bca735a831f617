"""The `devices` family: generic MQTT devices (ESP32, Arduino, Raspberry Pi) sending telemetry and status.

Also commands to devices with tracked results, device API keys for HTTPS ingestion and OTA firmware offers.
"""
