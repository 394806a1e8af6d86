"""``edgepack build``: from a trained model and its data to a signed bundle.

Steps, each reported to a progress callback: load the model and the data, convert to
ONNX, quantise, judge fidelity against the original, profile the training data and the
packaged model's predictions on it, pick smoke-test samples, fit a classifier's calibration
map on the held-out rows (:mod:`packager.calibrate`), compare with a champion bundle when
one is given (:mod:`packager.champion`: a challenger that does not win stops here unless
forced), measure the model card (metrics with intervals, slices, fairness, importances:
:mod:`packager.evaluate`) and hold its fairness gaps to their bounds, write the manifest
with lineage and the card, sign, pack.

Reproducible: with ``SOURCE_DATE_EPOCH`` set, the same inputs give byte-identical
bundles (created_at and the tar mtimes come from it; every other byte is a function
of the inputs).

Loading a pickled or joblib model runs code from that file: it happens here, on the
build machine, on the user's own file; a device never loads a pickle.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.contract.bundle import (
    BUNDLE_SUFFIX,
    file_entry,
    pack_bundle,
    read_bundle_file,
    verify_bundle,
)
from edgefleet.contract.card import Champion, ModelCard, Statement, TimeRange
from edgefleet.contract.errors import BundleError, KeyFileError, SchemaError
from edgefleet.contract.manifest import (
    NAME_RE,
    FeatureSpec,
    Fidelity,
    Lineage,
    Manifest,
    Quantization,
    parse_version,
)
from edgefleet.contract.runtime import ModelRunner, Prediction
from edgefleet.contract.signing import (
    Envelope,
    TrustedKey,
    TrustStore,
    key_id,
    load_private_key,
)
from edgefleet.contract.wire import sha256_hex
from packager import calibrate, evaluate
from packager import champion as compare
from packager.boosters import missing_library_hint
from packager.card import load_card
from packager.champion import MAX_SLICE_LOSS
from packager.convert import Converted, adopt_onnx, convert_sklearn, sklearn_outputs
from packager.data import Table, load_table
from packager.errors import (
    BuildError,
    ChampionLostError,
    FairnessError,
    FidelityError,
    ModelLoadError,
    SchemaChangeError,
)
from packager.fidelity import Bounds, judge, table
from packager.quantize import quantize
from packager.reference import build_reference, pick_samples

__all__ = ["BuildOptions", "BuildResult", "build", "library_versions", "load_signing_key"]

FIDELITY_ROWS = 2000
LIBRARIES = ("edgefleet", "numpy", "onnx", "onnxruntime", "skl2onnx", "scikit-learn",
             "protobuf", "pandas", "onnxmltools", "xgboost", "lightgbm",
             "fairlearn")  # fairlearn: the card's fairness numbers
Progress = Callable[[str, str], None]


@dataclass
class BuildOptions:
    model: Path
    train_data: Path
    name: str
    version: str
    key: Path
    target: str | None = None
    passphrase: bytes | None = None
    quantize: str = "none"
    calibration_data: Path | None = None
    keep_first_float: bool = True
    bounds: Bounds = field(default_factory=Bounds)
    force: bool = False
    out_dir: Path = Path(".")
    bins: int = 10
    eval_data: Path | None = None
    description: str = ""
    code_revision: str | None = None
    card: Path | None = None  # card.toml: what the engineer states
    slice_by: tuple[str, ...] = ()
    sensitive: tuple[str, ...] = ()  # need not be model inputs
    fairness_bounds: dict[str, float] = field(default_factory=dict)
    positive_label: str | None = None
    time_column: str | None = None
    importances: bool = True
    champion: Path | None = None  # a bundle to compare with on the same evaluation rows
    promote_if: tuple[str, ...] = ()  # rules the challenger must meet (packager.champion)
    allow_schema_change: bool = False
    max_slice_loss: float = MAX_SLICE_LOSS
    champion_trust: tuple[str, ...] = ()  # [ROLE=]PUBKEY besides the signing key's own


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    sha256: str
    size: int
    fidelity_rows: list[tuple[str, float, float, bool]]
    timings: dict[str, float]
    notes: list[str]
    warnings: list[str] = field(default_factory=list)  # things the user should fix


def _now(epoch: str | None) -> tuple[int, str]:
    if epoch:
        try:
            ts = int(epoch)
        except ValueError as exc:
            raise BuildError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer") from exc
    else:
        ts = int(time.time())
    stamp = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ts, stamp


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Python and the installed versions of ``names`` (those not installed are left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_revision(where: Path) -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+dirty" if dirty else rev


def _load_model(path: Path) -> tuple[Any, bytes]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read model ({exc.strerror})") from exc
    if path.suffix.lower() == ".onnx":
        return None, raw
    import joblib

    try:
        return joblib.load(path), raw
    except ModuleNotFoundError as exc:
        hint = missing_library_hint(exc.name or "")
        if hint is not None:
            raise ModelLoadError(f"{path}: {hint}") from exc
        raise ModelLoadError(f"{path}: the model needs the module {exc.name!r}, which is not "
                             "installed here") from exc
    except Exception as exc:  # unpickling raises anything at all
        text = str(exc)
        found = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", text)
        main = sys.modules.get("__main__")
        # run as `python -m x`, __main__ shows under its module name
        names = {"__main__", getattr(getattr(main, "__spec__", None), "name", "__main__")}
        found = found if found and found.group(2) in names else None
        if isinstance(exc, AttributeError) and found:
            # pickle stores a class by module and name; one defined in the training
            # script is stored as __main__.<name>, and __main__ is edgepack here
            raise ModelLoadError(
                f"{path}: the model refers to class {found.group(1)!r} defined in the script "
                "that trained it (__main__); define it in an importable module, import it "
                "from there in the training script, and save the model again") from exc
        raise ModelLoadError(f"{path}: not a pickled or joblib model "
                             f"({type(exc).__name__}: {exc})") from exc


def load_signing_key(path: Path, passphrase: bytes | None = None):
    """The private key to sign with; a public key given by mistake is named as such.

    Raises:
        KeyFileError: not a usable private key (see :func:`load_private_key`).
    """
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        head = b""
    if b"PUBLIC KEY-----" in head:
        sibling = path.with_suffix(".key")
        raise KeyFileError(
            f"{path}: this is a public key; --key takes the private key"
            + (f" ({sibling})" if sibling.is_file() and sibling != path else
               " (NAME.key from `edgepack keygen`)"))
    return load_private_key(path, passphrase)


def _features(est: Any, data: Table) -> Table:
    names = getattr(est, "feature_names_in_", None)
    if names is not None:
        return data.select([str(n) for n in names])
    expected = getattr(est, "n_features_in_", None)
    if expected is not None and expected != len(data.names):
        raise BuildError(f"{data.path}: the model expects {expected} features, the data has "
                         f"{len(data.names)} columns besides the target "
                         f"({', '.join(data.names[:8])}…); pass --target or fix the columns")
    return data


def _sample(data: Table, n: int) -> Table:
    if data.rows <= n:
        return data
    seed = int(data.sha256[:8], 16)  # deterministic for the same data
    index = np.sort(np.random.default_rng(seed).choice(data.rows, size=n, replace=False))
    return data.take(index)


def _columns(data: Table) -> dict[str, np.ndarray]:
    return {n: data.columns[n] for n in data.names}


def _metrics(task: str, pred: Prediction, target: np.ndarray | None, prefix: str
             ) -> dict[str, float]:
    if target is None:
        return {}
    from sklearn import metrics

    if task == "classification":
        got, want = np.asarray(pred.labels).astype(str), np.asarray(target).astype(str)
        return {f"{prefix}accuracy": float(metrics.accuracy_score(want, got)),
                f"{prefix}f1_macro": float(metrics.f1_score(want, got, average="macro"))}
    y = np.asarray(target, dtype=np.float64)
    return {f"{prefix}mae": float(metrics.mean_absolute_error(y, pred.values)),
            f"{prefix}rmse": float(np.sqrt(metrics.mean_squared_error(y, pred.values))),
            f"{prefix}r2": float(metrics.r2_score(y, pred.values))}


def _feature_specs(data: Table, binding_dtype: str) -> tuple[FeatureSpec, ...]:
    specs = []
    for n in data.names:
        col = data.columns[n]
        if data.kinds[n] == "categorical":
            present = sorted({str(v) for v in col.tolist() if v is not None})
            specs.append(FeatureSpec(n, "categorical", "string", categories=tuple(present[:4096]),
                                     missing_allowed=any(v is None for v in col.tolist())))
        else:
            finite = col[np.isfinite(col)]
            specs.append(FeatureSpec(
                n, "numeric", data.dtypes[n] if data.dtypes[n] == "int64" else binding_dtype,
                float(finite.min()) if finite.size else None,
                float(finite.max()) if finite.size else None,
                missing_allowed=bool(finite.size < col.size)))
    return tuple(specs)


def build(opts: BuildOptions, progress: Progress = lambda step, detail: None) -> BuildResult:
    """Build, sign and write a bundle; return where and what.

    Raises:
        PackagerError: a refused input or step (see :mod:`packager.errors`).
        KeyFileError: the signing key cannot be used.
    """
    step = _Steps(progress)
    _check_identity(opts)
    rules = _check_champion_options(opts)
    key = load_signing_key(opts.key, opts.passphrase)  # fail before the slow steps
    statement = load_card(opts.card) if opts.card else None
    epoch, created_at = _now(os.environ.get("SOURCE_DATE_EPOCH"))

    est, model_bytes = _load_model(opts.model)
    data = load_table(opts.train_data, opts.target)
    step("load", f"{data.rows} rows × {len(data.names)} columns from {opts.train_data.name}")

    converted, features = _convert(opts, est, model_bytes, data)
    step("convert", f"{converted.estimator} → ONNX, {converted.binding.layout} layout"
         + (f" ({'; '.join(converted.notes)})" if converted.notes else ""))

    model, quant = _quantize(opts, converted, features)
    step("quantize", quant.note or (f"{opts.quantize}: {quant.quantized_ops} ops quantised"
                                    if quant.applied else "none"))

    provisional = _provisional(opts, created_at, converted, features, est, model_bytes, data)
    runner = ModelRunner(provisional, model)

    # all the evaluation file's columns: a sensitive or slice column need not be an input
    source = load_table(opts.eval_data, opts.target) if opts.eval_data \
        else _sample(data, FIDELITY_ROWS)
    check = source.select(features.names)
    evaluation = check if opts.eval_data else None
    shipped = runner.run_columns(_columns(check))
    fidelity, rows = _fidelity(opts, est, converted, check, shipped)
    step("fidelity", f"{'passed' if fidelity.passed else 'FAILED (forced)'} on "
         f"{fidelity.rows} rows")

    everything = runner.run_columns(_columns(features))
    spec, reference = build_reference(features, everything, converted.task,
                                      converted.classes, opts.bins)
    samples = pick_samples(features, lambda part: runner.run_columns(_columns(part)))
    step("profile", f"reference over {features.rows} rows, {len(spec.inputs)} features, "
         f"reference_hash {spec.reference_hash[:12]}")

    calibrated = _calibrate(converted, shipped, check.target) \
        if evaluation is not None else None
    # before the card: a challenger that loses stops the build before the slow measures
    champ = _champion(opts, key, provisional, model, runner, source, shipped, rules) \
        if opts.champion else None
    card = replace(_card(opts, statement, converted, features.names, data, source, shipped,
                         runner.run_columns), champion=champ)
    step("card", _card_detail(card, calibrated))

    metrics = _metrics(converted.task, shipped, check.target,
                       "eval_" if evaluation is not None else "train_")
    if isinstance(calibrated, calibrate.Fitted):
        metrics[calibrate.RAW_BRIER] = calibrated.raw_brier
    warned = _warnings(opts, evaluation is not None)
    files = {"model.onnx": model, "reference.json": reference,
             "samples.json": samples.to_bytes()}
    manifest = replace(
        provisional, description=opts.description,
        files=tuple(sorted(file_entry(k, v) for k, v in files.items())),
        reference_hash=spec.reference_hash, quantization=quant, fidelity=fidelity,
        metrics=metrics, card=card,
        calibration=calibrated.calibration if isinstance(calibrated, calibrate.Fitted)
        else None,
        lineage=replace(provisional.lineage, code_revision=opts.code_revision
                        or _git_revision(Path.cwd()), libraries=library_versions()))
    bundle = pack_bundle(manifest, Envelope().signed(key, manifest.to_bytes()), files, epoch)
    out = _write(opts.out_dir, f"{opts.name}-{opts.version}{BUNDLE_SUFFIX}", bundle)
    step("sign", f"{out} ({len(bundle):,} bytes)")
    return BuildResult(out, manifest, sha256_hex(bundle), len(bundle), rows, step.timings,
                       converted.notes, warned)


class _Steps:
    """Times each build step and reports it to ``progress`` as it ends."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._clock
        self._clock = now
        self.progress(name, detail)


