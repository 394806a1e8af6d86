"""The root of every error edgefleet raises on purpose.

Each package hangs its own tree under it, drawn in that package's ``errors`` module:

    EdgefleetError
    ├── the contracts' errors     edgefleet.contract.errors  (SchemaError, BundleError, …)
    ├── AgentError                edge_agent.errors          (the device daemon)
    ├── PackagerError             packager.errors            (edgepack)
    └── FleetError                fleet_server.errors        (the fleet server and its CLI)

A caller that only wants "edgefleet refused this" catches :class:`EdgefleetError`; the CLIs
print its message as one line. Third-party errors are mapped at each package's seams with
``raise … from exc``, never passed through bare.
"""

from __future__ import annotations

__all__ = ["EdgefleetError"]


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""
