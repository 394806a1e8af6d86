"""The capture batch format: Hypothesis round-trips, and the agent's pre-encoded rows
decode to the same batch as the typed encoder's."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from edgefleet.contract.capture import (
    CaptureBatch,
    CaptureRow,
    decode_batch,
    encode_batch,
    encode_rows,
)

_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_scalar = st.one_of(st.none(), _finite, st.integers(-2**52, 2**52), st.text(max_size=40))
_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True)
_names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1,
                 max_size=20)
_rows = st.builds(
    CaptureRow, id=_ids, time=_finite, bundle=st.just("sensor@1.0.0"),
    features=st.dictionaries(_names, _scalar, max_size=6), label=_scalar,
    probabilities=st.one_of(st.none(), st.lists(_finite, max_size=4).map(tuple)),
    value=st.one_of(st.none(), _finite))


@given(st.lists(_rows, min_size=1, max_size=8, unique_by=lambda r: r.id),
       st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True))
def test_a_batch_round_trips(rows, batch_id):
    batch = CaptureBatch(batch_id, tuple(rows))
    assert decode_batch(encode_batch(batch)) == batch
    pre = [json.dumps(r.to_dict(), separators=(",", ":")).encode() for r in rows]
    assert decode_batch(encode_rows(batch_id, pre)) == batch
