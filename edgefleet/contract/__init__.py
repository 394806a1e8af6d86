"""The formats that cross a boundary between edgepack, the agent and the fleet server.

===============  ===============================================================
``wire``         canonical JSON, digests, the strict field readers every format uses
``manifest``     the bundle's signed manifest: input schema, outputs, files, lineage
``card``         the manifest's model card: statement, evaluation, slices, fairness, importances
``approval``     signed approval statements (who, when, in what role, why) beside the signatures
``signing``      Ed25519 keys, the trust store, the DSSE-style envelope and its policy
``bundle``       verifying, reading and writing ``.edgebundle`` files
``container``    the bundle's gzip+tar walk: one stream, nothing hidden, bounded memory
``bins``         a profile's reference bins: edges, vocabularies, the reference hash
``accumulate``   a profile's per-feature accumulators (counts, sums, min, max, M2)
``profile``      the feature profile: exact merge, wire form, ``reference.json``
``messages``     the MQTT topics and every message schema (each with a ``schema`` version)
``performance``  a summary's performance blocks, realized and estimated, and their metrics
``calibration``  the bundle's calibration map: raw confidence to calibrated probability
``capture``      the capture batch: served rows a device uploads for retraining
``samples``      the bundle's sample rows, the smoke test's input
``runtime``      the onnxruntime session and the binding of inputs to the graph
``inputs``       validation of prediction rows against the manifest's input schema
``errors``       the contracts' error tree (under :class:`edgefleet.errors.EdgefleetError`)
===============  ===============================================================

``performance`` and ``messages`` are faces over sibling modules, one concept each
(``performance_spec``, ``performance_realized``, ``performance_estimated``,
``performance_metrics``; ``messages_base``, ``messages_control``, ``messages_outcomes``,
``latency``): import the names from the face.

Each module is imported by name (``from edgefleet.contract.bundle import verify_bundle``);
this package imports none of them, so importing one contract costs only that contract.
Nothing here does I/O beyond reading a file it is handed; nothing here knows about a
daemon, a server or a build.
"""

__all__ = ["accumulate", "approval", "bins", "bundle", "calibration", "capture", "card",
           "container", "errors", "inputs", "manifest", "messages", "performance", "profile",
           "runtime", "samples", "signing", "wire"]