def _check_identity(opts: BuildOptions) -> None:
    """The bundle's name and version, checked before anything slow runs."""
    if not NAME_RE.match(opts.name):
        raise BuildError(f"--name {opts.name!r}: use lower-case letters, digits, '.', '_', '-' "
                         "(at most 64)")
    try:
        parse_version(opts.version)
    except SchemaError as exc:
        raise BuildError(f"--version: {exc}") from exc


def _convert(opts: BuildOptions, est: Any, model_bytes: bytes, data: Table
             ) -> tuple[Converted, Table]:
    """The ONNX model (converted from scikit-learn, or adopted as given) and its inputs."""
    if est is None:
        return adopt_onnx(model_bytes, data, str(opts.model)), data.select(list(data.names))
    features = _features(est, data)
    return convert_sklearn(est, features), features


def _provisional(opts: BuildOptions, created_at: str, converted: Converted, features: Table,
                 est: Any, model_bytes: bytes, data: Table) -> Manifest:
    """The manifest as far as the model runs on it: files and reference come at the end."""
    return Manifest(
        name=opts.name, version=opts.version, created_at=created_at, task=converted.task,
        inputs=_feature_specs(features, converted.binding.dtype), outputs=converted.outputs,
        binding=converted.binding, files=(), reference_hash="0" * 64,
        lineage=Lineage(sha256_hex(model_bytes), "onnx" if est is None else "sklearn",
                        converted.estimator, data.sha256, data.rows),
        classes=converted.classes)


