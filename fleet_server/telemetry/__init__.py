"""What devices send, and the broker they send it through.

``link`` is the server's one MQTT connection; ``ingest`` validates, de-duplicates and
stores device messages in batches and folds summaries into rollups; ``broker`` writes the
Mosquitto configuration (accounts, ACLs, limits) for the fleet, ``mosquitto_conf`` the text
of its ``mosquitto.conf``. Nothing here judges what the data means: that is
:mod:`fleet_server.monitoring`.
"""

__all__ = ["broker", "ingest", "link"]
