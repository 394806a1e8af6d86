"""Mixed-input benchmark: the agent against bare onnxruntime on the models users ship.

Run from the repository root::

    .venv/bin/python benchmarks/mixed.py [--quick] [--out benchmarks/out/mixed.json]

Four or five models, built in this run with edgepack's library API (:func:`packager.build.build`)
from synthetic data:

- ``mixed-logreg``: ``ColumnTransformer`` (3 numeric: ``SimpleImputer`` + ``StandardScaler``;
  2 string columns: ``OneHotEncoder(handle_unknown="ignore")``) + ``LogisticRegression``;
- ``mixed-hgb``: the same preprocessing + ``HistGradientBoostingClassifier`` (built with
  ``force`` when the fidelity gate refuses it: issue 13's packager part; the build's note
  is kept in the JSON);
- ``mlp-30``: ``StandardScaler`` + ``MLPClassifier``, 30 numeric features;
- ``rf-30``: ``RandomForestClassifier``, 200 trees, 30 numeric features;
- ``mixed-xgb``: the mixed preprocessing + ``XGBClassifier`` (100 trees, depth 6), when
  xgboost is installed (``edgefleet[xgboost]``); left out of the table otherwise.

For each, side by side in one process, in interleaved blocks (:func:`benchmarks.common.blocks`:
two rounds, the second in reverse order), medians:

- one row: a bare ``session.run`` on ready arrays against :meth:`Agent.predict` on one dict
  (what an app sends), profiling on; beside them the session's compiled ``run`` on the
  same arrays, past ``InferenceSession.run``'s Python checks (what the agent calls);
- 1,000 rows: bare ``session.run`` on ready arrays, the agent on 1,000 dicts, the agent on a
  float64 array (all-numeric models only), scikit-learn's ``predict_proba`` on the same
  rows as a DataFrame;
- tail: p50 and p99 of single-row calls over a long run with profiling on (every chunk the
  worker profiles lands inside it), and "amortised": the same calls plus the time to profile
  everything they served (:meth:`Agent.flush`), per call;
- resident memory after serving 2,000 single rows: a fresh process that imports only
  onnxruntime and numpy and serves the bundle's ``model.onnx``, against a fresh process
  serving the bundle through :class:`~edge_agent.agent.Agent` (verify, load, profile);
  median of three each.

Not measured: the daemon's MQTT link, outbox and HTTP endpoint (benchmarks/agent.py),
multi-threaded sessions, a real device's CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

_ROOT = Path(__file__).resolve().parent.parent
# the repository first; not this directory (benchmarks/packager.py would shadow `packager`)
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from benchmarks.common import blocks, finish, table  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.model import LoadedModel  # noqa: E402
from edgefleet.contract.bundle import read_unverified, verify_bundle  # noqa: E402
from edgefleet.contract.signing import TrustStore, generate_key, write_key_pair  # noqa: E402
from packager.build import BuildOptions, build  # noqa: E402
from packager.errors import PackagerError  # noqa: E402

LIBRARIES = ("edgefleet", "numpy", "onnxruntime", "scikit-learn", "skl2onnx", "pandas",
             "xgboost", "onnxmltools")
ROWS = 6_000
BATCH = 1_000
SEED = 7
NUMERIC = ("temp", "pressure", "rpm")
CATEGORIES = {"site": ("north", "south", "east", "west", "lab"),
              "mode": ("idle", "run", "boost", "service")}


@dataclass(frozen=True)
class Repeats:
    warmup: int
    single: int
    batch: int
    tail: int
    memory: int


FULL = Repeats(warmup=200, single=3000, batch=40, tail=20_000, memory=3)
QUICK = Repeats(warmup=10, single=200, batch=4, tail=1_000, memory=1)


# ----------------------------------------------------------------------------- data


def mixed_frame(n: int, seed: int = SEED) -> pd.DataFrame:
    """3 numeric columns (``temp`` with 5 % missing) and 2 string columns; ``target``."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "temp": rng.normal(60, 12, n), "pressure": rng.gamma(4, 2.5, n),
        "rpm": rng.normal(3000, 600, n).round(),
        "site": rng.choice(CATEGORIES["site"], n), "mode": rng.choice(CATEGORIES["mode"], n)})
    score = (0.08 * (frame["temp"] - 60) + 0.2 * (frame["pressure"] - 10)
             + 0.002 * (frame["rpm"] - 3000) + (frame["mode"] == "boost") * 1.5
             - (frame["site"] == "lab") * 1.0 + rng.normal(0, 1, n))
    frame.loc[rng.random(n) < 0.05, "temp"] = np.nan
    frame["target"] = (score > 0).astype(int)
    return frame