def _warnings(opts: BuildOptions, held_out: bool) -> list[str]:
    if opts.target is None:
        return ["no --target: no metrics are recorded (accuracy, F1, error need the label "
                "column: pass --target NAME)"]
    if not held_out:
        return ["metrics computed on the training rows (optimistic: the model has seen them);"
                " pass --eval-data with held-out rows"]
    return []


def _quantize(opts: BuildOptions, converted: Converted, features: Table
              ) -> tuple[bytes, Quantization]:
    """The quantize step: static quantisation calibrates on (a sample of) real rows."""
    calibration = None
    if opts.quantize == "static":
        cal = load_table(opts.calibration_data, opts.target) if opts.calibration_data \
            else features
        cal = _sample(cal.select(features.names), 512)
        calibration = _calibration_feeds(converted, cal)
    return quantize(converted.model, opts.quantize, calibration=calibration,
                    keep_first_float=opts.keep_first_float)


def _fidelity(opts: BuildOptions, est: Any, converted: Converted, check: Table,
              shipped: Prediction) -> tuple[Fidelity, list[tuple[str, float, float, bool]]]:
    """The fidelity gate: the shipped model against the original on the check rows.

    Raises:
        FidelityError: past the bounds, without ``force``.
    """
    if est is None:  # an adopted ONNX model has no original to compare with
        return Fidelity(rows=0), []
    original = sklearn_outputs(est, check, converted.binding.layout)
    fidelity, rows = judge(original, shipped, converted.task, opts.bounds, converted.classes)
    if not fidelity.passed:
        if not opts.force:
            raise FidelityError(
                f"{opts.model.name}: the packaged model disagrees with the original "
                f"beyond the bounds on {fidelity.rows} rows (use --force to build anyway)",
                table(rows))
        fidelity = replace(fidelity, forced=True)
    return fidelity, rows


