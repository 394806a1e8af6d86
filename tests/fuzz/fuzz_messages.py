"""Coverage-guided fuzzing of the MQTT message parser with atheris (not part of ``make test``).

    .venv/bin/python tests/fuzz/fuzz_messages.py -atheris_runs=500000

The first input byte picks the topic kind; the rest is the payload. A crash is any
exception outside ``SchemaError``.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from edgefleet.contract.errors import SchemaError
    from edgefleet.contract.messages import KINDS, decode


def one(data: bytes) -> None:
    if not data:
        return
    kind = KINDS[data[0] % len(KINDS)]
    with contextlib.suppress(SchemaError):
        decode(f"edgefleet/v1/dev-1/{kind}", data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
