"""edgefleet's device side, and the contracts every part of edgefleet shares.

The contract modules (``wire``, ``manifest``, ``signing``, ``bundle``, ``profile``,
``errors``) depend on numpy, cryptography and the standard library only. Importing
this package never imports scikit-learn, skl2onnx or fastapi (a test checks it).
"""

__version__ = "0.1.0"