def _card(opts: BuildOptions, statement: Statement | None, converted: Converted,
          inputs: list[str], data: Table, source: Table, shipped: Prediction,
          run: evaluate.Run) -> ModelCard:
    """The measured part of the card on the evaluation rows (``source``); a fairness gap
    past its bound stops the build unless forced (then the card records it).

    Raises:
        BuildError: a slice, sensitive or time column that is not in the data, or asked for
            without a target.
        FairnessError: a gap past its bound, without ``force``.
    """
    if opts.fairness_bounds and not opts.sensitive:
        raise BuildError("--max-fairness-gap bounds the gaps of --sensitive columns; name one")
    asked = [*opts.slice_by, *opts.sensitive]
    missing = [c for c in asked if c not in source.columns]
    if missing:
        raise BuildError(f"{source.path}: column {missing[0]!r} (--slice-by / --sensitive) is "
                         f"not in the evaluation data")
    task, classes = converted.task, converted.classes
    card = ModelCard(statement=statement, data_columns=tuple(data.names) + ((data.target_name,) if
                                                        data.target_name else ()),
                     time_range=_time_range(data, opts.time_column))
    if source.target is None:
        if asked or opts.fairness_bounds or opts.champion:
            raise BuildError("--slice-by, --sensitive and --champion need the labels: "
                             "pass --target")
        return card
    held_out = opts.eval_data is not None
    reports = evaluate.fairness(task, source.columns, source.kinds, opts.sensitive, inputs,
                                source.target, shipped, classes, opts.positive_label)
    checks = evaluate.check_gaps(reports, opts.fairness_bounds, task)
    forced = not all(c.passed for c in checks)
    if forced and not opts.force:
        failed = next(c for c in checks if not c.passed)
        raise FairnessError(f"{source.path}: the {failed.gap} of {failed.column!r} is past its "
                            f"bound (use --force to build anyway)", evaluate.gap_table(checks))
    return replace(
        card,
        evaluation=evaluate.evaluation(task, source.target, shipped, held_out=held_out,
                                       data_sha256=source.sha256),
        slices=evaluate.slices(task, source.columns, source.kinds, opts.slice_by,
                               source.target, shipped),
        fairness=reports, checks=checks, forced=forced,
        importances=evaluate.importances(task, source.select(inputs).frame(), source.target,
                                         run) if opts.importances else None)


