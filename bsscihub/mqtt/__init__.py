"""The MQTT side of the hub: paho-mqtt driven by the reactor, the durable outbox and the bridge."""
