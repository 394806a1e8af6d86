"""The shadow's paired table on the wire: ShadowStats.paired round-trips, bad ones are
refused by name, and a summary without it stays what older servers read."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import MAX_PAIRED, BundleRef, Paired, ShadowStats

REF = BundleRef("sensor", "2.0.0")
counts = st.integers(0, MAX_PAIRED)


@settings(max_examples=200, deadline=None)
@given(st.builds(Paired, counts, counts, counts, counts), st.integers(0, 10**6))
def test_shadow_stats_with_a_paired_table_round_trip(paired, rows):
    stats = ShadowStats(REF, rows, rows // 2, (), 0, paired)
    doc = stats.to_dict()
    assert doc["paired"] == {"both": paired.both, "live_only": paired.live_only,
                             "shadow_only": paired.shadow_only, "neither": paired.neither}
    assert ShadowStats.from_dict(doc, "shadow") == stats
    assert paired.n == paired.both + paired.live_only + paired.shadow_only + paired.neither


@given(st.lists(st.builds(Paired, *(st.integers(0, 1000) for _ in range(4))), max_size=8))
def test_tables_add_cell_by_cell(tables):
    total = sum(tables, Paired())
    assert total.n == sum(t.n for t in tables)
    assert total.live_only == sum(t.live_only for t in tables)


def test_without_a_table_the_key_is_absent():
    doc = ShadowStats(REF, 5, 5).to_dict()
    assert "paired" not in doc and ShadowStats.from_dict(doc, "shadow").paired is None


@pytest.mark.parametrize(("paired", "field"), [
    pytest.param({"both": -1, "live_only": 0, "shadow_only": 0, "neither": 0},
                 "shadow.paired.both", id="negative"),
    pytest.param({"both": 1, "live_only": 0, "shadow_only": 0}, "shadow.paired.neither",
                 id="missing-cell"),
    pytest.param({"both": 1, "live_only": 0, "shadow_only": 0, "neither": 0, "n": 1},
                 "shadow.paired.n", id="unknown-field"),
    pytest.param({"both": True, "live_only": 0, "shadow_only": 0, "neither": 0},
                 "shadow.paired.both", id="bool"),
    pytest.param({"both": 1.5, "live_only": 0, "shadow_only": 0, "neither": 0},
                 "shadow.paired.both", id="float"),
    pytest.param({"both": MAX_PAIRED + 1, "live_only": 0, "shadow_only": 0, "neither": 0},
                 "shadow.paired.both", id="too-large"),
    pytest.param([1, 2, 3, 4], "shadow.paired", id="not-an-object"),
])
def test_bad_tables_are_refused_by_name(paired, field):
    doc = {**ShadowStats(REF, 5, 5).to_dict(), "paired": paired}
    with pytest.raises(SchemaError) as err:
        ShadowStats.from_dict(doc, "shadow")
    assert err.value.field == field, err.value
