"""The serving core with real bundles and real onnxruntime: answers, windows, shadow, errors."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import CHUNK_ROWS, Agent, NoModelError
from edge_agent.model import LoadedModel, PredictError
from edgefleet.contract.bundle import verify_bundle
from edgefleet.contract.errors import InputError
from edgefleet.contract.messages import LATENCY_EDGES_MS, decode, encode
from edgefleet.contract.profile import Profile, from_wire
from edgefleet.contract.signing import TrustStore
from tests.bundles import FEATURES, sensor_data


@pytest.fixture
def agent():
    clock = iter(float(t) for t in range(1000, 100000, 10))
    a = Agent("dev-1", clock=lambda: next(clock))
    yield a
    a.close()


def rows(n: int, seed: int = 3) -> list[dict]:
    return sensor_data(n, seed=seed)[list(FEATURES)].to_dict("records")


def test_no_model_yet(agent):
    with pytest.raises(NoModelError):
        agent.predict(rows(1))
    assert agent.errors == 1 and agent.close_window() is None


def test_answers_are_the_models_own(agent, load):
    model = load()
    agent.activate(model)
    data = rows(50)
    got = agent.predict(data)
    direct = model.runner.run_columns(model.validator.batch(data).columns)
    assert got.bundle == "sensor@1.0.0"
    np.testing.assert_array_equal(got.labels, direct.labels)
    np.testing.assert_allclose(got.probabilities, direct.probabilities, rtol=0, atol=1e-7)
    one = agent.predict_one(data[0])
    assert one["label"] == int(direct.labels[0])
    assert set(one["probabilities"]) == {"0", "1"}
    assert one["probabilities"]["1"] == pytest.approx(float(direct.probabilities[0, 1]))
    as_array = agent.predict(np.array([[r[f] for f in FEATURES] for r in data]))
    np.testing.assert_array_equal(as_array.labels, direct.labels)


def test_a_window_profiles_exactly_what_was_served(agent, load):
    model = load()
    agent.activate(model)
    data = rows(CHUNK_ROWS * 2 + 37)  # two full chunks for the worker and a tail
    for row in data[:CHUNK_ROWS + 10]:
        agent.predict([row])
    agent.predict(data[CHUNK_ROWS + 10:CHUNK_ROWS + 110])  # a list batch
    matrix = np.array([[r[f] for f in FEATURES] for r in data[CHUNK_ROWS + 110:]])
    agent.predict(matrix)  # an array batch
    window = agent.close_window()
    assert window.rows == len(data)
    assert window.bundle.sha256 == model.ref.sha256 and window.end >= window.start
    assert sum(window.latency_counts) == CHUNK_ROWS + 10 + 2
    assert len(window.latency_counts) == len(LATENCY_EDGES_MS) + 1

    # the same rows profiled in one go, with the model's own outputs
    batch = model.validator.batch(data)
    want = Profile(model.spec)
    pred = model.runner.run_columns(batch.columns)
    from edge_agent.model import Outputs

    want.update(batch.columns, model.profile_outputs(Outputs(pred.labels, pred.probabilities,
                                                             None)), rows=len(data))
    got = from_wire(window.profile, model.spec)
    assert got.rows == want.rows == len(data)
    for name in FEATURES:
        g, w = got.inputs[name], want.inputs[name]
        assert g.counts.tolist() == w.counts.tolist()
        assert g.missing == w.missing
        np.testing.assert_allclose(g.sums, w.sums, rtol=5e-5)  # 5 digits on the wire
    assert got.outputs["class"].counts.tolist() == want.outputs["class"].counts.tolist()
    assert got.outputs["confidence"].counts.tolist() == want.outputs["confidence"].counts.tolist()

    # and the summary built from it is a valid message under 2 KB on the wire
    summary = window.summary("dev-1", seq=7)
    payload = encode(summary)
    assert len(payload) < 2048
    assert decode(summary.topic, payload) == summary
    # the next window starts empty
    assert agent.close_window() is None


def test_refused_inputs_are_counted_in_the_window(agent, load):
    agent.activate(load())
    agent.predict(rows(3))
    for bad in ([{"temperature": 1.0}], [{"temperature": "x", "humidity": 1.0,
                                          "vibration": 1.0, "current": 1.0}], "nope", []):
        with pytest.raises(InputError):
            agent.predict(bad)
    window = agent.close_window()
    assert window.errors == {"input": 4}
    assert window.rows == 3 and agent.errors == 4 and agent.predictions == 3


def test_row_bound_sets_window_due(load):
    agent = Agent("dev-1", window_rows=10)
    try:
        agent.activate(load())
        agent.predict(rows(9))
        assert not agent.window_due.is_set()
        agent.predict(rows(1))
        assert agent.window_due.is_set()
        assert agent.close_window().rows == 10
        assert not agent.window_due.is_set()
    finally:
        agent.close()


def test_switching_models_closes_the_old_window(agent, load):
    agent.activate(load("1.0.0"))
    agent.predict(rows(5))
    closed = agent.activate(load("1.1.0"))
    assert closed.rows == 5 and closed.bundle.version == "1.0.0"
    agent.predict(rows(2))
    assert agent.close_window().bundle.version == "1.1.0"


@pytest.mark.parametrize(("candidate", "low", "high"), [
    pytest.param("logreg", 1.0, 1.0, id="same-model-agrees"),
    pytest.param("inverted", 0.0, 0.1, id="inverted-model-disagrees"),
])
def test_shadow_agreement(agent, load, candidate, low, high):
    agent.activate(load("1.0.0"))
    shadow = load("2.0.0", candidate)
    agent.set_shadow(shadow)
    data = rows(400)
    live = [agent.predict([r]).labels[0] for r in data[:100]]
    agent.predict(data[100:])
    assert agent.wait_idle()
    window = agent.close_window()
    stats = window.shadow
    assert stats.bundle == shadow.ref and stats.rows == 400 and stats.errors == 0
    assert low <= stats.agreed / stats.rows <= high
    assert sum(stats.latency_counts) == 101  # one per call
    assert window.rows == 400 and len(live) == 100  # the live answers were served


def test_shadow_queue_bound_skips_and_counts(load):
    agent = Agent("dev-1", shadow_queue_rows=5)
    try:
        agent.activate(load())
        agent.set_shadow(load("2.0.0", "inverted"))
        agent.predict(rows(50))  # more than the shadow may hold: skipped, counted
        assert agent.wait_idle()
        window = agent.close_window()
        assert window.errors.get("shadow_skipped") == 50
        assert window.shadow is None
    finally:
        agent.close()


def test_many_threads_predict_at_once(agent, load):
    agent.activate(load())
    data = rows(200)
    errors: list[BaseException] = []

    def work(part):
        try:
            for row in part:
                agent.predict([row])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(data[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    window = agent.close_window()
    assert window.rows == 200 and agent.predictions == 200
    assert from_wire(window.profile, agent.model.spec).inputs["humidity"].n == 200


def test_latency_percentiles(agent, load):
    assert agent.latency_percentiles() == (None, None)
    agent.activate(load())
    for row in rows(20):
        agent.predict([row])
    p50, p95 = agent.latency_percentiles()
    assert 0 < p50 <= p95 < 1000


# -- mixed numeric + categorical models: the column path, the row path, the profile ------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, signing_keys):
    """A real mixed pipeline (imputer + scaler on 3 numeric columns, one of which may be
    missing, one-hot on 2 string columns) + LogisticRegression, built and verified."""
    import warnings

    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from packager.build import BuildOptions, build

    work = tmp_path_factory.mktemp("mixed")
    frame = _mixed_frame(1500, seed=1)
    frame.to_csv(work / "train.csv", index=False)
    pre = ColumnTransformer([
        ("num", Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())]),
         ["temp", "pressure", "rpm"]),
        ("cat", OneHotEncoder(handle_unknown="ignore"), ["site", "mode"])])
    pipe = Pipeline([("pre", pre), ("model", LogisticRegression(max_iter=500))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(frame.drop(columns="target"), frame["target"])
    joblib.dump(pipe, work / "model.joblib")
    result = build(BuildOptions(model=work / "model.joblib", train_data=work / "train.csv",
                                target="target", name="mixed", version="1.0.0",
                                key=signing_keys.build.private, out_dir=work, force=True))
    trust = TrustStore.from_files(signing_keys.trust_specs())
    return LoadedModel(verify_bundle(result.path.read_bytes(), trust))


def _mixed_frame(n: int, seed: int):
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "temp": rng.normal(60, 12, n), "pressure": rng.gamma(4, 2.5, n),
        "rpm": rng.normal(3000, 600, n).round(),
        "site": rng.choice(["north", "south", "lab"], n),
        "mode": rng.choice(["idle", "run", "boost"], n)})
    frame.loc[rng.random(n) < 0.1, "temp"] = np.nan
    frame["target"] = ((frame["temp"].fillna(60) - 60) / 12 + (frame["mode"] == "boost")
                       + rng.normal(0, 1, n) > 0).astype(int)
    return frame


def _mixed_rows(n: int, seed: int) -> list[dict]:
    frame = _mixed_frame(n, seed).drop(columns="target")
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for i, r in enumerate(rows):
        if i % 7 == 3:
            r["site"] = "unseen-site"  # served, and counted as unseen
        r["rpm"] = int(r["rpm"]) if i % 2 else float(r["rpm"])  # JSON ints and floats
    return rows


def test_a_mixed_batch_answers_as_its_rows_one_by_one_and_as_the_runner(agent, mixed):
    specs = {s.name: s for s in mixed.manifest.inputs}
    assert specs["site"].kind == "categorical" and specs["temp"].missing_allowed
    agent.activate(mixed)
    data = _mixed_rows(300, seed=5)
    batch = agent.predict(data)
    ones = [agent.predict([r]) for r in data]
    np.testing.assert_array_equal(batch.labels, np.concatenate([o.labels for o in ones]))
    # (onnxruntime's kernels for 1 row and for 300 may round the last float32 bit apart)
    np.testing.assert_allclose(batch.probabilities,
                               np.concatenate([o.probabilities for o in ones]), rtol=0, atol=1e-6)
    # the packager's fidelity gate runs models through runner.run_columns: same answers
    ref = mixed.runner.run_columns(mixed.validator.from_cells(
        [mixed.validator.row(r, i) for i, r in enumerate(data)]).columns)
    np.testing.assert_array_equal(batch.labels, ref.labels)
    np.testing.assert_array_equal(batch.probabilities, ref.probabilities)


def test_a_mixed_window_profiles_the_same_whether_rows_came_alone_or_in_a_batch(agent, mixed):
    data = _mixed_rows(CHUNK_ROWS + 40, seed=9)
    agent.activate(mixed)
    agent.predict(data)
    by_batch = agent.close_window()
    for r in data:
        agent.predict([r])
    by_rows = agent.close_window()
    assert by_batch.profile == by_rows.profile
    assert by_batch.rows == by_rows.rows == len(data)
    site = from_wire(by_rows.profile, mixed.spec).inputs["site"]
    assert site.counts[len(site.spec.vocabulary) + 1] == sum(
        r["site"] == "unseen-site" for r in data)  # unseen categories are counted


def test_wait_idle_and_flush_wait_for_profiling(agent, load):
    model = load()
    agent.activate(model)
    data = rows(CHUNK_ROWS + 10)
    for r in data:
        agent.predict([r])
    assert agent.wait_idle(30)  # the full chunk is profiled, the 10-row tail still buffered
    assert agent._window.profile.rows == CHUNK_ROWS
    agent.predict(data[:50])  # a batch goes to the worker at once
    assert agent.wait_idle(30) and agent._window.profile.rows == CHUNK_ROWS + 50
    assert agent.flush(30) and agent._window.profile.rows == len(data) + 50
    assert agent.close_window().rows == len(data) + 50


# -- the single-row path and the column path through the agent (Hypothesis) -------------

_ODD = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.booleans(),
                 st.text(max_size=3), st.just(2**63), st.just(1e300), st.just([1.0]),
                 st.just(np.float64(2.5)), st.just(np.int64(3)))


@st.composite
def _served_rows(draw, kinds: dict[str, str]):
    """Rows as apps send them: mostly good cells (ints and floats, unseen categories,
    missing values), now and then a wrong type, a non-finite number or a missing key."""
    n = draw(st.integers(1, 8))
    good = {"numeric": st.one_of(st.floats(-1e4, 1e4, allow_nan=False),
                                 st.integers(-10**4, 10**4)),
            "categorical": st.sampled_from(["north", "south", "lab", "unseen", ""])}
    rows = []
    for _ in range(n):
        row = {}
        for name, kind in kinds.items():
            cell = good[kind] if draw(st.integers(0, 40)) else _ODD
            row[name] = draw(cell)
        if not draw(st.integers(0, 60)):
            row.pop(draw(st.sampled_from(sorted(kinds))))
        rows.append(row)
    return rows


def _served(agent, rows):
    try:
        return "ok", agent.predict(rows)
    except (InputError, PredictError) as exc:
        return "error", (type(exc), getattr(exc, "feature", None), str(exc))


def _check_both_paths(model, rows):
    """One call with all rows and one call per row: the same answers (to onnxruntime's
    last float32 bit between a 1-row and an n-row kernel), the same error as the first
    bad row's own (its message naming its index), the same profile of what was served."""
    by_batch, by_rows = Agent("dev-b"), Agent("dev-r")
    try:
        by_batch.activate(model)
        by_rows.activate(model)
        whole = _served(by_batch, rows)
        ones = [_served(by_rows, [r]) for r in rows]
        bad = [i for i, o in enumerate(ones) if o[0] == "error"]
        if bad:
            i = bad[0]
            kind, feature, text = ones[i][1]
            assert whole == ("error", (kind, feature, text.replace("row 0:", f"row {i}:", 1)))
        else:
            assert whole[0] == "ok", whole
            got = whole[1]
            labels = np.concatenate([o[1].labels for o in ones])
            proba = np.concatenate([o[1].probabilities for o in ones])
            # float32 sums of large inputs round apart between a 1-row and an n-row kernel
            np.testing.assert_allclose(got.probabilities, proba, rtol=1e-4, atol=1e-5)
            top = np.sort(got.probabilities, axis=1)
            clear = top[:, -1] - top[:, -2] > 1e-3  # (a near tie may go either way)
            np.testing.assert_array_equal(got.labels[clear], labels[clear])
            same_outputs = np.array_equal(got.probabilities, proba, equal_nan=True)
            # the packager's fidelity gate runs the same rows through run_columns
            cells = [model.validator.row(r, i) for i, r in enumerate(rows)]
            ref = model.runner.run_columns(model.validator.from_cells(cells).columns)
            np.testing.assert_array_equal(got.labels, ref.labels)
        a, b = by_batch.close_window(), by_rows.close_window()
        assert a.errors == ({"input": 1} if bad else {})
        assert b.errors == ({"input": len(bad)} if bad else {})
        assert a.rows == (0 if bad else len(rows)) and b.rows == len(rows) - len(bad)
        if not bad:  # the inputs exactly, the outputs when the kernels agreed to the bit
            assert a.profile.keys() == b.profile.keys() and a.profile["in"] == b.profile["in"]
            assert a.profile["out"] == b.profile["out"] or not same_outputs
    finally:
        by_batch.close()
        by_rows.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rows_alone_and_in_a_batch_agree_on_a_mixed_model(mixed, data):
    kinds = {s.name: s.kind for s in mixed.manifest.inputs}
    _check_both_paths(mixed, data.draw(_served_rows(kinds)))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rows_alone_and_in_a_batch_agree_on_a_tensor_model(load, data):
    model = load()
    assert model.manifest.binding.layout == "tensor"  # one float tensor: the struct path
    kinds = {s.name: s.kind for s in model.manifest.inputs}
    _check_both_paths(model, data.draw(_served_rows(kinds)))


