"""What devices send, and the broker they send it through.

``link`` is the server's one MQTT connection; ``ingest`` validates, de-duplicates and
stores device messages in batches, ``folding`` folds their windows into rollups, and
``worker`` is the thread that drains the link into ``ingest``; ``broker`` writes the
Mosquitto configuration (accounts, ACLs, limits) for the fleet, ``mosquitto_conf`` the text
of its ``mosquitto.conf``. Nothing here judges what the data means: that is
:mod:`fleet_server.monitoring`.
"""

__all__ = ["broker", "folding", "ingest", "link", "worker"]
