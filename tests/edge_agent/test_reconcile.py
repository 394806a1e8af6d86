"""The reconcile decision, exhaustively: it is pure, so every rule gets a row of its own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.reconcile import plan, same_bundle
from edge_agent.slots import State
from edgefleet.contract.messages import BundleRef, DesiredState


def ref(version: str, sha: str | None = None, name: str = "m") -> BundleRef:
    digest = sha if sha is not None else (version.replace(".", "") * 64)[:64]
    return BundleRef(name, version, digest, f"/api/v1/bundles/{name}/{version}/download", 100)


V1, V2, V3 = ref("1.0.0", "a" * 64), ref("2.0.0", "b" * 64), ref("3.0.0", "c" * 64)


def desired(revision: int, bundle: BundleRef | None = None, shadow: BundleRef | None = None,
            allow_downgrade: bool = False) -> DesiredState:
    return DesiredState("dev", revision, bundle, shadow, allow_downgrade)


def nothing_on_disk(sha: str) -> bool:
    return False


@pytest.mark.parametrize(("want", "state", "on_disk", "kind", "extra"), [
    pytest.param(desired(1, V1), State(), (), "install", {}, id="first-install-downloads"),
    pytest.param(desired(2, V2), State(V1, None, None, 1), (), "install", {},
                 id="upgrade-downloads"),
    pytest.param(desired(2, V2), State(V1, None, None, 1), ("b" * 64,), "activate", {},
                 id="file-on-disk-no-download"),
    pytest.param(desired(3, V1), State(V2, V1, None, 2), ("a" * 64,), "activate",
                 {"rollback": True}, id="rollback-to-previous-from-local-slot"),
    pytest.param(desired(3, V1, allow_downgrade=True), State(V2, V1, None, 2), (), "install",
                 {"rollback": False}, id="previous-file-gone-downloads-again"),
    pytest.param(desired(3, V1), State(V2, None, None, 2), (), "refuse", {},
                 id="downgrade-by-download-refused"),
    pytest.param(desired(3, V1, allow_downgrade=True), State(V2, None, None, 2), (), "install",
                 {"allow_downgrade": True}, id="downgrade-allowed-when-asked"),
    pytest.param(desired(2, V1), State(V1, None, None, 1), (), "confirm", {},
                 id="already-running-new-revision-confirms"),
    pytest.param(desired(2, ref("0.1.0", name="other")), State(V2, None, None, 1), (), "install",
                 {}, id="another-model-is-not-a-downgrade"),
    pytest.param(desired(2, BundleRef("m", "2.0.0")), State(V1, None, None, 1), (), "refuse",
                 {}, id="no-sha-no-url"),
])
def test_live_steps(want, state, on_disk, kind, extra):
    step = plan(want, state, lambda sha: sha in on_disk)
    assert not step.stale and step.revision == want.revision
    assert step.live is not None and step.live.kind == kind
    for key, value in extra.items():
        assert getattr(step.live, key) == value
    if kind == "refuse":
        assert step.live.reason


@pytest.mark.parametrize(("want", "state"), [
    pytest.param(desired(1, V1), State(V1, None, None, 1), id="same-revision-already-running"),
    pytest.param(desired(1), State(V1, None, None, 0), id="no-model-assigned-keeps-current"),
    pytest.param(desired(2, V2), State(V1, None, None, 2, {"b" * 64: "smoke test failed"}),
                 id="failed-for-this-revision-is-not-retried"),
])
def test_nothing_to_do(want, state):
    step = plan(want, state, nothing_on_disk)
    assert step.live is None and step.shadow is None and step.empty


def test_a_failed_bundle_is_retried_on_a_new_revision():
    state = State(V1, None, None, 2, {"b" * 64: "download failed"})
    assert plan(desired(3, V2), state, nothing_on_disk).live.kind == "install"


def test_stale_desired_state_is_ignored():
    step = plan(desired(4, V3), State(V2, V1, None, 5), nothing_on_disk)
    assert step.stale and step.empty


@pytest.mark.parametrize(("want", "state", "on_disk", "kind", "download"), [
    pytest.param(desired(2, V1, V2), State(V1, None, None, 1), (), "start", True,
                 id="start-shadow-downloads"),
    pytest.param(desired(2, V1, V2), State(V1, None, None, 1), ("b" * 64,), "start", False,
                 id="start-shadow-from-disk"),
    pytest.param(desired(3, V1), State(V1, None, V2, 2), (), "stop", False, id="stop-shadow"),
    pytest.param(desired(3, V2, V2), State(V1, None, V2, 2), (), "stop", False,
                 id="shadow-going-live-stops-shadow"),
])
def test_shadow_steps(want, state, on_disk, kind, download):
    step = plan(want, state, lambda sha: sha in on_disk)
    assert step.shadow is not None and step.shadow.kind == kind
    assert step.shadow.download == download


def test_running_shadow_is_left_alone():
    assert plan(desired(2, V1, V2), State(V1, None, V2, 1), nothing_on_disk).shadow is None


def test_same_bundle_prefers_sha256():
    assert same_bundle(V1, ref("1.0.0", "a" * 64))
    assert not same_bundle(V1, ref("1.0.0", "f" * 64))  # same label, other bytes
    assert same_bundle(BundleRef("m", "1.0.0"), V1)  # no sha on one side: by label
    assert same_bundle(None, None) and not same_bundle(V1, None)


refs = st.sampled_from([None, V1, V2, V3])


@given(refs, refs, refs, refs, refs, st.booleans(), st.integers(0, 5), st.integers(0, 5),
       st.sets(st.sampled_from(["a" * 64, "b" * 64, "c" * 64])))
def test_plans_are_consistent(active, previous, shadow, target, want_shadow, downgrade, rev,
                              have_rev, on_disk):
    state = State(active, previous, shadow, have_rev)
    step = plan(desired(rev, target, want_shadow, downgrade), state, lambda s: s in on_disk)
    if rev < have_rev:
        assert step.stale and step.empty
        return
    live = step.live
    if target is None or (same_bundle(target, active) and rev == have_rev):
        assert live is None
    if live is not None:
        assert live.kind in ("install", "activate", "confirm", "refuse")
        if live.kind == "install":
            assert live.target.sha256 not in on_disk  # never download what is on disk
        if live.kind in ("install", "activate") and active is not None and not live.rollback \
                and live.target.name == active.name:
            # never a silent downgrade
            assert live.target.version >= active.version or downgrade