def numeric_frame(n: int, seed: int = SEED) -> pd.DataFrame:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=30, n_informative=12, n_redundant=6,
                               random_state=seed)
    frame = pd.DataFrame(x, columns=[f"x{i:02d}" for i in range(30)])
    frame["target"] = y
    return frame


def _mixed_pre():
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    return ColumnTransformer([
        ("num", Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())]),
         list(NUMERIC)),
        ("cat", OneHotEncoder(handle_unknown="ignore"), list(CATEGORIES))])


def models() -> dict[str, tuple[str, Any]]:
    """name → (data kind, a fresh unfitted estimator)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    found = {
        "mixed-logreg": ("mixed", Pipeline([("pre", _mixed_pre()),
                                            ("model", LogisticRegression(max_iter=500))])),
        "mixed-hgb": ("mixed", Pipeline([("pre", _mixed_pre()), (
            "model", HistGradientBoostingClassifier(max_iter=100, random_state=0))])),
        "mlp-30": ("numeric", Pipeline([("scale", StandardScaler()), (
            "model", MLPClassifier((32,), max_iter=300, random_state=0))])),
        "rf-30": ("numeric", RandomForestClassifier(200, max_depth=12, random_state=0,
                                                    n_jobs=1)),
    }
    try:
        from xgboost import XGBClassifier
    except ImportError:
        print("xgboost is not installed: mixed-xgb is left out", file=sys.stderr)
        return found
    found["mixed-xgb"] = ("mixed", Pipeline([("pre", _mixed_pre()), ("model", XGBClassifier(
        n_estimators=100, max_depth=6, learning_rate=0.1, n_jobs=1, random_state=0))]))
    return found


# ----------------------------------------------------------------------------- build


def _build(name: str, kind: str, estimator: Any, work: Path, key: Path
           ) -> tuple[Path, Any, pd.DataFrame, list[str]]:
    from threadpoolctl import threadpool_limits

    frame = mixed_frame(ROWS) if kind == "mixed" else numeric_frame(ROWS)
    train, held = frame.iloc[:-BATCH], frame.iloc[-BATCH:]
    d = work / name
    d.mkdir()
    train.to_csv(d / "train.csv", index=False)
    held.to_csv(d / "eval.csv", index=False)
    features = [c for c in frame.columns if c != "target"]
    notes: list[str] = []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = estimator.fit(train[features], train["target"])
        joblib.dump(fitted, d / "model.joblib")
        opts = BuildOptions(model=d / "model.joblib", train_data=d / "train.csv",
                            target="target", name=name, version="1.0.0", key=key,
                            eval_data=d / "eval.csv", out_dir=d)
        try:
            result = build(opts)
        except PackagerError as exc:  # the mixed HGB before issue 13's packager part
            notes.append(f"built with force: {type(exc).__name__}: {str(exc)[:300]}")
            opts = BuildOptions(**{**opts.__dict__, "force": True})
            result = build(opts)
    notes.extend(result.notes)
    # the held-out rows as pandas would hand them over (categoricals as str)
    return result.path, fitted, held[features].reset_index(drop=True), notes


# ----------------------------------------------------------------------------- measure


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as an app sends them: plain Python values, None for missing."""
    out = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
             for k, v in r.items()} for r in out]