def test_the_switch_interval_is_short_only_while_a_worker_profiles():
    import sys

    from edge_agent.agent import SWITCH_INTERVAL_S, prompt_switching

    before = sys.getswitchinterval()
    assert before > SWITCH_INTERVAL_S
    with prompt_switching():
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        with prompt_switching():  # a second agent's worker at the same time
            assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), prompt_switching():
        raise RuntimeError("a failing chunk")
    assert sys.getswitchinterval() == before


def test_an_agent_leaves_the_switch_interval_as_it_found_it(agent, load):
    import sys

    before = sys.getswitchinterval()
    agent.activate(load())
    data = rows(2 * CHUNK_ROWS + 5)
    for r in data:  # two chunks woken by the request path, the rest by flush
        agent.predict([r])
    agent.predict(data[:50])  # a batch wakes the worker too
    assert agent.flush(30)
    assert sys.getswitchinterval() == before


def test_a_chunk_of_single_rows_is_assembled_as_one_conversion_would(load, mixed):
    from edge_agent.window import STEP_CELLS, OpenWindow

    for model, data in ((load(), rows(700)), (mixed, _mixed_rows(700, seed=4))):
        cells = [model.validator.row(r, i) for i, r in enumerate(data)]
        assert len(cells) * len(model.validator.names) > 2 * STEP_CELLS  # several steps
        outputs = [model.run_row(c) for c in cells]
        batch, joined = OpenWindow(model, 0.0)._assemble(
            [(c, o, f"id-{i}", 0.0) for i, (c, o) in enumerate(zip(cells, outputs, strict=True))])
        whole = model.validator.from_cells(cells)
        assert batch.rows == whole.rows
        for name in model.validator.names:
            np.testing.assert_array_equal(batch.columns[name], whole.columns[name])
            assert batch.columns[name].dtype == whole.columns[name].dtype
        if whole.matrix is not None:
            np.testing.assert_array_equal(batch.matrix, whole.matrix)
        for got, parts in zip(joined, zip(*outputs, strict=True), strict=True):
            if parts[0] is not None:
                np.testing.assert_array_equal(got, np.concatenate(parts))
