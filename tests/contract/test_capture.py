"""The capture batch format: Hypothesis round-trips, and the agent's pre-encoded rows
decode to the same batch as the typed encoder's."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.contract.capture import (
    CaptureBatch,
    CaptureRow,
    decode_batch,
    encode_batch,
    encode_rows,
)
from edgefleet.contract.errors import SchemaError

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


_labels = st.one_of(_finite, st.integers(-2**52, 2**52), st.text(max_size=40))


@given(st.lists(_rows, max_size=4, unique_by=lambda r: r.id),
       st.lists(st.tuples(_ids, _labels), min_size=1, max_size=6, unique_by=lambda o: o[0]),
       st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True))
def test_a_batch_with_device_joined_labels_round_trips(rows, outcomes, batch_id):
    batch = CaptureBatch(batch_id, tuple(rows), tuple(outcomes))
    assert decode_batch(encode_batch(batch)) == batch
    pre = [json.dumps(r.to_dict(), separators=(",", ":")).encode() for r in rows]
    labels = [json.dumps({"id": i, "label": y}).encode() for i, y in outcomes]
    assert decode_batch(encode_rows(batch_id, pre, labels)) == batch


@pytest.mark.parametrize(("outcomes", "field"), [
    ([{"id": "bad id!", "label": 1}], "capture.outcomes[0].id"),
    ([{"id": "p-1"}], "capture.outcomes[0].label"),
    ([{"id": "p-1", "label": None}], "capture.outcomes[0].label"),
    ([{"id": "p-1", "label": [1]}], "capture.outcomes[0].label"),
    ([{"id": "p-1", "label": 1, "extra": 2}], "capture.outcomes[0]"),
    ([{"id": "p-1", "label": 1}, {"id": "p-1", "label": 0}], "capture.outcomes"),
    ([], "capture.rows"),  # neither rows nor labels
], ids=["bad-id", "no-label", "null-label", "list-label", "unknown-key", "twice", "empty"])
def test_bad_device_joined_labels_are_refused_naming_the_field(outcomes, field):
    body = json.dumps({"schema": 1, "batch": "b" * 16, "rows": [],
                       "outcomes": outcomes}).encode()
    with pytest.raises(SchemaError) as err:
        decode_batch(body)
    assert (err.value.field or "").startswith(field), err.value