def _bare_feeds(session: Any, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Ready feeds for ``session`` from ``frame``, the way the graph declares its inputs."""
    kinds = {"tensor(float)": np.float32, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(string)": object}
    inputs = session.get_inputs()
    if len(inputs) == 1 and inputs[0].name not in frame.columns:  # one tensor
        return {inputs[0].name: frame.to_numpy(dtype=kinds[inputs[0].type])}
    feeds = {}
    for i in inputs:
        col = frame[i.name]
        feeds[i.name] = (col.fillna("").astype(str).to_numpy(dtype=object) if
                         kinds[i.type] is object else col.to_numpy(dtype=kinds[i.type]))
        feeds[i.name] = feeds[i.name].reshape(-1, 1)
    return feeds


def _percentiles(ns: list[int], preempted: list[bool]) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1e3
    kept = us[~np.asarray(preempted, dtype=bool)]
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "p999_us": float(np.percentile(us, 99.9)), "max_us": float(us.max()),
            "n": len(ns), "preempted_share": float(np.mean(preempted)),
            "unpreempted_p50_us": float(np.percentile(kept, 50)),
            "unpreempted_p99_us": float(np.percentile(kept, 99))}


def _latency(path: Path, fitted: Any, held: pd.DataFrame, trust: TrustStore,
             rep: Repeats) -> dict[str, Any]:
    model = LoadedModel(verify_bundle(path.read_bytes(), trust))
    session = model.runner.session
    outs = [o.name for o in session.get_outputs()]
    ready = _bare_feeds(session, held)
    one = [{k: v[i:i + 1] for k, v in ready.items()} for i in range(BATCH)]
    dicts = _records(held)
    numeric = model.validator.numeric_only
    array = held.to_numpy(dtype=np.float64) if numeric else None
    agent = Agent("bench")
    agent.activate(model)

    c_run = session._sess.run  # the compiled run the agent calls (see edge_agent.model)
    single = blocks({
        "bare": lambda i: session.run(outs, one[i % BATCH]),
        "bare_c": lambda i: c_run(outs, one[i % BATCH], None),
        "agent_dict": lambda i: agent.predict([dicts[i % BATCH]]),
    }, rep.warmup, rep.single)
    contenders = {
        "bare": lambda i: session.run(outs, ready),
        "agent_dicts": lambda i: agent.predict(dicts),
        "sklearn": lambda i: fitted.predict_proba(held),
    }
    if numeric:
        contenders["agent_array"] = lambda i: agent.predict(array)
    batch = blocks(contenders, 2, rep.batch)
    agent.flush(60)

    # the tail, profiling on: a long run of single rows, then the same with the bare call.
    # On a shared machine the OS preempts some calls for whole time slices (ms); a call
    # during which this thread was switched out involuntarily (getrusage's ru_nivcsw) is
    # counted and also left out of the "unpreempted" percentiles. Waiting for the GIL is a
    # voluntary switch, so the profiling worker's share of the tail stays in both.
    import resource

    clock = time.perf_counter_ns
    usage, me = resource.getrusage, resource.RUSAGE_THREAD
    tails: dict[str, dict[str, float]] = {}
    for name, call in (("bare", lambda i: session.run(outs, one[i % BATCH])),
                       ("agent_dict", lambda i: agent.predict([dicts[i % BATCH]]))):
        ns, preempted = [], []
        for i in range(rep.tail):
            switches = usage(me).ru_nivcsw
            start = clock()
            call(i)
            ns.append(clock() - start)
            preempted.append(usage(me).ru_nivcsw != switches)
        tails[name] = _percentiles(ns, preempted)
    agent.flush(60)
    agent.close_window()

    # amortised: the calls and the profiling of what they served
    start = time.perf_counter()
    for i in range(rep.single):
        agent.predict([dicts[i % BATCH]])
    agent.flush(60)
    amortised = (time.perf_counter() - start) / rep.single * 1e6
    agent.close()
    return {"single": single, "batch": batch, "tail": tails, "single_amortised_us": amortised}


_BARE = """
import json, sys
import numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession({onnx!r}, o, providers=["CPUExecutionProvider"])
feeds = np.load({feeds!r}, allow_pickle=True)
feeds = {{k: feeds[k] for k in feeds.files}}
outs = [v.name for v in s.get_outputs()]
for i in range(2000):
    s.run(outs, {{k: v[i % 1000:i % 1000 + 1] for k, v in feeds.items()}})
rss = {{}}
for line in open("/proc/self/status"):
    if line.startswith(("VmRSS:", "VmHWM:")):
        rss[line.split(":")[0]] = int(line.split()[1])
print(json.dumps({{"rss_kib": rss["VmRSS"], "peak_kib": rss["VmHWM"],
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in (
                      "edge_agent", "edgefleet", "packager", "sklearn", "pandas"))}}))