def _check_champion_options(opts: BuildOptions) -> tuple[compare.Rule, ...]:
    """The champion options, checked before anything slow runs; the parsed rules.

    Raises:
        BuildError: a comparison option without ``--champion``, or ``--champion`` without
            held-out rows.
        PromotionRuleError: a malformed rule (quoted).
    """
    if opts.champion is None:
        if opts.promote_if or opts.allow_schema_change or opts.champion_trust:
            raise BuildError("--promote-if, --allow-schema-change and --champion-trust "
                             "compare with a champion: pass --champion BUNDLE")
        return ()
    if opts.eval_data is None:
        raise BuildError("--champion compares both models on held-out rows: pass "
                         "--eval-data (and --target)")
    if not opts.max_slice_loss >= 0:
        raise BuildError(f"--max-slice-loss {opts.max_slice_loss}: must be >= 0")
    return compare.parse_rules(opts.promote_if)


def _champion(opts: BuildOptions, key: Any, provisional: Manifest, model: bytes,
              runner: ModelRunner, source: Table, shipped: Prediction,
              rules: tuple[compare.Rule, ...]) -> Champion:
    """Verify the champion bundle, run its model (its own inputs and binding) on the same
    held-out rows as the challenger, time both, and compare (:mod:`packager.champion`).

    The champion must be signed by the build's own key or a ``--champion-trust`` key: a
    comparison with a model nobody vouches for proves nothing.

    Raises:
        BundleError: the champion does not verify (named).
        BuildError: no labels, another task, or a column the data lacks.
        SchemaChangeError: inputs or classes differ, without ``--allow-schema-change``.
        ChampionLostError: the challenger does not win, without ``--force``.
    """
    path = opts.champion
    if source.target is None:
        raise BuildError("--champion needs the labels of the held-out rows: pass --target")
    missing = [c for c in opts.slice_by if c not in source.columns]
    if missing:
        raise BuildError(f"{source.path}: column {missing[0]!r} (--slice-by) is not in the "
                         "evaluation data")
    public = key.public_key()
    trust = TrustStore([TrustedKey(key_id(public), public, role="build", name="signing key"),
                        *TrustStore.from_files(opts.champion_trust)])
    try:
        champ = verify_bundle(read_bundle_file(path), trust)
    except BundleError as exc:
        raise type(exc)(f"--champion {path}: {exc} (a champion must be signed by the build "
                        "key or a --champion-trust key)", member=exc.member) from exc
    m = champ.manifest
    task = provisional.task
    if m.task != task:
        raise BuildError(f"--champion {path}: a {m.task} model cannot be compared with this "
                         f"{task} model")
    changes = compare.schema_changes(m, provisional)
    if changes and not opts.allow_schema_change:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise SchemaChangeError(f"--champion {path}: {changes[0]}{more}: "
                                "pass --allow-schema-change if the change is meant")
    missing = [s.name for s in m.inputs if s.name not in source.columns]
    if missing:
        raise BuildError(f"--champion {path}: it takes column {missing[0]!r}, which the "
                         "evaluation data lacks")
    champion_model = champ.member("model.onnx")
    theirs_runner = ModelRunner(m, champion_model)
    their_columns = {s.name: source.columns[s.name] for s in m.inputs}
    our_columns = {s.name: source.columns[s.name] for s in provisional.inputs}
    theirs = theirs_runner.run_columns(their_columns)
    latency = compare.latency_p95([theirs_runner.run_columns, runner.run_columns],
                                  [their_columns, our_columns])
    who = compare.Identity(m.name, m.version, champ.sha256, sha256_hex(champion_model),
                           provisional.name, provisional.version, sha256_hex(model))
    result = compare.compare(
        task, source.target, shipped, theirs, who=who, data_sha256=source.sha256,
        rules=rules, latency_ms=(latency[0], latency[1]),
        size=(len(champion_model), len(model)),
        slice_columns={c: source.columns[c] for c in opts.slice_by},
        slice_kinds={c: source.kinds[c] for c in opts.slice_by},
        max_slice_loss=opts.max_slice_loss, changes=changes,
        schema_change_allowed=opts.allow_schema_change, forced=False)
    if result.won:
        return result
    reasons = result.comparison.reasons
    if not opts.force:
        raise ChampionLostError(
            f"{opts.name} {opts.version} does not beat the champion {m.name} {m.version}: "
            f"{reasons[0]}" + (f" (and {len(reasons) - 1} more, in the table)"
                               if len(reasons) > 1 else "")
            + " (use --force to build anyway)",
            compare.table(result))
    return replace(result, comparison=replace(result.comparison, forced=True))


