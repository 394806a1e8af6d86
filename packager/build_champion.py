"""The build's champion step: verify the champion bundle, run both models, compare.

:func:`packager.build.build` checks the champion options before anything slow runs
(:func:`check_champion_options`) and, once the challenger has answered the held-out rows,
runs the champion on the same rows and compares (:func:`run_champion`, the maths in
:mod:`packager.champion`). A challenger that does not win stops the build here unless
forced.

This module measures no card and signs nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgefleet.contract.bundle import VerifiedBundle, read_bundle_file, verify_bundle
from edgefleet.contract.card import Champion
from edgefleet.contract.errors import BundleError
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.runtime import ModelRunner, Prediction
from edgefleet.contract.signing import TrustedKey, TrustStore, key_id
from edgefleet.contract.wire import sha256_hex
from packager import champion as compare
from packager.data import Table
from packager.errors import BuildError, ChampionLostError, SchemaChangeError

if TYPE_CHECKING:  # build.py imports this module
    from packager.build import BuildOptions

__all__ = ["check_champion_options", "run_champion"]


def check_champion_options(opts: BuildOptions) -> tuple[compare.Rule, ...]:
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


def run_champion(opts: BuildOptions, key: Any, provisional: Manifest, model: bytes,
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
    _check_rows(opts, source)
    champ = _verify(opts, key)
    changes = _check_fit(opts, champ.manifest, provisional, source)
    result = _compare(opts, champ, provisional, model, runner, source, shipped, rules, changes)
    return _verdict(opts, champ.manifest, result)


def _check_rows(opts: BuildOptions, source: Table) -> None:
    """The held-out rows have labels and every --slice-by column."""
    if source.target is None:
        raise BuildError("--champion needs the labels of the held-out rows: pass --target")
    missing = [c for c in opts.slice_by if c not in source.columns]
    if missing:
        raise BuildError(f"{source.path}: column {missing[0]!r} (--slice-by) is not in the "
                         "evaluation data")


def _verify(opts: BuildOptions, key: Any) -> VerifiedBundle:
    """The champion bundle, verified against the build key and the --champion-trust keys."""
    path = opts.champion
    public = key.public_key()
    trust = TrustStore([TrustedKey(key_id(public), public, role="build", name="signing key"),
                        *TrustStore.from_files(opts.champion_trust)])
    try:
        return verify_bundle(read_bundle_file(path), trust)
    except BundleError as exc:
        raise type(exc)(f"--champion {path}: {exc} (a champion must be signed by the build "
                        "key or a --champion-trust key)", member=exc.member) from exc


def _check_fit(opts: BuildOptions, m: Manifest, provisional: Manifest, source: Table
               ) -> tuple[str, ...]:
    """The champion answers the same task on these rows; the schema changes, if allowed."""
    path, task = opts.champion, provisional.task
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
    return changes


def _compare(opts: BuildOptions, champ: VerifiedBundle, provisional: Manifest, model: bytes,
             runner: ModelRunner, source: Table, shipped: Prediction,
             rules: tuple[compare.Rule, ...], changes: tuple[str, ...]) -> Champion:
    """Run the champion on the rows, time both models, and compare."""
    m = champ.manifest
    champion_model = champ.member("model.onnx")
    theirs_runner = ModelRunner(m, champion_model)
    their_columns = {s.name: source.columns[s.name] for s in m.inputs}
    our_columns = {s.name: source.columns[s.name] for s in provisional.inputs}
    theirs = theirs_runner.run_columns(their_columns)
    latency = compare.latency_p95([theirs_runner.run_columns, runner.run_columns],
                                  [their_columns, our_columns])
    who = compare.Identity(m.name, m.version, champ.sha256, sha256_hex(champion_model),
                           provisional.name, provisional.version, sha256_hex(model))
    return compare.compare(
        provisional.task, source.target, shipped, theirs, who=who, data_sha256=source.sha256,
        rules=rules, latency_ms=(latency[0], latency[1]),
        size=(len(champion_model), len(model)),
        slice_columns={c: source.columns[c] for c in opts.slice_by},
        slice_kinds={c: source.kinds[c] for c in opts.slice_by},
        max_slice_loss=opts.max_slice_loss, changes=changes,
        schema_change_allowed=opts.allow_schema_change, forced=False)


def _verdict(opts: BuildOptions, m: Manifest, result: Champion) -> Champion:
    """A win passes; a loss stops the build, or is recorded as forced with ``--force``."""
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
