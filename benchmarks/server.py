"""Server benchmark: ingest end to end through Mosquitto, and drift reports against Evidently.

Run from the repository root::

    .venv/bin/python benchmarks/server.py [--quick] [--out benchmarks/out/server.json]

In one run:

1. **Ingest throughput, end to end.** Simulated devices publish real summary messages (a
   20-feature bundle's profiles of real rows, ``edgefleet.contract.messages.encode``d, QoS 1)
   over ``--connections`` MQTT connections of one publisher process to a real Mosquitto;
   a :class:`fleet_server.server.FleetServer` in this process ingests them into SQLite
   (WAL, ``synchronous=FULL``, a file in a temporary directory). Throughput is summaries
   stored per second, from the first publish to the commit of the last. The publisher
   runs in its own process (its CPU is not the server's), but on the same two cores.
2. **Ingest lag.** The same, paced at ``--rate`` summaries a second: each message's
   window ends at its scheduled send time, and the lag is from there to the commit of the
   transaction holding it (the ``edgefleet_ingest_lag_seconds`` definition), p50/p99.
3. **Ingest rules alone**: the drift data set below goes through
   :meth:`fleet_server.telemetry.ingest.Ingestor.process` in batches of 500 without a broker.
4. **Drift reports.** ``--devices`` devices (half labelled ``site=a``) x ``--windows``
   windows of ``--rows`` rows each, all in one hour-aligned hour, 20 numeric features
   drifting by known amounts (0 to 1 reference standard deviations, or rescaled); then
   :meth:`fleet_server.monitoring.drift.DriftService.report` for the fleet, the ``site=a``
   group, one device, and an hour that is not aligned (per-minute rollups). Median of
   ``--repeats`` after a warm-up; peak Python memory (tracemalloc) in a separate run.
5. **Evidently** (``DataDriftPreset``, its defaults) on the *equivalent raw rows*: every
   row the devices profiled, as a DataFrame, against the training data. Time and peak
   memory the same way; the DataFrame is built outside the timing. Per feature, whether
   each says "drift", next to scipy's exact KS and Wasserstein/std on the raw rows.

Not measured: several ingest workers (one shared subscription, ``fleet ingest``), TLS,
network latency, a disk slower than this machine's. Numbers are for this machine; the JSON
describes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from benchmarks.common import machine, table  # noqa: E402
from edgefleet.contract.messages import BundleRef, Status, Summary, encode, topic  # noqa: E402
from edgefleet.contract.profile import Profile, parse_reference, to_wire  # noqa: E402

LIBRARIES = ("edgefleet", "numpy", "scipy", "pandas", "sqlite-utils", "paho-mqtt", "fastapi",
             "evidently", "scikit-learn")
FEATURES = 20
TRAIN_ROWS = 5000
SEED = 0
# live data per feature: ("shift", k) adds k reference std, ("scale", s) multiplies the
# deviation from the mean by s; spread around the thresholds so agreement is tested there
TRUTH = [("shift", 0.0)] * 4 + [("shift", k) for k in (0.02, 0.04, 0.06, 0.08, 0.1, 0.12,
                                                      0.15, 0.2, 0.3, 0.5, 1.0)] + \
        [("scale", s) for s in (0.7, 1.1, 1.3)] + [("shift", 0.0), ("shift", 0.0)]
ACL = """user {server}
topic read edgefleet/v1/+/#
topic write edgefleet/v1/+/desired
user sim
topic write edgefleet/v1/+/summary
"""


@dataclass(frozen=True)
class Sizes:
    devices: int
    windows: int
    rows: int
    ingest: int  # summaries in the unpaced end-to-end run
    rate: int
    paced_s: float
    repeats: int
    connections: int


FULL = Sizes(devices=10_000, windows=12, rows=10, ingest=40_000, rate=2000, paced_s=15.0,
             repeats=5, connections=4)
QUICK = Sizes(devices=500, windows=3, rows=10, ingest=3000, rate=1000, paced_s=3.0, repeats=2,
              connections=2)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ data and bundle


def training_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cols = []
    for i in range(FEATURES):
        kind = i % 3
        cols.append(rng.normal(10.0 * i, 1.0 + i, rows) if kind == 0 else
                    rng.lognormal(0.0, 0.5, rows) if kind == 1 else rng.uniform(0, 100, rows))
    x = np.column_stack(cols)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    y = (z[:, :6].sum(axis=1) + rng.normal(0, 1, rows) > 0).astype(int)
    return x, y


def live_rows(n: int, seed: int, ref: np.ndarray) -> np.ndarray:
    x, _ = training_data(n, seed)
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    for i, (kind, k) in enumerate(TRUTH):
        x[:, i] = x[:, i] + k * std[i] if kind == "shift" else mean[i] + (x[:, i] - mean[i]) * k
    return x


def build_bundle(work: Path) -> tuple[Path, Path, Any, np.ndarray]:
    import joblib
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from edgefleet.contract.signing import generate_key, write_key_pair
    from packager.build import BuildOptions, build

    x, y = training_data(TRAIN_ROWS, SEED)
    frame = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(FEATURES)])
    frame["target"] = y
    frame.to_csv(work / "train.csv", index=False)
    model = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=500))])
    model.fit(x, y)
    joblib.dump(model, work / "model.joblib")
    key, pub = write_key_pair(generate_key(), work / "keys", "build")
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1795392000")
    result = build(BuildOptions(model=work / "model.joblib", train_data=work / "train.csv",
                                target="target", name="bench", version="1.0.0", key=key,
                                out_dir=work))
    return result.path, pub, model, x


def _profile(spec, rows: np.ndarray, proba: np.ndarray) -> Profile:
    """A device's window: its rows and the model's answers on them (``predict_proba``)."""
    prof = Profile(spec)
    prof.update({f"f{i:02d}": rows[:, i] for i in range(FEATURES)},
                {"class": proba.argmax(axis=1).astype(str), "confidence": proba.max(axis=1)},
                rows=len(rows))
    return prof


# ------------------------------------------------------------------------ the publisher


def _publisher(conn, host: str, port: int, payloads: list[tuple[str, bytes]], at: list[float],
               connections: int) -> None:
    """Child process: publish ``payloads`` (at times ``at``, or at once if empty) over
    ``connections`` paho clients as ``sim``; report when they were all acknowledged."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    clients, acked, done = [], [0], threading.Event()
    lock = threading.Lock()

    def on_publish(client, userdata, mid, reason, props):
        with lock:
            acked[0] += 1
            if acked[0] == len(payloads):
                done.set()

    for i in range(connections):
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"sim-{i}",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set("sim", "sim-pw")
        c.max_inflight_messages_set(200)
        c.max_queued_messages_set(0)
        c.on_publish = on_publish
        c.connect(host, port)
        c.loop_start()
        clients.append(c)
    time.sleep(0.5)
    conn.send("ready")
    conn.recv()  # go
    start = time.time()

    def run(k: int) -> None:
        c = clients[k]
        for j in range(k, len(payloads), connections):
            if at:
                delay = at[j] - time.time()
                if delay > 0:
                    time.sleep(delay)
            t, p = payloads[j]
            c.publish(t, p, qos=1)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = time.time()
    done.wait(600)
    conn.send({"start": start, "sent": sent, "acked": time.time(), "n": acked[0]})
    for c in clients:
        c.disconnect()
        c.loop_stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker(conn, db: str, pub: str, host: str, port: int) -> None:
    """Child process: what ``fleet ingest`` runs (a FleetServer without HTTP, evaluator or
    desired-state publishing, in the shared subscription), plus a hook that records each
    committed summary's lag."""
    from fleet_server.cli.serve import tune_gc
    from fleet_server.config import BrokerConfig, ServerConfig
    from fleet_server.server import FleetServer

    config = ServerConfig(db=Path(db), trust=(f"build={pub}",), evaluate=False,
                          broker=BrokerConfig(host=host, port=port, password="server-pw",
                                              share="ingest"))
    server = FleetServer(config, publish_desired=False)
    lags: list[float] = []
    batches: list[int] = []
    ingestor = server.services.ingestor
    original = ingestor.process

    def process(batch, now=None):
        result = original(batch, now)
        lags.extend(result.lags)
        batches.append(sum(result.stored.values()))
        return result

    ingestor.process = process  # type: ignore[method-assign]
    server.start()
    tune_gc()  # as fleet serve and fleet ingest do
    assert server.link is not None and server.link.wait_connected(10)
    time.sleep(0.5)  # the SUBACK
    conn.send("ready")
    cpu0 = time.process_time()
    conn.recv()  # stop
    cpu = time.process_time() - cpu0
    server.stop()
    conn.send({"lags": lags, "batches": batches, "cpu_s": cpu})


