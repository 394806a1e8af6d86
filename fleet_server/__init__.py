"""``fleet``: the fleet server and the operator CLI.

The rooms, lowest layer first (a room imports only rooms below it; ``tests/test_layout.py``
checks it):

==============  ==============================================================
``errors``      the server's error tree and the HTTP status of each refusal
``models``      the records the store returns and the services pass around
``profiles``    pure profile maths: drift statistics, packed rollups
``config``      the typed server configuration, every bound with its default
``store``       the only code that speaks SQL
``metrics``     the Prometheus metrics of one server
``registry``    devices, groups, credentials, bundles, blobs, desired state
``telemetry``   the MQTT link, ingest, the broker configuration
``monitoring``  drift reports, the periodic evaluator, alerts, the webhook
``rollouts``    staged rollouts: values, the pure machine, the engine
``services``    the composition root: every service over one store
``dashboard``   the server-rendered operator pages
``api``         the REST API (FastAPI)
``server``      the running server: threads, link, HTTP
``cli``         the ``fleet`` command
==============  ==============================================================

This package never imports the agent (:mod:`edge_agent`) or the packager: what it shares
with them is in :mod:`edgefleet.contract`.
"""

__all__ = ["api", "cli", "config", "dashboard", "errors", "metrics", "models", "monitoring",
           "profiles", "registry", "rollouts", "server", "services", "store", "telemetry"]
