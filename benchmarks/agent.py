"""Agent benchmark: what serving through the agent costs over bare onnxruntime, and the
cost and size of always-on profiling.

Run from the repository root::

    .venv/bin/python benchmarks/agent.py [--quick] [--out benchmarks/out/agent.json]

In one run, side by side:

1. **Latency.** For the packager benchmark's reference models (same data and estimators,
   see benchmarks/packager.py), a bare ``session.run`` on a ready float32 array against
   :meth:`edge_agent.agent.Agent.predict` with profiling on: one row as a dict (what an app
   sends), one row as a list in schema order, and 1,000-row batches as a float64 array.
   Medians of warm blocks. The agent's profiling worker runs during the timed blocks, as on
   a device; "amortised" adds the time to profile what the block served (the worker's
   backlog, drained after the block), so it is the agent's whole cost per call.
2. **Profiling 10,000 rows x 20 numeric features** with :class:`edgefleet.contract.profile.Profile`,
   next to whylogs (``why.log`` on the same rows as a DataFrame) when it is installed.
   whylogs computes more (KLL quantile sketches, frequent items, cardinality): it is the
   tool an engineer would otherwise reach for, not the same computation.
3. **Summary size on the wire** for a window of 20 numeric features (plus class and
   confidence outputs): the deflated payload the agent publishes, and its JSON.
4. **Prediction ids and outcomes, per row.** On the request path: making the agent's ids
   (:func:`edge_agent.answers.new_ids`) and checking a caller's ids, for a 1,000-row batch and
   for one row. Off it, in the profiling worker: the CBPE estimate sums (the window's
   ``_estimate``, raw probabilities as the bundle has no calibration map) and writing the
   predictions to the prediction store (SQLite, a temporary file); and joining outcomes
   (``PredictionStore.record``, 1,000 at a time). ``--outcomes-only`` runs this section
   alone (on the logistic regression).
5. **Resident memory** of the agent (the whole daemon: config, trust store, outbox, MQTT
   link, local endpoint, verified bundle, profiling) against a bare process holding the
   same model in an onnxruntime session, each after serving the same 2,000 rows, in fresh
   processes.

Not measured: multi-threaded sessions, a real device's CPU, network costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
# the repository first; not this directory (benchmarks/packager.py would shadow `packager`)
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from benchmarks.common import blocks, finish, table  # noqa: E402
from benchmarks.packager import BATCH, _data, _families, _write_csv  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.model import LoadedModel  # noqa: E402
from edgefleet.contract.bundle import verify_bundle  # noqa: E402
from edgefleet.contract.messages import LATENCY_EDGES_MS, Summary, encode  # noqa: E402
from edgefleet.contract.profile import Profile, ProfileSpec, numeric_spec, to_wire  # noqa: E402
from edgefleet.contract.signing import TrustStore, generate_key, write_key_pair  # noqa: E402
from edgefleet.contract.wire import canonical_json  # noqa: E402
from packager.build import BuildOptions, build  # noqa: E402

FAMILIES = ("LogisticRegression", "MLPClassifier", "RandomForestClassifier",
            "HistGradientBoostingClassifier")
LIBRARIES = ("edgefleet", "numpy", "onnxruntime", "scikit-learn", "skl2onnx", "paho-mqtt",
             "whylogs", "pandas")


@dataclass(frozen=True)
class Repeats:
    warmup: int
    single: int
    batch: int
    profile: int


FULL = Repeats(warmup=50, single=2000, batch=40, profile=20)
QUICK = Repeats(warmup=5, single=100, batch=4, profile=3)


def _bundle(name: str, make: Any, work: Path, key: Path) -> Path:
    from threadpoolctl import threadpool_limits

    x, y = _data("classification")
    train, held = slice(0, len(x) - BATCH), slice(len(x) - BATCH, len(x))
    d = work / name
    d.mkdir()
    _write_csv(d / "train.csv", x[train], y[train])
    _write_csv(d / "eval.csv", x[held], y[held])
    with threadpool_limits(1):
        joblib.dump(make().fit(x[train], y[train]), d / "model.joblib")
        result = build(BuildOptions(model=d / "model.joblib", train_data=d / "train.csv",
                                    target="target", name=name.lower(), version="1.0.0",
                                    key=key, eval_data=d / "eval.csv", out_dir=d))
    return result.path


def _latency(path: Path, trust: TrustStore, rep: Repeats) -> dict[str, Any]:
    model = LoadedModel(verify_bundle(path.read_bytes(), trust))
    x, _ = _data("classification")
    rows64 = x[-BATCH:]
    session = model.runner.session
    # the graph's own input type (tree pipelines take float64, see packager.convert)
    ready = rows64.astype(np.float64 if session.get_inputs()[0].type == "tensor(double)"
                          else np.float32)
    names = model.validator.names
    dicts = [dict(zip(names, map(float, r), strict=True)) for r in rows64]
    lists = [list(map(float, r)) for r in rows64]
    inp = session.get_inputs()[0].name
    outs = [o.name for o in session.get_outputs()]
    agent = Agent("bench")
    agent.activate(model)

    single = blocks({
        "bare": lambda i: session.run(outs, {inp: ready[i % BATCH: i % BATCH + 1]}),
        "agent_dict": lambda i: agent.predict([dicts[i % BATCH]]),
        "agent_list": lambda i: agent.predict([lists[i % BATCH]]),
    }, rep.warmup, rep.single)
    batch = blocks({
        "bare": lambda i: session.run(outs, {inp: ready}),
        "agent_array": lambda i: agent.predict(rows64),
    }, 2, rep.batch)

    # amortised: a block of calls plus the time to profile everything it served
    def amortised(call, n: int) -> float:
        agent.close_window()
        start = time.perf_counter()
        for i in range(n):
            call(i)
        agent.close_window()  # finishes the window: profiles every buffered row
        return (time.perf_counter() - start) / n * 1e6

    single_amortised = amortised(lambda i: agent.predict([dicts[i % BATCH]]), rep.single)
    batch_amortised = amortised(lambda i: agent.predict(rows64), rep.batch)
    agent.close()
    return {"single": single, "batch": batch, "single_amortised_us": single_amortised,
            "batch_amortised_us": batch_amortised}


def _profile_speed(rep: Repeats) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(10_000, 20))
    live = rng.normal(0.1, 1.1, size=(10_000, 20))
    spec = ProfileSpec(tuple(numeric_spec(f"f{i:02d}", ref[:, i]) for i in range(20)))
    columns = {f"f{i:02d}": live[:, i] for i in range(20)}
    times = []
    for _ in range(rep.profile + 2):
        profile = Profile(spec)
        start = time.perf_counter()
        profile.update(columns, rows=10_000, matrix=live)
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {"edgefleet_ms": float(np.median(times[2:]) * 1e3),
                           "edgefleet_p90_ms": float(np.percentile(times[2:], 90) * 1e3)}
    try:
        import pandas as pd
        import whylogs as why
    except ImportError as exc:
        out["whylogs"] = f"not installed ({exc})"
        return out
    frame = pd.DataFrame(live, columns=list(columns))
    why.log(frame)  # warm-up
    wtimes = []
    for _ in range(max(3, rep.profile // 4)):
        start = time.perf_counter()
        why.log(frame)
        wtimes.append(time.perf_counter() - start)
    out["whylogs_ms"] = float(np.median(wtimes) * 1e3)
    return out


def _summary_size(performance: tuple = ()) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(5_000, 20))
    from edgefleet.contract.profile import CONFIDENCE_EDGES, NumericSpec, categorical_spec

    spec = ProfileSpec(tuple(numeric_spec(f"feature_{i:02d}", ref[:, i]) for i in range(20)),
                       (categorical_spec("class", ["0", "1"]),
                        NumericSpec("confidence", CONFIDENCE_EDGES)))
    profile = Profile(spec)
    live = rng.normal(0.05, 1.0, size=(3_000, 20))
    profile.update({f"feature_{i:02d}": live[:, i] for i in range(20)},
                   {"class": rng.integers(0, 2, 3_000),
                    "confidence": rng.uniform(0.5, 1, 3_000)}, rows=3_000)
    from edgefleet.contract.messages import BundleRef

    summary = Summary("press-017", 12345, BundleRef("churn", "1.4.2", "ab" * 32), 1.7e9,
                      1.7e9 + 60, to_wire(profile),
                      tuple(rng.integers(0, 500, len(LATENCY_EDGES_MS) + 1).tolist()),
                      {"input": 3}, performance=performance)
    return {"wire_bytes": len(encode(summary)), "json_bytes": len(canonical_json(
        summary.to_dict())), "rows": 3_000, "features": 20}


# imports only onnxruntime and numpy (importing edge_agent here hid 13 MiB, issue 13)
_BARE = """
import sys, json, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession({onnx!r}, o, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).normal(size=(2000, 20)).astype(np.float32)
outs = [v.name for v in s.get_outputs()]; name = s.get_inputs()[0].name
for i in range(2000):
    s.run(outs, {{name: x[i:i + 1]}})
