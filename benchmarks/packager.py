"""Packager benchmark: build cost, bundle size, fidelity and latency per model family.

Run from the repository root::

    .venv/bin/python benchmarks/packager.py [--quick] [--out benchmarks/out/packager.json]

For each scikit-learn family below, in one run and side by side:

- the whole :func:`packager.build.build` (load, convert, quantise, fidelity gate,
  profile, sign, pack) in float32 and with ``quantize="dynamic"``, with its per-step
  timings; whether int8 was actually applied (``manifest.quantization.applied``);
- bundle and ``model.onnx`` sizes, float32 and int8;
- the fidelity the build recorded in the manifest (held-out rows);
- latency of scikit-learn (``predict_proba`` for classifiers, ``predict`` for
  regressors) against onnxruntime float32 and int8, each through
  :class:`edgefleet.contract.runtime.ModelRunner` ``run_matrix`` (what the agent calls) and
  through a bare ``session.run`` on a ready float32 array (to show the wrapper's cost),
  for one row and for a 1,000-row batch;
- :func:`edgefleet.contract.bundle.verify_bundle` on the bundle bytes.

Data: synthetic, 20 numeric features x 5,000 rows (``make_classification`` for the
classifiers, ``make_regression`` for the regressors, ``random_state=0``); 4,000 rows
train the model and are the build's training data, the other 1,000 are the build's
``eval_data`` (the fidelity gate runs on them) and the latency batch. scikit-learn's
own data sets (569 and 442 rows) are too small for a 1,000-row batch of distinct rows.
The features are all on one scale, which is kind to int8 (see ``keep_first_float`` in
:mod:`packager.quantize`).

Threads: onnxruntime runs with the runtime's default session options (one intra-op
thread, sequential execution), as on a device. The whole run -- training, builds and
timing -- is under ``threadpoolctl.threadpool_limits(1)`` (BLAS and OpenMP) and the
estimators keep ``n_jobs=None``, so scikit-learn uses one core too. Besides making the
comparison like for like, this keeps the builds honest on a shared machine: with one
core busy elsewhere, HistGradientBoosting's predict on two OpenMP threads swung from
16 ms to 1.2 s per call (spin-waiting barriers), and the build's fidelity step with it.

Each latency contender is timed in a warm block after its own warm-up, in two rounds
(the second in reverse order) so slow drift on a shared machine lands on all of them;
tables quote medians, the JSON also has p10/p90, the load average before and after, and
the run's CPU time against its wall time.

This script deliberately does not measure static or fp16 quantisation, multi-threaded
sessions, memory use, or a device's CPU: numbers are for the machine it runs on, which
the JSON describes. It is not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

# This script is called packager.py, and Python puts its directory first on the import
# path: without this, `import packager` would import the script itself.
_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.common import blocks, stats, table  # noqa: E402
from benchmarks.common import machine as common_machine  # noqa: E402
from edgefleet.contract.bundle import verify_bundle  # noqa: E402
from edgefleet.contract.runtime import ModelRunner  # noqa: E402
from edgefleet.contract.signing import (  # noqa: E402
    TrustedKey,
    TrustStore,
    generate_key,
    key_id,
    write_key_pair,
)
from packager.build import BuildOptions, BuildResult, build  # noqa: E402

ROWS, FEATURES, BATCH = 5000, 20, 1000
SEED = 0
EPOCH = "1795392000"  # 2026-11-23T00:00:00Z: reproducible bundles, same bytes every run
# medians divided, as tables and JSON quote them: > 1 means the right-hand one is faster
RATIOS = (
    ("sklearn", "ort_fp32"),
    ("sklearn", "ort_int8"),
    ("ort_fp32", "ort_int8"),
    ("ort_fp32", "ort_fp32_bare"),
    ("ort_int8", "ort_int8_bare"),
)
LIBRARIES = (
    "edgefleet",
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "skl2onnx",
    "onnx",
    "onnxruntime",
    "protobuf",
    "cryptography",
    "threadpoolctl",
    "joblib",
)


@dataclass(frozen=True)
class Repeats:
    builds: int  # whole builds per family and mode, at most...
    build_budget_s: float  # ...stopping once this much time went into them (at least one)
    warmup: int  # single-row calls per contender before each timed block
    batch_warmup: int  # 1,000-row calls per contender before each timed block
    single: int  # timed single-row calls per contender
    batch: int  # timed 1,000-row calls per contender
    verify: int  # timed verify_bundle calls per bundle


# The big forests take 5-20 s per build: three of each would blow the five-minute budget.
FULL = Repeats(
    builds=3, build_budget_s=6.0, warmup=10, batch_warmup=2, single=200, batch=20, verify=20
)
QUICK = Repeats(
    builds=1, build_budget_s=0.0, warmup=3, batch_warmup=2, single=20, batch=4, verify=3
)


# ------------------------------------------------------------------------ model families


def _families() -> list[tuple[str, str, Callable[[], Any]]]:
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        GradientBoostingClassifier,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    c, r = "classification", "regression"
    return [
        ("LogisticRegression", c, lambda: LogisticRegression(max_iter=1000)),
        (
            "RandomForestClassifier",
            c,
            lambda: RandomForestClassifier(n_estimators=100, random_state=SEED),
        ),
        (
            "ExtraTreesClassifier",
            c,
            lambda: ExtraTreesClassifier(n_estimators=100, random_state=SEED),
        ),
        ("GradientBoostingClassifier", c, lambda: GradientBoostingClassifier(random_state=SEED)),
        (
            "HistGradientBoostingClassifier",
            c,
            lambda: HistGradientBoostingClassifier(random_state=SEED),
        ),
        ("KNeighborsClassifier", c, lambda: KNeighborsClassifier()),
        (
            "MLPClassifier",
            c,
            lambda: Pipeline(
                [
                    ("scale", StandardScaler()),
                    ("mlp", MLPClassifier((128, 64), early_stopping=True, random_state=SEED)),
                ]
            ),
        ),
        ("SVC", c, lambda: SVC(probability=True, random_state=SEED)),
        ("Ridge", r, lambda: Ridge()),
        (
            "RandomForestRegressor",
            r,
            lambda: RandomForestRegressor(n_estimators=100, random_state=SEED),
        ),
        (
            "HistGradientBoostingRegressor",
            r,
            lambda: HistGradientBoostingRegressor(random_state=SEED),
        ),
    ]


def _data(task: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification, make_regression

    if task == "classification":
        return make_classification(
            n_samples=ROWS, n_features=FEATURES, n_informative=10, n_redundant=5, random_state=SEED
        )
    return make_regression(
        n_samples=ROWS, n_features=FEATURES, n_informative=10, noise=10.0, random_state=SEED
    )


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    frame["target"] = y
    frame.to_csv(path, index=False)  # pandas writes shortest round-trip floats: exact


# ------------------------------------------------------------------------ measuring


def _bare(runner: ModelRunner) -> tuple[Callable[[np.ndarray], Any], np.dtype]:
    """``session.run`` on a ready array, same outputs as the runner asks for."""
    session = runner.session
    inp = session.get_inputs()[0]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    outputs = [o.name for o in session.get_outputs()]
    name = inp.name
    return (lambda x: session.run(outputs, {name: x})), np.dtype(dtype)


def _fidelity(manifest) -> dict[str, Any]:
    f = manifest.fidelity
    return {
        "rows": f.rows,
        "passed": f.passed,
        "forced": f.forced,
        "label_agreement": f.label_agreement,
        "max_abs_prob_diff": f.max_abs_prob_diff,
        "mean_abs_prob_diff": f.mean_abs_prob_diff,
        "max_abs_error": f.max_abs_error,
        "max_rel_error": f.max_rel_error,
    }


def _build_many(
    opts: BuildOptions, rep: Repeats
) -> tuple[BuildResult, list[float], list[dict[str, float]]]:
    walls, steps, result = [], [], None
    while len(walls) < rep.builds and (not walls or sum(walls) < rep.build_budget_s):
        start = time.perf_counter()
        result = build(opts)
        walls.append(time.perf_counter() - start)
        steps.append(result.timings)
    assert result is not None
    return result, walls, steps


def _bench_family(
    name: str,
    task: str,
    make: Callable[[], Any],
    work: Path,
    key: Path,
    trust: TrustStore,
    rep: Repeats,
    log: Callable[[str], None],
) -> dict[str, Any]:
    x, y = _data(task)
    x_train, y_train, x_eval, y_eval = x[:-BATCH], y[:-BATCH], x[-BATCH:], y[-BATCH:]
    here = work / name
    here.mkdir()
    train_csv, eval_csv, model_path = here / "train.csv", here / "eval.csv", here / "model.joblib"
    _write_csv(train_csv, x_train, y_train)
    _write_csv(eval_csv, x_eval, y_eval)
    est = make()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        est.fit(x_train, y_train)
    train_s = time.perf_counter() - start
    log(f"  trained in {train_s:.1f} s")
    joblib.dump(est, model_path)

    out: dict[str, Any] = {"family": name, "task": task, "train_s": train_s, "modes": {}}
    runners: dict[str, ModelRunner] = {}
    bundles: dict[str, bytes] = {}
    for mode, quant in (("fp32", "none"), ("int8", "dynamic")):
        opts = BuildOptions(
            model=model_path,
            train_data=train_csv,
            eval_data=eval_csv,
            target="target",
            name=name.lower(),
            version="1.0.0",
            key=key,
            quantize=quant,
            force=True,
            out_dir=here / mode,
        )
        log(f"  build {mode}")
        try:
            result, walls, steps = _build_many(opts, rep)
        except Exception as exc:  # recorded, not fatal: the other numbers still count
            out["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  build {mode} FAILED: {type(exc).__name__}: {exc}")
            continue
        data = result.path.read_bytes()
        verified = verify_bundle(data, trust)
        onnx = verified.member("model.onnx")
        q = result.manifest.quantization
        out["modes"][mode] = {
            "build_s": _stats_s(walls),
            "steps_s": {k: statistics.median(s[k] for s in steps) for k in steps[0]},
            "bundle_bytes": result.size,
            "onnx_bytes": len(onnx),
            "quantization": {
                "mode": q.mode,
                "applied": q.applied,
                "quantized_ops": q.quantized_ops,
                "float_ops_kept": list(q.float_ops_kept),
                "note": q.note,
            },
            "fidelity": _fidelity(result.manifest),
            "binding": result.manifest.binding.to_dict(),
        }
        bundles[mode] = data
        # an int8 build that applied nothing ships the float model: same graph, not timed
        if mode == "fp32" or q.applied:
            runners[mode] = ModelRunner(verified.manifest, onnx)

    if bundles:
        log("  verify")
        clock = time.perf_counter_ns
        for mode, data in bundles.items():
            verify_bundle(data, trust)
            ns = []
            for _ in range(rep.verify):
                start = clock()
                verify_bundle(data, trust)
                ns.append(clock() - start)
            out["modes"][mode]["verify"] = stats(ns)

    sk = est.predict_proba if task == "classification" else est.predict
    rows64 = [x_eval[i : i + 1].copy() for i in range(BATCH)]
    batch64 = np.ascontiguousarray(x_eval)
    single: dict[str, Callable[[int], Any]] = {"sklearn": lambda i: sk(rows64[i % BATCH])}
    batch: dict[str, Callable[[int], Any]] = {"sklearn": lambda i: sk(batch64)}
    for mode, runner in runners.items():
        bare, dtype = _bare(runner)
        rows = [r.astype(dtype) for r in rows64]
        whole = batch64.astype(dtype)
        single[f"ort_{mode}"] = lambda i, r=runner: r.run_matrix(rows64[i % BATCH])
        single[f"ort_{mode}_bare"] = lambda i, b=bare, rs=rows: b(rs[i % BATCH])
        batch[f"ort_{mode}"] = lambda i, r=runner: r.run_matrix(batch64)
        batch[f"ort_{mode}_bare"] = lambda i, b=bare, w=whole: b(w)
    log(
        f"  latency: {len(single)} contenders, {rep.single} single-row and "
        f"{rep.batch} batch calls each"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["latency_single"] = blocks(single, rep.warmup, rep.single)
        out["latency_batch"] = blocks(batch, rep.batch_warmup, rep.batch)
    out["ratios"] = {
        kind: {
            f"{a}/{b}": out[kind][a]["median_us"] / out[kind][b]["median_us"]
            for a, b in RATIOS
            if a in out[kind] and b in out[kind]
        }
        for kind in ("latency_single", "latency_batch")
    }
    return out


def _stats_s(walls: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(walls),
        "min": min(walls),
        "max": max(walls),
        "n": len(walls),
    }


# ------------------------------------------------------------------------ machine


def _latency_header(unit: str) -> list[str]:
    return ["family", "sklearn", "ort fp32", "fp32 bare", "ort int8", "int8 bare", "sk/fp32",
            "sk/int8", "fp32/int8", f"wrapper {unit}"]


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    info = common_machine(LIBRARIES)
    info["onnxruntime_providers"] = ort.get_available_providers()
    return info


# ------------------------------------------------------------------------ report


def _fid(m: dict[str, Any]) -> str:
    f = m["fidelity"]
    gate = "" if f["passed"] else " FAIL"
    if f["label_agreement"] is not None:
        dp = f["max_abs_prob_diff"]
        return f"{100 * f['label_agreement']:.1f}% {'' if dp is None else f'{dp:.1e}'}{gate}"
    return f"rel {f['max_rel_error']:.1e}{gate}"


def _us(stats: dict[str, dict[str, float]], key: str, scale: float = 1.0, fmt: str = ".0f") -> str:
    s = stats.get(key)
    return "—" if s is None else f"{s['median_us'] / scale:{fmt}}"


def _ratio(stats: dict[str, dict[str, float]], a: str, b: str) -> str:
    if a not in stats or b not in stats:
        return "—"
    r = stats[a]["median_us"] / stats[b]["median_us"]
    return f"{r:.2f}x" if r < 1 else f"{r:.1f}x" if r < 100 else f"{r:.0f}x"


def report(results: list[dict[str, Any]]) -> str:
    build_rows, single_rows, batch_rows, step_rows = [], [], [], []
    for r in results:
        fp, q8 = r["modes"].get("fp32", {}), r["modes"].get("int8", {})
        name = r["family"]
        if "error" in fp:
            build_rows.append([name, "error", *["—"] * 9])
            continue
        applied = "error" not in q8 and q8["quantization"]["applied"]
        if "error" in q8:
            q8_cells = ["error"] + ["—"] * 3
            int8_state = "error"
        else:
            q8_cells = [
                f"{q8['build_s']['median']:.2f}",
                f"{q8['bundle_bytes']:,}",
                f"{q8['onnx_bytes']:,}",
                _fid(q8),
            ]
            int8_state = f"yes ({q8['quantization']['quantized_ops']} ops)" if applied else "no"
        build_rows.append(
            [
                name,
                f"{fp['build_s']['median']:.2f}",
                q8_cells[0],
                int8_state,
                f"{fp['bundle_bytes']:,}",
                q8_cells[1],
                f"{fp['onnx_bytes']:,}",
                q8_cells[2],
                _fid(fp),
                q8_cells[3],
                f"{fp['verify']['median_us'] / 1e3:.2f}",
            ]
        )
        steps = fp["steps_s"]
        step_rows.append(
            [name]
            + [
                f"{steps.get(k, 0):.2f}"
                for k in ("load", "convert", "quantize", "fidelity", "profile", "sign")
            ]
            + ([f"{q8['steps_s'].get('quantize', 0):.2f}"] if "error" not in q8 else ["—"])
        )
        s, b = r["latency_single"], r["latency_batch"]
        single_rows.append(
            [
                name,
                _us(s, "sklearn"),
                _us(s, "ort_fp32"),
                _us(s, "ort_fp32_bare"),
                _us(s, "ort_int8"),
                _us(s, "ort_int8_bare"),
                _ratio(s, "sklearn", "ort_fp32"),
                _ratio(s, "sklearn", "ort_int8"),
                _ratio(s, "ort_fp32", "ort_int8"),
                _wrapper(s),
            ]
        )
        batch_rows.append(
            [
                name,
                _us(b, "sklearn", 1e3, ".2f"),
                _us(b, "ort_fp32", 1e3, ".2f"),
                _us(b, "ort_fp32_bare", 1e3, ".2f"),
                _us(b, "ort_int8", 1e3, ".2f"),
                _us(b, "ort_int8_bare", 1e3, ".2f"),
                _ratio(b, "sklearn", "ort_fp32"),
                _ratio(b, "sklearn", "ort_int8"),
                _ratio(b, "ort_fp32", "ort_int8"),
                _wrapper(b, 1e3, ".2f"),
            ]
        )
    parts = [
        "Build, size, fidelity (build = whole packager.build.build, median; fidelity = "
        "label agreement and max |Δp|, or max error / std of predictions, on 1,000 "
        "held-out rows; verify = verify_bundle on the fp32 bundle's bytes)",
        table(
            [
                "family",
                "build fp32 s",
                "build int8 s",
                "int8 applied",
                "bundle fp32 B",
                "bundle int8 B",
                "onnx fp32 B",
                "onnx int8 B",
                "fidelity fp32",
                "fidelity int8",
                "verify ms",
            ],
            build_rows,
        ),
        "",
        "Single row, µs per call (median); ratios are sklearn / onnxruntime through "
        "ModelRunner; wrapper = ModelRunner.run_matrix minus bare session.run (fp32)",
        table(
            _latency_header("µs"),
            single_rows,
        ),
        "",
        "1,000-row batch, ms per call (median)",
        table(
            _latency_header("ms"),
            batch_rows,
        ),
        "",
        "fp32 build steps, s (median; build.py's own step timings), and the int8 build's "
        "quantize step",
        table(
            [
                "family",
                "load",
                "convert",
                "quantize",
                "fidelity",
                "profile",
                "sign",
                "int8 quantize",
            ],
            step_rows,
        ),
    ]
    return "\n".join(parts)


def _wrapper(stats: dict[str, dict[str, float]], scale: float = 1.0, fmt: str = ".1f") -> str:
    if "ort_fp32" not in stats or "ort_fp32_bare" not in stats:
        return "—"
    d = stats["ort_fp32"]["median_us"] - stats["ort_fp32_bare"]["median_us"]
    return f"{d / scale:+{fmt}}"


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="few repeats: a smoke run, not numbers to quote"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/out/packager.json"),
        help="where to write the JSON results (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="FAMILY",
        help="run only this family (repeatable)",
    )
    args = parser.parse_args(argv)
    rep = QUICK if args.quick else FULL
    families = [f for f in _families() if not args.only or f[0] in args.only]
    if not families:
        parser.error(f"--only: no such family; use {', '.join(f[0] for f in _families())}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    load_before = os.getloadavg()
    np.seterr(all="ignore")
    started = datetime.now(timezone.utc)
    clock, cpu = time.perf_counter(), time.process_time()
    results = []
    # one thread for scikit-learn everywhere, set once (see the module docstring)
    with threadpool_limits(1), tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        work = Path(tmp)
        signing = generate_key()
        key, _ = write_key_pair(signing, work / "keys", "bench")
        pub = signing.public_key()
        trust = TrustStore([TrustedKey(key_id(pub), pub, role="build")])
        # one throw-away build first, so the first family does not pay the imports
        # (skl2onnx, onnxruntime.quantization) inside its timing
        log("warm-up build")
        warm = work / "warmup"
        warm.mkdir()
        from sklearn.linear_model import LogisticRegression

        x, y = _data("classification")
        _write_csv(warm / "train.csv", x[:500], y[:500])
        joblib.dump(LogisticRegression().fit(x[:500], y[:500]), warm / "model.joblib")
        for quant in ("none", "dynamic"):
            try:
                build(
                    BuildOptions(
                        model=warm / "model.joblib",
                        train_data=warm / "train.csv",
                        target="target",
                        name="warmup",
                        version="1.0.0",
                        key=key,
                        quantize=quant,
                        force=True,
                        out_dir=warm / quant,
                    )
                )
            except Exception as exc:
                log(f"  warm-up {quant} failed: {type(exc).__name__}: {exc}")
        for name, task, make in families:
            log(f"{name}")
            results.append(_bench_family(name, task, make, work, key, trust, rep, log))
    elapsed, cpu = time.perf_counter() - clock, time.process_time() - cpu

    doc = {
        "benchmark": "packager",
        "schema": 1,
        "started_at": started.isoformat(),
        "elapsed_s": elapsed,
        # far below elapsed_s (the timed code is mostly one busy thread): other processes
        # took the CPU, and every number is inflated
        "cpu_s": cpu,
        "quick": args.quick,
        "command": " ".join(sys.argv),
        # other processes on the machine show up here; a loaded machine inflates medians
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "machine": machine(),
        "repeats": rep.__dict__,
        "setup": {
            "data": f"synthetic: make_classification / make_regression, {FEATURES} numeric "
            f"features x {ROWS} rows, random_state={SEED}; {ROWS - BATCH} train, "
            f"{BATCH} held out (eval_data and the latency batch)",
            "onnxruntime": "edgefleet.contract.runtime.session_options(): intra_op_num_threads=1, "
            "inter_op_num_threads=1, ORT_SEQUENTIAL, ORT_ENABLE_ALL, "
            "CPUExecutionProvider",
            "sklearn": "threadpoolctl.threadpool_limits(1) for the whole run (training, "
            "builds, timing); n_jobs=None",
            "sklearn_call": "predict_proba (classifiers), predict (regressors)",
            "order": "per contender: warm-up, then a timed block; two rounds, the second "
            "in reverse order; samples pooled",
            "build": "force=True so a failed fidelity gate is recorded, not fatal; "
            "SOURCE_DATE_EPOCH set; up to `builds` builds, fewer once "
            "`build_budget_s` is spent (the n is in each build_s)",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    m = doc["machine"]
    print(
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB, "
        f"{m['platform']}; python {m['python']}, onnxruntime "
        f"{m['versions'].get('onnxruntime')}, scikit-learn {m['versions'].get('scikit-learn')}"
        f"; single-threaded onnxruntime and scikit-learn"
    )
    print(
        f"repeats: up to {rep.builds} builds ({rep.build_budget_s:g} s budget), "
        f"{rep.single} single-row calls (after {rep.warmup} warm-up calls a block), "
        f"{rep.batch} batch calls (after {rep.batch_warmup}), {rep.verify} verifies"
        f"{'  [--quick: smoke run]' if args.quick else ''}"
    )
    load = doc["load_average_1_5_15"]
    print(f"load average (1 min) before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f}\n")
    print(report(results))
    print(f"\n{elapsed:.0f} s wall, {cpu:.0f} s CPU; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
