"""``edge-agent``: the device daemon, and nothing else.

===============  =============================================================
``agent``        the serving core: predict, record, profile, close windows
``model``        a verified bundle loaded into onnxruntime
``daemon``       ``edge-agent run``: the threads that wire the parts together
``installer``    the daemon's bundle installer: verify, load, download, fall back
``windows``      the daemon's report loop: summaries, checkpoints, heartbeats
``reconcile``    the pure desired-state step (install, switch, roll back, shadow)
``slots``        the bundle slots on disk and the atomic switch between them
``download``     a bounded, digest-checked bundle download
``outbox``       the durable SQLite outbox
``predictions``  the prediction store: predictions by id, joined with outcomes
``mqtt``         the one paho-mqtt adapter
``httpapi``      the local HTTP endpoint for apps on the device
``config``       the typed TOML configuration
``cli``          the ``edge-agent`` command
``errors``       the agent's error tree (contract errors are in :mod:`edgefleet.contract`)
===============  =============================================================

The formats it shares with edgepack and the fleet server are in :mod:`edgefleet.contract`.
Importing this package never imports scikit-learn, skl2onnx, pandas or fastapi (a test
checks it): a device installs ``edgefleet[agent]`` only.
"""

__all__ = ["agent", "cli", "config", "daemon", "download", "errors", "httpapi", "installer",
           "model", "mqtt", "outbox", "predictions", "reconcile", "slots", "windows"]
