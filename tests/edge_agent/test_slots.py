"""Installed bundles and state.json on a real file system: atomic, recoverable, bounded."""

from __future__ import annotations

import json
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.slots import MAX_FAILED, SlotError, Slots, State
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.wire import canonical_json, sha256_hex

SHA = st.text("0123456789abcdef", min_size=64, max_size=64)
REFS = st.one_of(st.none(), st.builds(
    lambda n, v, s, z: BundleRef(n, v, s, "", z),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
    st.builds(lambda a, b, c: f"{a}.{b}.{c}", *(st.integers(0, 20),) * 3), SHA,
    st.integers(0, 10**9)))


@given(REFS, REFS, REFS, st.integers(0, 10**6),
       st.dictionaries(SHA, st.text(max_size=30), max_size=4))
def test_state_round_trips(active, previous, shadow, revision, failed):
    state = State(active, previous, shadow, revision, failed)
    again = State.from_dict(json.loads(canonical_json(state.to_dict())))
    assert again == state


@pytest.mark.parametrize("doc", [
    {"schema": 2, "active": None, "previous": None, "shadow": None, "revision": 0, "failed": {}},
    {"schema": 1, "active": {"name": "m", "version": "1.0.0", "sha256": "", "size": 1},
     "previous": None, "shadow": None, "revision": 0, "failed": {}},
    {"schema": 1, "active": None, "previous": None, "shadow": None, "revision": -1,
     "failed": {}},
    {"schema": 1, "active": None, "previous": None, "shadow": None, "revision": 0,
     "failed": {"nothex": "x"}},
    {"schema": 1, "active": None, "previous": None, "shadow": None, "revision": 0,
     "failed": {}, "extra": 1},
], ids=["schema", "no-sha", "negative-revision", "bad-failed-key", "unknown-field"])
def test_bad_states_are_refused(doc):
    with pytest.raises(SchemaError):
        State.from_dict(doc)


def test_store_commit_and_collect(tmp_path):
    slots = Slots(tmp_path / "data")
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    blobs = {name: f"bundle {name}".encode() for name in ("a", "b", "c", "d")}
    refs = {}
    for name, body in blobs.items():
        sha = sha256_hex(body)
        slots.store(sha, body)
        refs[name] = BundleRef("m", f"1.0.{len(refs)}", sha)
    assert all(slots.has(r.sha256) for r in refs.values())
    slots.commit(State(refs["c"], refs["b"], refs["d"], 7))
    # the active, previous and shadow files stay; the rest is collected
    assert not slots.has(refs["a"].sha256)
    assert slots.read(refs["c"].sha256) == blobs["c"]
    again = Slots(tmp_path / "data")  # a restart reads the committed state
    assert again.state == State(refs["c"], refs["b"], refs["d"], 7)


def test_a_crash_mid_download_leaves_no_trace(tmp_path):
    slots = Slots(tmp_path)
    fd, temp = slots.temp_file()
    os.write(fd, b"half a bundle")
    os.close(fd)
    assert temp.exists()
    Slots(tmp_path)  # the next start
    assert not temp.exists()


def test_a_corrupt_state_is_set_aside_not_fatal(tmp_path):
    (tmp_path / "bundles").mkdir()
    (tmp_path / "state.json").write_text("{not json")
    slots = Slots(tmp_path)
    assert slots.state == State()
    assert "corrupt" in slots.recovered
    assert (tmp_path / "state.json.corrupt").read_text() == "{not json"


def test_failures_are_bounded():
    state = State()
    for i in range(MAX_FAILED + 5):
        state = state.with_failure(f"{i:064x}", "x" * 1000)
    assert len(state.failed) == MAX_FAILED
    assert f"{0:064x}" not in state.failed and f"{MAX_FAILED + 4:064x}" in state.failed
    assert all(len(v) == 500 for v in state.failed.values())


def test_bad_sha_is_refused(tmp_path):
    with pytest.raises(SlotError):
        Slots(tmp_path).path("../../etc/passwd")
    assert not Slots(tmp_path).has("../x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_data_dir_is_a_slot_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SlotError, match="cannot use"):
            Slots(tmp_path / "data")
    finally:
        tmp_path.chmod(0o700)
