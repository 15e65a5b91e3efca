"""`ota-fleet`: the operator's side. `serve` (a lab bundle server with Range
support) lives here now; deploy/status over MQTT join it with the daemon work."""
