"""Data capture on the device: the reservoir's bounds and uniformity, the allowlist, the
durable queue's bounds and batches (same id after a restart), and the agent feeding it
with a real model (onnxruntime). Uploads to a real server: tests/fleet_server/test_capture.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.capture import (
    Capture,
    CaptureConfig,
    CaptureQueue,
    Reservoir,
    effective,
    encode_row,
)
from edge_agent.config import parse_config
from edge_agent.errors import CaptureError, ConfigError
from edge_agent.model import LoadedModel
from edgefleet.contract.bundle import verify_bundle
from edgefleet.contract.capture import decode_batch
from edgefleet.contract.messages import CapturePolicy
from edgefleet.contract.signing import TrustStore
from tests.bundles import FEATURES, sensor_data


@pytest.mark.parametrize(("rate", "cap", "n"), [(1.0, 50, 10_000), (0.1, 100, 50_000),
                                                (0.01, 10_000, 100_000)])
def test_the_sample_never_passes_max_rows_and_follows_the_rate(rate, cap, n):
    r = Reservoir(rate, cap, random.Random(7))
    for start in range(0, n, 1000):
        r.offer(1000, lambda i, s=start: s + i)
    expected = rate * n
    assert r.seen == n
    # the candidates follow the rate (binomial, 6 standard deviations) ...
    assert abs(r.candidates - expected) <= 6 * (expected * (1 - rate)) ** 0.5 + 1
    # ... and the sample is capped
    assert len(r.sample) == min(cap, r.candidates)
    assert len(set(r.sample)) == len(r.sample)
    r.take()
    assert r.sample == [] and r.seen == 0


def test_the_sample_is_uniform_over_the_window():
    """Rows late in the window are as likely as early ones: the mean position of the
    kept rows over many windows is the middle (a first-come cap would sit at the start)."""
    n, cap, means = 10_000, 100, []
    rng = random.Random(11)
    for _ in range(40):
        r = Reservoir(0.5, cap, rng)
        for start in range(0, n, 500):
            r.offer(500, lambda i, s=start: s + i)
        means.append(np.mean(r.take()) / n)
    # the mean of 4,000 uniform positions: 0.5 within 6 standard errors
    assert abs(np.mean(means) - 0.5) < 6 * (1 / 12 / 4000) ** 0.5
    quarters = np.histogram(means, bins=[0, 0.25, 0.5, 0.75, 1])[0]
    assert quarters[0] == quarters[3] == 0


def test_only_the_allowlisted_features_are_read():
    columns = {"temperature": np.array([20.5, np.nan]), "secret": np.array(["a", "b"]),
               "site": np.array(["x", "y"], dtype=object)}
    row = json.loads(encode_row("p-1", 5.0, "sensor@1.0.0", columns, 1,
                                ("temperature", "site", "absent"), np.array(["ok", "bad"]),
                                np.array([[0.1, 0.9], [0.7, 0.3]]), None))
    assert row["features"] == {"temperature": None, "site": "y"}
    assert row["label"] == "bad" and row["probabilities"] == [0.7, 0.3]
    assert "secret" not in json.dumps(row)


def _rows(n: int, width: int = 10) -> list[bytes]:
    return [json.dumps({"id": f"p-{i:04d}", "time": 1.0, "bundle": "sensor@1.0.0",
                        "features": {"x": "v" * width}, "label": None,
                        "probabilities": None, "value": 1.0}).encode() for i in range(n)]


def test_the_queue_drops_the_oldest_past_its_bounds_and_counts_them(tmp_path):
    q = CaptureQueue(tmp_path / "capture.db", max_rows=100, max_bytes=10**9)
    assert q.put(_rows(150), batch_bytes=10_000) == 50
    assert q.depth() == 100 and q.counter("dropped") == 50
    _, body, n = q.next_batch(1000, 10**6)
    assert n == 100 and decode_batch(body).rows[0].id == "p-0050"  # the oldest went
    big = _rows(1, width=5000)
    assert q.put(big, batch_bytes=1000) == 1  # larger than a batch may be: dropped
    q.close()
    size = len(_rows(1)[0])
    q = CaptureQueue(tmp_path / "b.db", max_rows=10**6, max_bytes=20 * size)
    q.put(_rows(30), batch_bytes=10_000)
    assert q.depth() == 20 and q.counter("dropped") == 10
    q.close()


def test_batches_are_bounded_and_keep_their_id_across_a_restart(tmp_path):
    q = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    q.put(_rows(1000), batch_bytes=10_000)
    batch_id, body, rows = q.next_batch(300, 8000)
    assert len(body) <= 8000 and rows == len(decode_batch(body).rows) <= 300
    q.close()  # the agent stops before the answer came
    q = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    again = q.next_batch(300, 8000)
    assert again == (batch_id, body, rows)  # the same batch goes again, never a new one
    q.done(batch_id)
    seen = {r.id for r in decode_batch(body).rows}
    while (got := q.next_batch(300, 8000)) is not None:
        ids = {r.id for r in decode_batch(got[1]).rows}
        assert not ids & seen
        seen |= ids
        q.done(got[0])
    assert len(seen) == 1000 and q.counter("uploaded") == 1000 and q.depth() == 0
    q.close()


@pytest.mark.parametrize(("section", "key"), [
    ({"enabled": True, "features": []}, "capture.features"),
    ({"enabled": True, "features": ["a"], "rate": 0}, "capture.rate"),
    ({"enabled": True, "features": ["a"], "rate": 1.5}, "capture.rate"),
    ({"enabled": "yes", "features": ["a"]}, "capture.enabled"),
    ({"enabled": True, "features": ["a"], "batch_bytes": 5 * 2**20}, "capture.batch_bytes"),
    ({"enabled": True, "features": ["a"], "colour": 1}, "capture.colour"),
], ids=["no-allowlist", "rate-0", "rate-above-1", "enabled-text", "batch-too-big", "unknown"])
def test_config_refusals_name_the_key(section, key, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("efd_x\n")
    secret.chmod(0o600)
    doc = {"device": {"id": "d1"}, "broker": {"host": "127.0.0.1"},
           "trust": {"keys": [str(tmp_path / "k.pub")]},
           "server": {"url": "http://127.0.0.1:1", "token_file": str(secret)},
           "capture": section}
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.key == key


def test_capture_is_off_by_default(tmp_path):
    config = parse_config({"device": {"id": "d1"}, "broker": {"host": "127.0.0.1"},
                           "trust": {"keys": [str(tmp_path / "k.pub")]}})
    assert config.capture_enabled is False
    with pytest.raises(CaptureError):
        CaptureConfig(features=())


def test_the_agent_captures_served_rows_with_ids_outputs_and_only_allowed_features(
        bundles, signing_keys, tmp_path):
    trust = TrustStore.from_files(signing_keys.trust_specs())
    model = LoadedModel(verify_bundle(bundles.build("1.0.0").read_bytes(), trust))
    now = [1000.0]
    queue = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    capture = Capture(CaptureConfig(features=("temperature", "vibration"), rate=1.0,
                                    max_rows=40, window_s=60), queue,
                      clock=lambda: now[0], rng=random.Random(3))
    agent = Agent("dev-1", capture=capture)
    try:
        agent.activate(model)
        data = sensor_data(300, seed=5)[list(FEATURES)]
        served = {}
        for row in data.to_dict("records")[:100]:
            out = agent.predict_one(row)
            served[out["id"]] = out
        result = agent.predict(data.iloc[100:].to_dict("records"))
        assert agent.wait_idle(30)
        assert queue.depth() == 0  # the window is still open
        now[0] += 61
        agent.predict_one(data.iloc[0].to_dict())  # the next chunk rolls the window
        agent.flush(30)
        capture.roll(force=False)
        assert queue.depth() == 40  # max_rows of the window's 300 rows
        _, body, _ = queue.next_batch(1000, 10**6)
        rows = decode_batch(body).rows
        ids = {*served, *result.ids}
        for r in rows:
            assert r.id in ids and r.bundle == "sensor@1.0.0"
            assert set(r.features) == {"temperature", "vibration"}
            assert r.probabilities is not None and len(r.probabilities) == 2
            if r.id in served:
                assert r.label == served[r.id]["label"]
    finally:
        agent.close()
        queue.close()


def test_labels_joined_on_the_device_go_with_or_after_their_captured_rows(tmp_path):
    q = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    q.put(_rows(5), batch_bytes=10_000)
    # p-0000, p-0001 captured and still queued; p-9999 never captured: never leaves
    assert q.label([("p-0000", 1), ("p-0001", "ok"), ("p-9999", 0)]) == 2
    assert q.label([("p-0000", 0)]) == 0  # the first label stands
    batch_id, body, rows = q.next_batch(1000, 10**6)
    batch = decode_batch(body)
    assert rows == 5 and len(batch.rows) == 5
    assert batch.outcomes == (("p-0000", 1), ("p-0001", "ok"))
    q.done(batch_id)
    # after the rows left: the label goes alone, in a batch of its own (restart-safe)
    assert q.label([("p-0003", 1)]) == 1
    q.close()
    q = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    _, body, rows = q.next_batch(1000, 10**6)
    assert rows == 0 and decode_batch(body).outcomes == (("p-0003", 1),)
    assert q.counter("labels") == 3
    q.close()
    # only the newest max_rows ids are remembered
    q = CaptureQueue(tmp_path / "small.db", max_rows=3, max_bytes=10**9)
    q.put(_rows(5), batch_bytes=10_000)
    assert q.label([(f"p-{i:04d}", 1) for i in range(5)]) == 3
    q.close()


def test_a_label_for_a_row_in_the_open_window_waits_for_it(tmp_path):
    now = [0.0]
    queue = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    capture = Capture(CaptureConfig(features=("x",), rate=1.0, max_rows=2, window_s=60),
                      queue, clock=lambda: now[0], rng=random.Random(1))
    capture.reservoir.offer(2, lambda i: _rows(2)[i])
    assert capture.label([("p-0000", 1), ("p-0007", 1)]) == 0  # not queued yet
    now[0] = 61
    assert capture.roll() == 2
    _, body, _ = queue.next_batch(1000, 10**6)
    assert decode_batch(body).outcomes == (("p-0000", 1),)
    queue.close()


# -- the group's policy, through the desired state (issue 15) ---------------------------------

LOCAL = CaptureConfig(features=("temperature", "vibration", "humidity"), rate=0.2, max_rows=50,
                      window_s=60)


@pytest.mark.parametrize(("policy", "want"), [
    pytest.param(None, LOCAL, id="none-set-the-device-config-stands"),
    pytest.param(CapturePolicy(False), None, id="off"),
    pytest.param(CapturePolicy(True, 0.0, 10), None, id="rate-zero-is-off"),
    pytest.param(CapturePolicy(True, 1.0, 1000), LOCAL, id="looser-than-the-device"),
    pytest.param(CapturePolicy(True, 0.05, 10, ("humidity", "pressure", "temperature")),
                 replace(LOCAL, rate=0.05, max_rows=10, features=("temperature", "humidity")),
                 id="stricter-and-intersected-in-the-device-order"),
    pytest.param(CapturePolicy(True, 0.5, 10, ("pressure",)), None, id="disjoint-lists-off"),
])
def test_the_device_config_is_an_upper_bound(policy, want):
    assert effective(LOCAL, policy) == want


def test_a_group_policy_takes_effect_without_restart_and_off_stops_at_once(tmp_path):
    now = [0.0]
    queue = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    capture = Capture(replace(LOCAL, rate=1.0), queue, clock=lambda: now[0],
                      rng=random.Random(2))
    columns = {"temperature": np.arange(100.0), "vibration": np.arange(100.0),
               "humidity": np.arange(100.0)}

    def serve(n: int, start: int) -> None:
        capture.observe("sensor@1.0.0", columns, n, [f"p-{start + i:04d}" for i in range(n)],
                        float(now[0]), None, None, np.zeros(n))

    serve(30, 0)
    # narrowed: the open window's 30 rows are queued under the old settings, and the new
    # window samples 5 rows of only the group's feature
    assert capture.apply(CapturePolicy(True, 1.0, 5, ("vibration",))) is True
    assert capture.apply(CapturePolicy(True, 1.0, 5, ("vibration",))) is False  # the same
    assert queue.depth() == 30
    serve(40, 100)
    now[0] = 61
    assert capture.roll() == 5
    batch_id, body, rows = queue.next_batch(1000, 10**6)
    queue.done(batch_id)
    batch = decode_batch(body)
    assert rows == 35
    assert [set(r.features) for r in batch.rows[30:]] == [{"vibration"}] * 5
    assert all(set(r.features) == set(LOCAL.features) for r in batch.rows[:30])
    # off: the open window's sample is dropped and nothing more is sampled
    serve(10, 200)
    assert capture.apply(CapturePolicy(False)) is True
    serve(10, 300)
    now[0] = 200
    assert capture.roll() == 0 and queue.depth() == 0
    queue.close()
    # the policy outlives a restart: still off before any desired state arrives
    queue = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**9)
    again = Capture(LOCAL, queue, clock=lambda: now[0])
    assert again.policy == CapturePolicy(False) and again.config is None
    assert again.apply(None) is True and again.config == LOCAL  # the group reset: its own
    queue.close()
    assert CaptureQueue(tmp_path / "capture.db", max_rows=1, max_bytes=10**9).policy() is None