rss = dict((line.split(":")[0], int(line.split()[1])) for line in open("/proc/self/status")
           if line.startswith(("VmRSS:", "VmHWM:")))
assert not any(m.split(".")[0] in ("edge_agent", "edgefleet", "benchmarks") for m in sys.modules)
print(json.dumps({{"rss_kib": rss["VmRSS"], "peak_kib": rss["VmHWM"]}}))
"""

_AGENT = """
import sys, json, time, numpy as np
sys.path.insert(0, {root!r})
from benchmarks.common import rss_kib
from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
daemon = AgentDaemon(load_config({config!r}))
daemon.start()  # verifies and loads the installed bundle; the broker is not there: it retries
names = daemon.agent.model.validator.names
x = np.random.default_rng(0).normal(size=(2000, 20))
for i in range(2000):
    daemon.agent.predict([dict(zip(names, map(float, x[i])))])
daemon.agent.close_window()
time.sleep(0.5)
print(json.dumps(rss_kib()))
daemon.stop(flush_timeout=0)
"""


def _memory(path: Path, keys: Path, work: Path) -> dict[str, Any]:
    from edge_agent.slots import Slots, State
    from edgefleet.contract.wire import sha256_hex

    data = path.read_bytes()
    manifest = verify_bundle(data, TrustStore.from_files([str(keys)])).manifest
    agent_dir = work / "agent"
    slots = Slots(agent_dir / "data")
    sha = sha256_hex(data)
    slots.store(sha, data)
    from edgefleet.contract.messages import BundleRef

    slots.commit(State(BundleRef(manifest.name, manifest.version, sha, "", len(data))))
    secret = agent_dir / "secret"
    secret.write_text("x\n")
    secret.chmod(0o600)
    config = agent_dir / "agent.toml"
    config.write_text(textwrap.dedent(f"""
        [device]
        id = "bench"
        [broker]
        host = "127.0.0.1"
        port = 9
        password_file = "{secret}"
        [trust]
        keys = ["{keys}"]
        [agent]
        data_dir = "{agent_dir / 'data'}"
        http_port = 0
    """))

    def run(code: str) -> dict[str, int]:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, cwd=_ROOT)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    from edgefleet.contract.bundle import read_unverified

    onnx = work / "bare-model.onnx"
    onnx.write_bytes(read_unverified(data).member("model.onnx"))
    bare = [run(_BARE.format(onnx=str(onnx))) for _ in range(3)]
    agent = [run(_AGENT.format(root=str(_ROOT), config=str(config))) for _ in range(3)]

    def median(samples: list[dict[str, int]], key: str) -> int:
        return int(np.median([s[key] for s in samples]))

    return {"bare_rss_kib": median(bare, "rss_kib"), "bare_peak_kib": median(bare, "peak_kib"),
            "agent_rss_kib": median(agent, "rss_kib"),
            "agent_peak_kib": median(agent, "peak_kib"), "samples": {"bare": bare,
                                                                     "agent": agent}}


def _outcomes(path: Path, trust: TrustStore, rep: Repeats, work: Path) -> dict[str, Any]:
    from edge_agent.answers import check_ids, new_ids
    from edge_agent.predictions import PredictionStore

    model = LoadedModel(verify_bundle(path.read_bytes(), trust))
    x, y = _data("classification")
    rows64 = x[-BATCH:]
    store = PredictionStore(work / "bench-predictions.db")
    agent = Agent("bench", store=store)
    agent.activate(model)
    result = agent.predict(rows64)
    agent.flush()
    window = agent._window
    caller = [f"order-{i:08d}" for i in range(BATCH)]
    proba = np.asarray(result.probabilities)
    predicted = np.asarray(result.labels).astype(np.int64)
    n_add = [0]

    def add(i: int) -> None:
        n_add[0] += 1
        ids = [f"b{n_add[0]}-{j}" for j in range(BATCH)]
        store.add(window.store[1], ids, 1.0e9, predicted, proba)

    timed = blocks({
        "ids_1k": lambda i: new_ids("0123456789ab-", i * BATCH, BATCH),
        "ids_1": lambda i: new_ids("0123456789ab-", i, 1),
        "floor_1": lambda i: None,  # the timing's own cost per call
        "caller_ids_1k": lambda i: check_ids(caller),
        "estimate_1k": lambda i: window._estimate(proba, predicted),
        "store_1k": add,
    }, 2, rep.batch * 5)
    served = list(result.ids)
    truth = [int(v) for v in y[-BATCH:]]
    start = time.perf_counter()
    store.record(zip(served, truth, strict=True))
    join_us = (time.perf_counter() - start) / BATCH * 1e6
    # the summary above with a binary task's performance: the window's estimate over 3,000
    # rows and the realized block of 500 labelled ones (scores spread over the histograms)
    from edgefleet.contract.messages import BundleRef
    from edgefleet.contract.performance import (
        Estimated,
        PerformanceEntry,
        PerformanceSpec,
        Realized,
    )

    rng = np.random.default_rng(3)
    pspec = PerformanceSpec("classification", (0, 1))
    est, real = Estimated(pspec), Realized(pspec)
    p1 = rng.uniform(0, 1, 3_000)
    est.add(p1, (p1 > 0.5).astype(np.int64))
    truth_r = (rng.uniform(0, 1, 500) < p1[:500]).astype(np.int64)
    real.add((p1[:500] > 0.5).astype(np.int64), truth_r,
             np.column_stack([1 - p1[:500], p1[:500]]), rng.uniform(0, 86_400, 500))
    sized = _summary_size((PerformanceEntry(BundleRef("churn", "1.4.2", "ab" * 32),
                                            real.to_wire(), est.to_wire()),))
    agent.close()
    store.close()
    per_row = {k: v["median_us"] * 1e3 / (1 if k.endswith("_1") else BATCH)
               for k, v in timed.items()}
    return {"ns_per_row": per_row, "join_us_per_outcome": join_us, "timed": timed,
            "summary_with_performance": sized}


def _us(stats: dict[str, Any], key: str) -> str:
    return f"{stats[key]['median_us']:.1f}"


def _outcomes_report(o: dict[str, Any]) -> str:
    ns = o["ns_per_row"]
    return "\n".join([
        "\nPrediction ids and outcomes, per row (medians; target: ids + estimate < 1 µs):\n",
        table(["step", "where", "ns / row"], [
            ["agent ids, 1,000-row batch", "request path", f"{ns['ids_1k']:.0f}"],
            ["agent id, one row", "request path", f"{ns['ids_1']:.0f}"],
            ["(timing floor: an empty call)", "", f"{ns['floor_1']:.0f}"],
            ["caller ids checked, 1,000", "request path", f"{ns['caller_ids_1k']:.0f}"],
            ["estimate sums (CBPE)", "worker", f"{ns['estimate_1k']:.0f}"],
            ["prediction store write", "worker", f"{ns['store_1k']:.0f}"],
            ["outcome joined (1,000 at once)", "outcome call",
             f"{o['join_us_per_outcome'] * 1e3:.0f}"]]),
        f"\nSummary with a binary task's performance (estimate and realized), 20 numeric "
        f"features: {o['summary_with_performance']['wire_bytes']:,} bytes deflated "
        f"(target <= 3 KB)"])


def report(doc: dict[str, Any]) -> str:
    out = []
    if "latency" not in doc:
        return _outcomes_report(doc["outcomes"])
    rows = []
    for name, r in doc["latency"].items():
        s, b = r["single"], r["batch"]
        bare_s, bare_b = s["bare"]["median_us"], b["bare"]["median_us"]
        rows.append([name, _us(s, "bare"), _us(s, "agent_dict"),
                     f"{s['agent_dict']['median_us'] / bare_s:.2f}", _us(s, "agent_list"),
                     f"{s['agent_list']['median_us'] / bare_s:.2f}",
                     f"{r['single_amortised_us']:.1f}", f"{bare_b / 1e3:.3f}",
                     f"{b['agent_array']['median_us'] / 1e3:.3f}",
                     f"{b['agent_array']['median_us'] / bare_b:.2f}",
                     f"{r['batch_amortised_us'] / 1e3:.3f}",
                     f"{r['batch_amortised_us'] / bare_b:.2f}"])
    out.append("Latency, medians (single row in µs, 1,000-row batch in ms); ratios are "
               "agent / bare (target: <= 1.25 single-row on the MLP, <= 1.05 on batches):\n")
    out.append(table(["model", "bare 1", "agent dict", "ratio", "agent list", "ratio",
                      "amortised", "bare 1k", "agent 1k", "ratio", "amortised 1k", "ratio"],
                     rows))
    p = doc["profile"]
    whylogs = (f"{p['whylogs_ms']:.1f}" if "whylogs_ms" in p else p.get("whylogs", "n/a"))
    out.append("\nProfiling 10,000 rows x 20 numeric features (target <= 15 ms):\n")
    out.append(table(["profiler", "ms (median)"],
                     [["edgefleet Profile.update", f"{p['edgefleet_ms']:.1f}"],
                      ["whylogs why.log", whylogs]]))
    z = doc["summary"]
    out.append(f"\nSummary on the wire, {z['features']} numeric features + class + "
               f"confidence, {z['rows']:,} rows: {z['wire_bytes']:,} bytes deflated "
               f"({z['json_bytes']:,} bytes of JSON) (target <= 2 KB)")
    m = doc["memory"]
    out.append("\nResident memory after serving 2,000 rows (median of 3 fresh processes; "
               "target <= 1.3x):\n")
    out.append(table(["process", "RSS MiB", "peak MiB"],
                     [["bare onnxruntime session", f"{m['bare_rss_kib'] / 1024:.1f}",
                       f"{m['bare_peak_kib'] / 1024:.1f}"],
                      ["edge-agent daemon", f"{m['agent_rss_kib'] / 1024:.1f}",
                       f"{m['agent_peak_kib'] / 1024:.1f}"],
                      ["ratio", f"{m['agent_rss_kib'] / m['bare_rss_kib']:.2f}x",
                       f"{m['agent_peak_kib'] / m['bare_peak_kib']:.2f}x"]]))
    if "outcomes" in doc:
        out.append(_outcomes_report(doc["outcomes"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/agent.json"),
                        help="where to write the JSON results (default: %(default)s)")
    parser.add_argument("--outcomes-only", action="store_true",
                        help="only the prediction ids and outcomes section")
    args = parser.parse_args(argv)
    rep = QUICK if args.quick else FULL
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    clock, cpu = time.perf_counter(), time.process_time()
    families = {name: make for name, _, make in _families() if name in FAMILIES
                and (not args.outcomes_only or name == "LogisticRegression")}
    doc: dict[str, Any] = {"benchmark": "agent", "schema": 1, "quick": args.quick,
                           "started_at": started.isoformat(), "repeats": rep.__dict__,
                           "latency": {}}
    with tempfile.TemporaryDirectory(prefix="edgefleet-agent-bench-") as tmp:
        work = Path(tmp)
        key, pub = write_key_pair(generate_key(), work / "keys", "bench")
        trust = TrustStore.from_files([str(pub)])
        paths = {}
        for name, make in families.items():
            print(f"building {name}", file=sys.stderr, flush=True)
            paths[name] = _bundle(name, make, work, key)
        print("ids and outcomes", file=sys.stderr, flush=True)
        doc["outcomes"] = _outcomes(paths["LogisticRegression"], trust, rep, work)
        if args.outcomes_only:
            del doc["latency"]
            finish(doc, args.out, LIBRARIES, clock, cpu, load_before, report)
            return 0
        for name, path in paths.items():
            print(f"latency {name}", file=sys.stderr, flush=True)
            doc["latency"][name] = _latency(path, trust, rep)
        print("profile, summary, memory", file=sys.stderr, flush=True)
        doc["profile"] = _profile_speed(rep)
        doc["summary"] = _summary_size()
        doc["memory"] = _memory(paths["MLPClassifier"], pub, work)
    finish(doc, args.out, LIBRARIES, clock, cpu, load_before, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
