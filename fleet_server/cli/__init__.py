"""``fleet``: run the fleet server, and operate a fleet through its REST API.

``main`` is the one click group every command is registered on; ``operate`` (devices,
groups, bundles, desired state, drift, alerts), ``rollout`` and ``broker`` add theirs;
``util`` holds the shared option and output helpers and ``client`` the small HTTP client.
Commands parse, call the library or the API, and print; they hold no rules.
"""

from fleet_server.cli.main import main

__all__ = ["main"]
