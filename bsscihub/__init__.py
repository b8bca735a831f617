"""bsscihub: a Twisted IoT hub for mioty base stations, BLE gateways, gate controllers and MQTT devices."""

__version__ = "0.1.0"
