"""MQTT bridge: IIoT messages in, pipeline inference, results out (see docs/mqtt.md)."""