"""

_AGENT = """
import json, sys
sys.path.insert(0, {root!r})
from edge_agent.agent import Agent
from edgefleet.contract.bundle import verify_bundle
from edge_agent.model import LoadedModel
from edgefleet.contract.signing import TrustStore
trust = TrustStore.from_files([{pub!r}])
model = LoadedModel(verify_bundle(open({bundle!r}, "rb").read(), trust))
rows = json.load(open({rows!r}))
agent = Agent("bench")
agent.activate(model)
for i in range(2000):
    agent.predict([rows[i % len(rows)]])
agent.flush(60)
agent.close_window()
rss = {{}}
for line in open("/proc/self/status"):
    if line.startswith(("VmRSS:", "VmHWM:")):
        rss[line.split(":")[0]] = int(line.split()[1])
agent.close()
print(json.dumps({{"rss_kib": rss["VmRSS"], "peak_kib": rss["VmHWM"]}}))
"""


def _memory(path: Path, pub: Path, held: pd.DataFrame, work: Path, rep: Repeats
            ) -> dict[str, Any]:
    import onnxruntime as ort

    d = work / f"{path.stem}-memory"
    d.mkdir()
    onnx = d / "model.onnx"
    onnx.write_bytes(read_unverified(path.read_bytes()).member("model.onnx"))
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    feeds = _bare_feeds(session, held)
    np.savez(d / "feeds.npz", **feeds)
    (d / "rows.json").write_text(json.dumps(_records(held)))

    def run(code: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=600, cwd=d)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    bare, agent = [], []
    for _ in range(rep.memory):  # interleaved
        bare.append(run(_BARE.format(onnx=str(onnx), feeds=str(d / "feeds.npz"))))
        agent.append(run(_AGENT.format(root=str(_ROOT), pub=str(pub), bundle=str(path),
                                       rows=str(d / "rows.json"))))
    if bare[0]["modules"]:
        raise RuntimeError(f"the bare process imported {bare[0]['modules'][:5]}")

    def median(samples: list[dict[str, Any]], key: str) -> int:
        return int(np.median([s[key] for s in samples]))

    return {"bare_rss_kib": median(bare, "rss_kib"), "bare_peak_kib": median(bare, "peak_kib"),
            "agent_rss_kib": median(agent, "rss_kib"),
            "agent_peak_kib": median(agent, "peak_kib"),
            "samples": {"bare": [{k: v for k, v in s.items() if k != "modules"} for s in bare],
                        "agent": agent}}


# ----------------------------------------------------------------------------- report


def report(doc: dict[str, Any]) -> str:
    rows, tails = [], []
    for name, r in doc["models"].items():
        s, b, t = r["latency"]["single"], r["latency"]["batch"], r["latency"]["tail"]
        bare1, agent1 = s["bare"]["median_us"], s["agent_dict"]["median_us"]
        bare_c = s.get("bare_c", {}).get("median_us")
        bare_k, dicts_k = b["bare"]["median_us"], b["agent_dicts"]["median_us"]
        sk = b["sklearn"]["median_us"]
        arr = b.get("agent_array", {}).get("median_us")
        m = r["memory"]
        rows.append([
            name, f"{bare1:.1f}", "n/a" if bare_c is None else f"{bare_c:.1f}",
            f"{agent1:.1f}", f"{agent1 / bare1:.2f}x",
            f"{agent1 - bare1:+.1f}", f"{bare_k / 1e3:.3f}", f"{dicts_k / 1e3:.3f}",
            f"{dicts_k / bare_k:.2f}x", "n/a" if arr is None else f"{arr / 1e3:.3f}",
            "n/a" if arr is None else f"{arr / bare_k:.2f}x", f"{sk / 1e3:.3f}",
            f"{dicts_k / sk:.2f}x",
            f"{m['agent_rss_kib'] / 1024:.1f} / {m['bare_rss_kib'] / 1024:.1f}",
            f"{m['agent_rss_kib'] / m['bare_rss_kib']:.2f}x"])
        ta, tb = t["agent_dict"], t["bare"]
        tails.append([name, f"{tb['p50_us']:.1f}", f"{tb['p99_us']:.1f}",
                      f"{tb['unpreempted_p99_us'] / tb['unpreempted_p50_us']:.2f}x",
                      f"{tb.get('p999_us', math.nan):.0f}",
                      f"{ta['p50_us']:.1f}", f"{ta['p99_us']:.1f}",
                      f"{ta['p99_us'] / ta['p50_us']:.2f}x",
                      f"{ta.get('p999_us', math.nan):.0f}",
                      f"{ta['unpreempted_p99_us'] / ta['unpreempted_p50_us']:.2f}x",
                      f"{100 * tb['preempted_share']:.2f} / {100 * ta['preempted_share']:.2f}",
                      f"{r['latency']['single_amortised_us']:.1f}"])
    out = ["Medians of interleaved blocks; single row in µs, 1,000 rows in ms; ratios agent / "
           "bare (targets: single <= 1.25x or <= +4 µs when bare < 16 µs; 1k dicts <= 2x "
           "bare and below scikit-learn; RSS <= 1.25x). \"C run\": the compiled run "
           "past InferenceSession.run's Python checks, which the agent calls:\n",
           table(["model", "bare 1", "C run 1", "agent 1", "ratio", "+µs", "bare 1k", "dicts 1k",
                  "ratio", "array 1k", "ratio", "sklearn 1k", "dicts/sk", "RSS MiB agent/bare",
                  "ratio"], rows),
           f"\nSingle-row tail with profiling on, {doc['repeats']['tail']:,} consecutive calls "
           "(target: agent p99 <= 2x its median); p99/p50 raw and without the calls the OS "
           "preempted (their share in %, bare / agent); amortised = calls + profiling them, "
           "per call, µs:\n",
           table(["model", "bare p50", "bare p99", "bare unpre.", "bare p99.9", "agent p50",
                  "agent p99", "p99/p50", "agent p99.9", "unpreempted", "preempted %",
                  "amortised"], tails)]
    for name, r in doc["models"].items():
        for note in r["notes"]:
            if "force" in note:
                out.append(f"\n{name}: {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this model (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/mixed.json"),
                        help="where to write the JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    rep = QUICK if args.quick else FULL
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    clock, cpu = time.perf_counter(), time.process_time()
    doc: dict[str, Any] = {"benchmark": "mixed", "schema": 1, "quick": args.quick,
                           "started_at": started.isoformat(), "repeats": rep.__dict__,
                           "rows": {"train": ROWS - BATCH, "held_out": BATCH}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgefleet-mixed-bench-") as tmp:
        work = Path(tmp)
        key, pub = write_key_pair(generate_key(), work / "keys", "bench")
        trust = TrustStore.from_files([str(pub)])
        for name, (kind, estimator) in models().items():
            if args.only and name not in args.only:
                continue
            print(f"building {name}", file=sys.stderr, flush=True)
            path, fitted, held, notes = _build(name, kind, estimator, work, key)
            print(f"measuring {name}", file=sys.stderr, flush=True)
            doc["models"][name] = {
                "notes": notes, "bundle_bytes": path.stat().st_size,
                "latency": _latency(path, fitted, held, trust, rep),
                "memory": _memory(path, pub, held, work, rep)}
    finish(doc, args.out, LIBRARIES, clock, cpu, load_before, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
