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

from edgefleet.contract.bundle import BUNDLE_SUFFIX, file_entry, pack_bundle
from edgefleet.contract.card import ModelCard, Statement
from edgefleet.contract.errors import KeyFileError, SchemaError
from edgefleet.contract.manifest import (
    NAME_RE,
    FeatureSpec,
    Fidelity,
    Lineage,
    Manifest,
    Quantization,
    parse_version,
)
from edgefleet.contract.profile import ProfileSpec
from edgefleet.contract.runtime import ModelRunner, Prediction
from edgefleet.contract.samples import Samples
from edgefleet.contract.signing import Envelope, load_private_key
from edgefleet.contract.wire import sha256_hex
from packager import calibrate
from packager.boosters import missing_library_hint
from packager.build_card import (
    build_warnings,
    card_detail,
    fit_calibration,
    headline_metrics,
    measure_card,
)
from packager.build_champion import check_champion_options, run_champion
from packager.card import load_card
from packager.champion import MAX_SLICE_LOSS, Rule
from packager.convert import Converted, adopt_onnx, convert_sklearn, sklearn_outputs
from packager.data import Table, load_table
from packager.errors import BuildError, FidelityError, ModelLoadError
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

    One function per step, in the order they run (each reported to ``progress``).

    Raises:
        PackagerError: a refused input or step (see :mod:`packager.errors`).
        KeyFileError: the signing key cannot be used.
    """
    step = _Steps(progress)
    checked = _check(opts)
    shipped = _package_model(opts, checked.created_at, step)
    rows = _held_out(opts, shipped)
    fidelity, fidelity_rows = _fidelity(opts, shipped.est, shipped.converted, rows.check,
                                        rows.answers)
    step("fidelity", f"{'passed' if fidelity.passed else 'FAILED (forced)'} on "
         f"{fidelity.rows} rows")
    spec, reference, samples = _profile(opts, shipped)
    step("profile", f"reference over {shipped.features.rows} rows, {len(spec.inputs)} "
         f"features, reference_hash {spec.reference_hash[:12]}")
    calibrated, card = _measure(opts, checked, shipped, rows)
    step("card", card_detail(card, calibrated))
    files = {"model.onnx": shipped.model, "reference.json": reference,
             "samples.json": samples.to_bytes()}
    manifest = _manifest(opts, shipped, rows, files, spec.reference_hash, fidelity,
                         calibrated, card)
    bundle = pack_bundle(manifest, Envelope().signed(checked.key, manifest.to_bytes()), files,
                         checked.epoch)
    out = _write(opts.out_dir, f"{opts.name}-{opts.version}{BUNDLE_SUFFIX}", bundle)
    step("sign", f"{out} ({len(bundle):,} bytes)")
    return BuildResult(out, manifest, sha256_hex(bundle), len(bundle), fidelity_rows,
                       step.timings, shipped.converted.notes,
                       build_warnings(opts, rows.held_out))


@dataclass(frozen=True)
class _Checked:
    """What the build checks and reads before anything slow runs."""

    rules: tuple[Rule, ...]  # --promote-if, parsed
    key: Any  # the private signing key
    statement: Statement | None  # card.toml
    epoch: int
    created_at: str


@dataclass(frozen=True)
class _Shipped:
    """The model as it will ship, and what it was made from."""

    est: Any  # the scikit-learn estimator (None: an adopted ONNX model)
    model_bytes: bytes  # the model file as given
    data: Table  # the training data
    converted: Converted
    features: Table  # the training data's model inputs
    model: bytes  # the ONNX model, quantised
    quant: Quantization
    provisional: Manifest  # files and reference come at the end
    runner: ModelRunner


@dataclass(frozen=True)
class _Rows:
    """The rows the shipped model is judged on, and its answers."""

    # all the evaluation file's columns: a sensitive or slice column need not be an input
    source: Table
    check: Table  # the model's inputs of those rows
    held_out: bool  # --eval-data given (else a sample of the training rows)
    answers: Prediction


def _check(opts: BuildOptions) -> _Checked:
    """The options, the signing key and the card file: fail before the slow steps."""
    _check_identity(opts)
    rules = check_champion_options(opts)
    key = load_signing_key(opts.key, opts.passphrase)
    statement = load_card(opts.card) if opts.card else None
    epoch, created_at = _now(os.environ.get("SOURCE_DATE_EPOCH"))
    return _Checked(rules, key, statement, epoch, created_at)


def _package_model(opts: BuildOptions, created_at: str, step: _Steps) -> _Shipped:
    """The load, convert and quantize steps, and a runner over the result."""
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
    return _Shipped(est, model_bytes, data, converted, features, model, quant, provisional,
                    ModelRunner(provisional, model))


def _held_out(opts: BuildOptions, shipped: _Shipped) -> _Rows:
    """The evaluation rows (or a sample of the training rows) and the shipped answers."""
    source = load_table(opts.eval_data, opts.target) if opts.eval_data \
        else _sample(shipped.data, FIDELITY_ROWS)
    check = source.select(shipped.features.names)
    return _Rows(source, check, bool(opts.eval_data),
                 shipped.runner.run_columns(_columns(check)))


def _profile(opts: BuildOptions, shipped: _Shipped) -> tuple[ProfileSpec, bytes, Samples]:
    """The training profile (``reference.json``) and the smoke-test samples."""
    runner, features, converted = shipped.runner, shipped.features, shipped.converted
    everything = runner.run_columns(_columns(features))
    spec, reference = build_reference(features, everything, converted.task,
                                      converted.classes, opts.bins)
    samples = pick_samples(features, lambda part: runner.run_columns(_columns(part)))
    return spec, reference, samples


def _measure(opts: BuildOptions, checked: _Checked, shipped: _Shipped, rows: _Rows
             ) -> tuple[calibrate.Fitted | str | None, ModelCard]:
    """The calibration map, the champion comparison and the measured card."""
    calibrated = fit_calibration(shipped.converted, rows.answers, rows.check.target) \
        if rows.held_out else None
    # before the card: a challenger that loses stops the build before the slow measures
    champ = run_champion(opts, checked.key, shipped.provisional, shipped.model,
                         shipped.runner, rows.source, rows.answers, checked.rules) \
        if opts.champion else None
    card = replace(measure_card(opts, checked.statement, shipped.converted,
                                shipped.features.names, shipped.data, rows.source,
                                rows.answers, shipped.runner.run_columns), champion=champ)
    return calibrated, card


def _manifest(opts: BuildOptions, shipped: _Shipped, rows: _Rows, files: dict[str, bytes],
              reference_hash: str, fidelity: Fidelity,
              calibrated: calibrate.Fitted | str | None, card: ModelCard) -> Manifest:
    """The final manifest: the provisional one with files, reference, metrics and lineage."""
    metrics = headline_metrics(shipped.converted.task, rows.answers, rows.check.target,
                               "eval_" if rows.held_out else "train_")
    fitted = calibrated if isinstance(calibrated, calibrate.Fitted) else None
    if fitted is not None:
        metrics[calibrate.RAW_BRIER] = fitted.raw_brier
    provisional = shipped.provisional
    return replace(
        provisional, description=opts.description,
        files=tuple(sorted(file_entry(k, v) for k, v in files.items())),
        reference_hash=reference_hash, quantization=shipped.quant, fidelity=fidelity,
        metrics=metrics, card=card,
        calibration=fitted.calibration if fitted is not None else None,
        lineage=replace(provisional.lineage, code_revision=opts.code_revision
                        or _git_revision(Path.cwd()), libraries=library_versions()))


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