def ingest_end_to_end(work: Path, bundle: Path, pub: Path, payloads: list[tuple], sizes: Sizes,
                      *, paced: bool, workers: int) -> dict[str, Any]:
    from fleet_server.config import ServerConfig
    from fleet_server.services import build_services
    from tests.broker import Mosquitto

    run_dir = work / f"{'paced' if paced else 'burst'}-{workers}"
    run_dir.mkdir()
    db = run_dir / "fleet.db"
    setup = build_services(ServerConfig(db=db, trust=(f"build={pub}",)))
    setup.bundles.upload(bundle.read_bytes(), "bench", time.time())
    setup.close()
    broker = Mosquitto(acl=ACL)
    broker.add_user("server", "server-pw")
    broker.add_user("sim", "sim-pw")
    broker.start()
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, str(db), str(pub), broker.host,
                                                     broker.port))
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        for p in pipes:
            assert p.recv() == "ready"
        parent, child = ctx.Pipe()
        schedule = [p[2] for p in payloads] if paced else []
        publisher = ctx.Process(target=_publisher, args=(
            child, broker.host, broker.port, [(t, p) for t, p, *_ in payloads], schedule,
            sizes.connections))
        publisher.start()
        assert parent.recv() == "ready"
        broker0 = _cpu_s(broker.proc.pid)  # type: ignore[union-attr]
        parent.send("go")
        n = len(payloads)
        conn = sqlite3.connect(db)
        deadline = time.time() + 900
        while conn.execute("SELECT COUNT(*) FROM summaries").fetchone()[0] < n and \
                time.time() < deadline:
            time.sleep(0.02)
        stored_at = time.time()
        stored, = conn.execute("SELECT COUNT(*) FROM summaries").fetchone()
        dead, = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        conn.close()
        pub_times = parent.recv()
        publisher.join(30)
        broker_cpu = _cpu_s(broker.proc.pid) - broker0  # type: ignore[union-attr]
        results = []
        for p in pipes:
            p.send("stop")
            results.append(p.recv())
        # from the first publish (burst) or the first scheduled send (paced)
        origin = payloads[0][2] if paced else pub_times["start"]
        wall = stored_at - origin
        batches = [b for r in results for b in r["batches"] if b]
        out: dict[str, Any] = {
            "summaries": n, "stored": stored, "dead_letters": dead,
            "wall_s": wall, "per_s": n / wall, "workers": workers,
            "per_worker": [sum(r["batches"]) for r in results],
            "publisher": {k: v - origin for k, v in pub_times.items() if k in ("sent", "acked")},
            "server_cpu_s": sum(r["cpu_s"] for r in results), "broker_cpu_s": broker_cpu,
            "batch_size_median": statistics.median(batches) if batches else 0,
            "connections": sizes.connections,
            "devices": len({t for t, *_ in payloads}),
        }
        if paced:
            ms = np.asarray([x for r in results for x in r["lags"]]) * 1e3
            out.update(rate=sizes.rate, lag_ms={q: float(np.percentile(ms, q))
                                                for q in (50, 90, 99, 99.9)},
                       lag_max_ms=float(ms.max()),
                       # > 0: the publisher started after the first window's end, and the
                       # first lags include that wait
                       start_late_s=pub_times["start"] - payloads[0][2])
        return out
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        broker.cleanup()