def _time_range(data: Table, column: str | None) -> TimeRange | None:
    """The first and last value of the training data's time column (ISO text sorts as
    time; numbers as numbers).

    Raises:
        BuildError: the column is not in the training data, or has no values.
    """
    if column is None:
        return None
    if column not in data.columns:
        raise BuildError(f"{data.path}: --time-column {column!r} is not in the training data")
    col = data.columns[column]
    if data.kinds[column] == "numeric":
        finite = col[np.isfinite(col)]
        values = [repr(float(finite.min())), repr(float(finite.max()))] if finite.size else []
    else:
        present = sorted(str(v) for v in col.tolist() if v is not None)
        values = [present[0], present[-1]] if present else []
    if not values:
        raise BuildError(f"{data.path}: --time-column {column!r} has no values")
    return TimeRange(column, values[0], values[1])


def _calibrate(converted: Converted, shipped: Prediction, target: np.ndarray | None
               ) -> calibrate.Fitted | str:
    """The calibration map of a classifier on the held-out rows, or why there is none."""
    if converted.task != "classification":
        return "a regressor: no calibration map"
    if target is None:
        return "no --target: no calibration map"
    return calibrate.fit(converted.classes, shipped, target)


def _card_detail(card: ModelCard, calibrated: calibrate.Fitted | str | None = None) -> str:
    parts = [f"{card.evaluation.rows} {card.evaluation.data.replace('_', '-')} rows"
             if card.evaluation else "no labels: metrics left out"]
    if isinstance(calibrated, calibrate.Fitted):
        c = calibrated.calibration
        parts.append(f"calibration {c.method} (Brier {calibrated.raw_brier:.4f} → "
                     f"{c.score:.4f})")
    elif calibrated is not None:
        parts.append(f"no calibration map ({calibrated})")
    parts += [f"worst {s.column}={s.worst}" for s in card.slices]
    parts += [f"{len(card.checks)} fairness checks"
              + (" FAILED (forced)" if card.forced else " passed")] if card.checks else []
    if card.champion:
        c = card.champion
        parts.append(f"{'beats' if c.won else 'does NOT beat'} {c.name} {c.version} "
                     f"({c.metric} {c.delta:+.4g})" if c.delta is not None else
                     f"champion {c.name} {c.version}: no {c.metric}")
    if card.importances:
        parts.append(f"top feature {card.importances.features[0].feature}"
                     if card.importances.features else "no features")
    return ", ".join(parts)


def _calibration_feeds(converted: Converted, cal: Table) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort

    from edgefleet.contract.runtime import _ORT_NP  # the dtypes the graph declares

    session = ort.InferenceSession(converted.model, providers=["CPUExecutionProvider"])
    feeds = []
    for start in range(0, cal.rows, 64):
        part = cal.take(np.arange(start, min(start + 64, cal.rows)))
        if converted.binding.layout == "tensor":
            inp = session.get_inputs()[0]
            feeds.append({inp.name: part.matrix().astype(_ORT_NP[inp.type])})
        else:
            feeds.append({i.name: np.asarray(part.columns[i.name]).astype(
                _ORT_NP[i.type]).reshape(-1, 1) for i in session.get_inputs()})
    return feeds


def _write(directory: Path, name: str, data: bytes) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        raise BuildError(f"{directory}: cannot write the bundle ({exc.strerror})") from exc
    return target
