"""``fleet retrain show``'s data line: readable for people (``--json`` keeps the values
whole)."""

from __future__ import annotations

from fleet_server.cli.retrain import data_line


def test_a_time_range_is_joined_and_a_digest_cut() -> None:
    line = data_line({"rows": 3300, "sha256": "0f5c3c2f8b31d77f816dec1c6b64636f" * 2,
                      "time_range": ["2026-12-06T15:30:01", "2026-12-06T15:30:12"]})
    assert line == ("rows 3300, sha256 0f5c3c2f8b31d77f…, "
                    "time_range 2026-12-06T15:30:01 .. 2026-12-06T15:30:12")
    assert "[" not in line and "'" not in line  # no Python reprs in a people's table


def test_short_values_are_shown_as_they_are() -> None:
    assert data_line({"held_out_rows": 825, "sha256": "abc"}) == \
        "held_out_rows 825, sha256 abc"
