"""edgefleet: the contracts every program shares, and the root of every error tree.

Three programs sit on top of this package and never on each other's internals:
``edgepack`` (:mod:`packager`), ``edge-agent`` (:mod:`edge_agent`) and ``fleet``
(:mod:`fleet_server`). What crosses between them (bundles, profiles, MQTT messages, input
rows) is defined once, in :mod:`edgefleet.contract`.

This package deliberately imports nothing but numpy, cryptography and the standard
library (onnxruntime only inside :mod:`edgefleet.contract.runtime`), so a device installs
it with the agent; it never imports scikit-learn, skl2onnx, pandas or fastapi (a test
checks it), and it never imports the three programs.
"""

from edgefleet.errors import EdgefleetError

__version__ = "0.1.0"

__all__ = ["EdgefleetError", "__version__"]