# ------------------------------------------------------------------------ drift


@dataclass
class FleetData:
    rows: np.ndarray  # every live row, devices x windows x rows
    messages: list[tuple[str, bytes]]
    hour: int


def make_fleet(spec, model, ref_x: np.ndarray, sizes: Sizes) -> FleetData:
    d, w, r = sizes.devices, sizes.windows, sizes.rows
    hour = int(time.time() // 3600) * 3600 - 7200
    rows = live_rows(d * w * r, SEED + 1, ref_x)
    per_window = rows.reshape(d, w, r, FEATURES)
    proba = model.predict_proba(rows).reshape(d, w, r, -1)  # once: sklearn per call is slow
    step = 3600 // w
    messages = []
    ref = BundleRef("bench", "1.0.0")
    for dev in range(d):
        device = f"dev{dev:05d}"
        for k in range(w):
            prof = _profile(spec, per_window[dev, k], proba[dev, k])
            start = hour + k * step
            msg = Summary(device, k, ref, float(start), float(start + step), to_wire(prof))
            messages.append((topic(device, "summary"), encode(msg)))
        if dev and dev % 2000 == 0:
            log(f"  profiled {dev * w:,} windows")
    return FleetData(rows, messages, hour)


def _median_ms(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up (page cache, reference parse, layout)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "max_ms": max(times), "n": repeats}


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def drift_bench(work: Path, bundle: Path, pub: Path, fleet: FleetData, ref_x: np.ndarray,
                sizes: Sizes) -> dict[str, Any]:
    from fleet_server.config import ServerConfig
    from fleet_server.services import build_services
    from fleet_server.telemetry.link import Incoming

    services = build_services(ServerConfig(db=work / "drift.db", trust=(f"build={pub}",),
                                           evaluate=False))
    try:
        s = services
        s.bundles.upload(bundle.read_bytes(), "bench", time.time())
        now = fleet.hour + 3600 + 60
        statuses = [Incoming(topic(f"dev{i:05d}", "status"), encode(Status(
            f"dev{i:05d}", "online", labels={"site": "a" if i % 2 == 0 else "b"},
            time=float(fleet.hour))), 1, 0, 0, float(fleet.hour)) for i in range(sizes.devices)]
        for i in range(0, len(statuses), 500):
            s.ingestor.process(statuses[i:i + 500], now=now)
        s.registry.create_group("site-a", {"site": "a"}, "bench", now)
        log(f"  ingesting {len(fleet.messages):,} summaries (rules only, no broker)")
        from fleet_server.cli.serve import tune_gc

        defaults = gc.get_threshold()
        tune_gc()  # as the fleet processes do (this one holds every payload: a large heap)
        start = time.perf_counter()
        for i in range(0, len(fleet.messages), 500):
            s.ingestor.process([Incoming(t, p, 1, 0, 0, now) for t, p in
                                fleet.messages[i:i + 500]], now=now)
        ingest_s = time.perf_counter() - start
        gc.unfreeze()  # back to CPython's defaults for what follows (reports, Evidently)
        gc.set_threshold(*defaults)
        gc.collect()
        h = fleet.hour
        cases = {
            "fleet, aligned hour": {"since": h, "until": h + 3600},
            "group site=a, aligned hour": {"since": h, "until": h + 3600, "group": "site-a"},
            "one device, aligned hour": {"since": h, "until": h + 3600, "device": "dev00001"},
            "group site=a, unaligned hour": {"since": h + 1800, "until": h + 5400,
                                             "group": "site-a"},
        }
        out: dict[str, Any] = {"ingest_rules": {"summaries": len(fleet.messages),
                                                "s": ingest_s,
                                                "per_s": len(fleet.messages) / ingest_s},
                               "reports": {}}
        results = {}
        for name, kw in cases.items():
            def run(kw=kw):
                return s.drift.report("bench@1.0.0", now=now, **kw)
            results[name] = run()
            out["reports"][name] = {**_median_ms(run, sizes.repeats), "peak_mb": _peak_mb(run),
                                    "devices": results[name].devices,
                                    "rollups": results[name].rollups,
                                    "rows": results[name].report.rows_live}
        fleet_report = results["fleet, aligned hour"].report
        assert fleet_report.rows_live == fleet.rows.shape[0], "the report must count every row"
        out["ours"] = {f.name: {"verdict": f.verdict, **{k: f.stats.get(k) for k in
                                                        ("psi", "ks", "wasserstein", "js")}}
                       for f in fleet_report.features if f.role == "input"}
        return out
    finally:
        services.close()


def evidently_bench(fleet: FleetData, ref_x: np.ndarray, sizes: Sizes) -> dict[str, Any]:
    import pandas as pd
    from scipy import stats as sps

    try:
        from evidently import Report
        from evidently.presets import DataDriftPreset
    except ImportError as exc:
        return {"error": f"evidently not importable: {exc}"}
    cols = [f"f{i:02d}" for i in range(FEATURES)]
    reference = pd.DataFrame(ref_x, columns=cols)
    current = pd.DataFrame(fleet.rows, columns=cols)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Report([DataDriftPreset()]).run(current, reference)

    snap = run()
    timing = _median_ms(run, max(1, sizes.repeats // 2))
    peak = _peak_mb(run)
    verdicts = {}
    for metric in snap.dict()["metrics"]:
        cfg = metric["config"]
        if cfg.get("type", "").endswith("ValueDrift"):
            verdicts[cfg["column"]] = {"method": cfg["method"], "value": metric["value"],
                                       "threshold": cfg["threshold"],
                                       "drift": metric["value"] >= cfg["threshold"]}
    exact = {}
    for i, c in enumerate(cols):
        ks = sps.ks_2samp(fleet.rows[:, i], ref_x[:, i]).statistic
        w = sps.wasserstein_distance(fleet.rows[:, i], ref_x[:, i]) / ref_x[:, i].std()
        exact[c] = {"ks": float(ks), "wasserstein": float(w)}
    return {"time": timing, "peak_mb": peak, "rows": len(current), "verdicts": verdicts,
            "scipy": exact, "evidently": __import__("evidently").__version__}


# ------------------------------------------------------------------------ report


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def render(doc: dict[str, Any]) -> str:
    parts = []
    rows, lag_rows = [], []
    for workers, burst in sorted(doc["ingest"]["burst"].items()):
        paced = doc["ingest"]["paced"][workers]
        for name, r in ((f"{workers} worker(s), all at once", burst),
                        (f"{workers} worker(s), paced at {paced['rate']:,}/s", paced)):
            rows.append([name, f"{r['summaries']:,}", f"{r['devices']:,}",
                         str(r["connections"]), f"{r['per_s']:,.0f}",
                         f"{r['publisher']['acked']:.1f}", f"{r['wall_s']:.1f}",
                         f"{r['server_cpu_s']:.1f}", f"{r['broker_cpu_s']:.1f}",
                         f"{r['batch_size_median']:.0f}", f"{r['stored']:,} / {r['dead_letters']}"])
        lag = paced["lag_ms"]
        lag_rows.append([f"{workers} worker(s)", f"{paced['rate']:,}", f"{paced['per_s']:,.0f}",
                         f"{lag[50]:.0f}", f"{lag[90]:.0f}", f"{lag[99]:.0f}",
                         f"{lag[99.9]:.0f}", f"{paced['lag_max_ms']:.0f}"])
    parts += ["Ingest end to end: simulated devices → Mosquitto → `fleet ingest` worker "
              "process(es) → SQLite (20 numeric features + class and confidence outputs, QoS 1; "
              "workers share `$share/ingest/…`)",
              table(["run", "summaries", "devices", "conns", "stored/s", "broker acked s",
                     "last commit s", "workers' CPU s", "broker CPU s", "batch",
                     "stored / dead"], rows), "",
              "Ingest lag, paced (window end → commit of its transaction), ms",
              table(["workers", "offered/s", "stored/s", "p50", "p90", "p99", "p99.9", "max"],
                    lag_rows), ""]
    d = doc["drift"]
    ir = d["ingest_rules"]
    parts += [f"Ingest rules without a broker (Ingestor.process, batches of 500): "
              f"{ir['summaries']:,} summaries in {ir['s']:.1f} s = {ir['per_s']:,.0f}/s", ""]
    rows = [[name, f"{r['devices']:,}", f"{r['rollups']:,}", f"{r['rows']:,}",
             f"{r['median_ms']:.0f}", f"{r['max_ms']:.0f}", f"{r['peak_mb']:.0f}"]
            for name, r in d["reports"].items()]
    ev = doc["evidently"]
    if "error" not in ev:
        rows.append([f"Evidently {ev['evidently']} DataDriftPreset, same rows", "—", "—",
                     f"{ev['rows']:,}", f"{ev['time']['median_ms']:.0f}",
                     f"{ev['time']['max_ms']:.0f}", f"{ev['peak_mb']:.0f}"])
    parts += [f"Drift report: {doc['sizes']['devices']:,} devices x 20 features x "
              f"{doc['sizes']['windows']} windows of {doc['sizes']['rows']} rows in one hour",
              table(["report", "devices", "rollups read", "rows counted", "median ms", "max ms",
                     "peak MB"], rows), ""]
    if "error" not in ev:
        rows, agree = [], 0
        for name, ours in d["ours"].items():
            i = int(name[1:])
            kind, k = TRUTH[i]
            theirs = ev["verdicts"].get(name, {})
            same = (ours["verdict"] == "drift") == bool(theirs.get("drift"))
            agree += same
            exact = ev["scipy"][name]
            rows.append([name, f"{kind} {k:g}", ours["verdict"], _f(ours["psi"]), _f(ours["ks"]),
                         _f(exact["ks"]), _f(ours["wasserstein"]), _f(exact["wasserstein"]),
                         f"{_f(theirs.get('value'))} {'drift' if theirs.get('drift') else 'ok'}",
                         "yes" if same else "NO"])
        parts += [f"Verdicts per feature, fleet report vs Evidently (its default for > 1,000 "
                  f"rows: Wasserstein/std ≥ 0.1) and scipy on the raw rows: agree on "
                  f"{agree} of {len(rows)}",
                  table(["feature", "live vs training", "ours", "PSI", "KS", "KS scipy", "W/σ",
                         "W/σ scipy", "Evidently W/σ", "agree"], rows)]
    else:
        parts.append(f"Evidently: {ev['error']}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "out" / "server.json")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started, cpu0 = time.time(), time.process_time()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        log("building the 20-feature bundle")
        bundle, pub, model, ref_x = build_bundle(work)
        from edgefleet.contract.bundle import read_unverified

        spec, _ = parse_reference(read_unverified(bundle.read_bytes()).member("reference.json"))
        log(f"profiling {sizes.devices:,} devices x {sizes.windows} windows")
        fleet = make_fleet(spec, model, ref_x, sizes)
        log("drift reports")
        drift = drift_bench(work, bundle, pub, fleet, ref_x, sizes)
        log("Evidently")
        evidently = evidently_bench(fleet, ref_x, sizes)
        pool = fleet.messages
        burst = [pool[i % len(pool)] for i in range(sizes.ingest)]
        burst = [(t, p) if i < len(pool) else _reseq(t, p, i) for i, (t, p) in
                 enumerate(burst)]
        burst_res, paced_res = {}, {}
        for workers in (1, 2):
            log(f"ingest end to end, {workers} worker(s): {len(burst):,} summaries at once")
            burst_res[workers] = ingest_end_to_end(work, bundle, pub, burst, sizes,
                                                   paced=False, workers=workers)
            log(f"ingest end to end, {workers} worker(s): {sizes.rate:,}/s for "
                f"{sizes.paced_s:g} s")
            paced = _paced(spec, model, ref_x, sizes)
            paced_res[workers] = ingest_end_to_end(work, bundle, pub, paced, sizes, paced=True,
                                                   workers=workers)
    doc = {
        "benchmark": "server", "date": datetime.now(timezone.utc).isoformat(),
        "machine": machine(LIBRARIES), "sizes": sizes.__dict__, "quick": args.quick,
        "load_average_1_5_15": {"before": load0, "after": os.getloadavg()},
        "elapsed_s": time.time() - started, "cpu_s": time.process_time() - cpu0,
        "ingest": {"burst": burst_res, "paced": paced_res}, "drift": drift,
        "evidently": evidently, "truth": TRUTH,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    m = doc["machine"]
    print(f"{m['cpu_model']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB, "
          f"{m['platform']}; python {m['python']}"
          f"{'  [--quick: smoke run]' if args.quick else ''}")
    print(f"load average (1 min) before/after: {load0[0]:.2f} / {os.getloadavg()[0]:.2f}\n")
    print(render(doc))
    print(f"\n{doc['elapsed_s']:.0f} s wall; JSON in {args.out}")
    return 0


def _reseq(t: str, payload: bytes, i: int) -> tuple[str, bytes]:
    """A copy of a summary under a sequence number no other copy has (not a duplicate)."""
    from edgefleet.contract.messages import decode

    msg = decode(t, payload)
    assert isinstance(msg, Summary)
    return t, encode(replace(msg, seq=1_000_000 + i))


def _paced(spec, model, ref_x: np.ndarray, sizes: Sizes) -> list[tuple[str, bytes, float]]:
    """Messages whose windows end at their scheduled send times (from a few seconds on)."""
    n = int(sizes.rate * sizes.paced_s)
    flat = live_rows(200 * sizes.rows, SEED + 2, ref_x)
    rows = flat.reshape(200, sizes.rows, FEATURES)
    proba = model.predict_proba(flat).reshape(200, sizes.rows, -1)
    wires = [to_wire(_profile(spec, rows[i], proba[i])) for i in range(200)]
    ref = BundleRef("bench", "1.0.0")
    probe = time.perf_counter()
    for i in range(200):
        encode(Summary("dev00000", i, ref, 0.0, 1.0, wires[i]))
    per = (time.perf_counter() - probe) / 200
    # after encoding, and after the broker, server and publisher have started
    t0 = time.time() + per * n * 1.5 + 20.0
    out = []
    for i in range(n):
        device = f"dev{i % sizes.devices:05d}"
        at = t0 + i / sizes.rate
        msg = Summary(device, 2_000_000 + i, ref, at - 60.0, at, wires[i % 200])
        out.append((topic(device, "summary"), encode(msg), at))
    if time.time() > t0:
        log("warning: encoding overran the schedule; early lags include the wait")
    return out


if __name__ == "__main__":
    sys.exit(main())
