"""``edge-agent``: the device daemon, and nothing else.

================= ============================================================
``agent``         the serving core: predict, record, profile, close windows
``window``        the open window, and what the profiling worker does with a chunk
``shadow_labels`` the shadow's and the live model's labels by id, paired when outcomes come
``explain``       one prediction explained (exact for linear models, else by substitution)
``model``         a verified bundle loaded into onnxruntime
``daemon``        ``edge-agent run``: the threads that wire the parts together
``installer``     the daemon's bundle installer: verify, load, download, fall back
``reporting``     the daemon's report loop: summaries, checkpoints, heartbeats
``reconcile``     the pure desired-state step (install, switch, roll back, shadow)
``slots``         the bundle slots on disk and the atomic switch between them
``download``      a bounded, digest-checked bundle download
``outbox``        the durable SQLite outbox
``predictions``   the prediction store: predictions by id, joined with outcomes
``claims``        the store's outcome counts by reason, and the labelled rows a summary claims
``answers``       what predict returns: the result, prediction ids made or checked
``labels``        one rule matching a label with a bundle's classes (1, 1.0 and "1" alike)
``capture``       data capture: a sample of served rows, uploaded over HTTPS in batches
``mqtt``          the one paho-mqtt adapter
``httpapi``       the local HTTP endpoint for apps on the device
``config``        the typed TOML configuration
``cli``           the ``edge-agent`` command
``errors``        the agent's error tree (contract errors are in :mod:`edgefleet.contract`)
================= ============================================================

The formats it shares with edgepack and the fleet server are in :mod:`edgefleet.contract`.
Importing this package never imports scikit-learn, skl2onnx, pandas or fastapi (a test
checks it): a device installs ``edgefleet[agent]`` only.
"""

__all__ = ["agent", "answers", "capture", "claims", "cli", "config", "daemon", "download",
           "errors", "explain", "httpapi", "installer", "labels", "model", "mqtt", "outbox",
           "predictions", "reconcile", "reporting", "shadow_labels", "slots", "window"]
