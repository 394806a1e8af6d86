"""``edgepack``: the click layer over :mod:`packager.build` and the bundle contract.

Commands call the library and format; they hold no rules. Every refusal the library
raises becomes one line on stderr (``edgepack: error: ...``) and exit status 1; a
usage mistake is click's exit status 2. ``--json`` prints one JSON document on stdout
for scripts; progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from edgefleet import __version__
from edgefleet.cli import EXIT_CODES_HELP
from edgefleet.cli import run as run_program
from edgefleet.contract.approval import check_approvals
from edgefleet.contract.bundle import (
    read_bundle_file,
    sign_bundle,
    unpack_unverified,
    unpack_verified,
)
from edgefleet.contract.errors import BundleError
from edgefleet.contract.signing import (
    Policy,
    TrustStore,
    generate_key,
    key_id,
    write_key_pair,
)
from packager.inspection import build_lines, card_lines, schema_lines, signature_lines

__all__ = ["cli", "main"]


def _passphrase(env: str | None, ask: bool) -> bytes | None:
    if env:
        value = os.environ.get(env)
        if value is None:
            raise click.UsageError(f"--passphrase-env: environment variable {env} is not set")
        return value.encode()
    if ask:
        return click.prompt("passphrase", hide_input=True, err=True).encode()
    return None


passphrase_options = [
    click.option("--passphrase-env", metavar="VAR",
                 help="Read the key's passphrase from this environment variable."),
    click.option("--ask-passphrase", is_flag=True, help="Prompt for the key's passphrase."),
]


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Put the bundle file's path in front of a refusal: the verifier works on bytes and
    names only the member at fault, and "not a bundle" alone does not say which file."""
    try:
        yield
    except BundleError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}", member=exc.member) from exc


def _emit(as_json: bool, doc: Any, text: str) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="edgepack")
def cli() -> None:
    """Package trained models into signed, verified bundles for edge devices."""


@cli.command()
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("keys"), show_default=True, help="Directory for NAME.key and NAME.pub.")
@_with(passphrase_options)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keygen(name: str, out_dir: Path, passphrase_env: str | None, ask_passphrase: bool,
           as_json: bool) -> None:
    """Create an Ed25519 signing key pair (private key at mode 0600)."""
    key = generate_key()
    priv, pub = write_key_pair(key, out_dir, name, _passphrase(passphrase_env, ask_passphrase))
    kid = key_id(key.public_key())
    _emit(as_json, {"keyid": kid, "private_key": str(priv), "public_key": str(pub)},
          f"key id {kid}\nprivate key {priv} (mode 0600: keep it secret)\npublic key  {pub}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--train-data", required=True, type=click.Path(path_type=Path),
              help="Training data (CSV, Parquet or .npy): its columns define the input schema.")
@click.option("--target", help="The label column in the data (left out of the features).")
@click.option("--name", required=True, help="Bundle name: lower-case letters, digits, . _ -")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.2.0.")
@click.option("--key", required=True, type=click.Path(path_type=Path),
              help="Private key to sign with (from `edgepack keygen`).")
@_with(passphrase_options)
@click.option("--quantize", type=click.Choice(["none", "dynamic", "static", "fp16"]),
              default="none", show_default=True, help="Quantisation of the ONNX graph.")
@click.option("--calibration-data", type=click.Path(path_type=Path),
              help="Rows for static quantisation (default: a sample of the training data).")
@click.option("--keep-first-layer-float/--quantize-first-layer", "keep_first_float",
              default=True, show_default=True,
              help="Leave the first quantisable layer in float (unscaled inputs need it).")
@click.option("--max-fidelity-loss", multiple=True, metavar="[KEY=]VALUE",
              help="Fidelity bound: label_disagreement, prob_diff, mean_prob_diff, rel_error;"
                   " a bare number bounds label disagreement / relative error. Repeatable.")
@click.option("--force", is_flag=True, help="Build even if the fidelity gate fails "
                                            "(recorded in the manifest).")
@click.option("--eval-data", type=click.Path(path_type=Path),
              help="Held-out data for the fidelity gate and the metrics.")
@click.option("--bins", type=click.IntRange(1, 32), default=10, show_default=True,
              help="Reference bins per numeric feature.")
@click.option("--description", default="", help="Free text stored in the manifest.")
@click.option("--code-revision", help="Override the git revision recorded in the lineage.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True, help="Directory for the bundle.")
@click.option("--card", "card", type=click.Path(dir_okay=False, path_type=Path),
              help="card.toml: owner, contact, intended_use, out_of_scope, limitations, "
                   "ethical_considerations, review_by (signed into the manifest).")
@click.option("--slice-by", multiple=True, metavar="COLUMN",
              help="Report every metric per value (or quartile) of COLUMN. Repeatable.")
@click.option("--sensitive", multiple=True, metavar="COLUMN",
              help="Report fairness rates and gaps between the groups of COLUMN (need not be "
                   "a model input). Repeatable.")
@click.option("--max-fairness-gap", multiple=True, metavar="GAP=VALUE",
              help="Fail the build when a gap is past VALUE: demographic_parity_difference, "
                   "equalized_odds_difference, mean_absolute_error_difference (at most), "
                   "demographic_parity_ratio (at least). Repeatable.")
@click.option("--positive-label", help="The class whose rates fairness compares "
                                       "(default: the second of two classes).")
@click.option("--time-column", help="A column of the training data whose first and last "
                                    "values are the card's time range.")
@click.option("--importances/--no-importances", default=True, show_default=True,
              help="Permutation importance of each input on the evaluation rows.")
@click.option("--champion", type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle in production: both models are run on the --eval-data rows and "
                   "compared (signed into the card); a challenger that does not win fails "
                   "the build with exit status 6 (refused by a check) unless --force.")
@click.option("--promote-if", multiple=True, metavar="RULE",
              help="A rule the challenger must meet against --champion: accuracy>=+0.01 "
                   "(absolute), f1_macro>=+2% (relative), mae<=-0.5 (lower is better), "
                   "latency_p95<=1.2x, size<=1.5x (ratios). An improvement must also be "
                   "significant (McNemar p<0.05 for accuracy, else a paired bootstrap interval "
                   "excluding 0). Default: the primary metric (accuracy, MAE) not worse. "
                   "Repeatable.")
@click.option("--max-slice-loss", type=click.FloatRange(0), default=0.02, show_default=True,
              help="With --champion and --slice-by: no group may lose more than this in the "
                   "primary metric (its own units).")
@click.option("--allow-schema-change", is_flag=True,
              help="Allow a champion with other inputs or classes (recorded; refused "
                   "otherwise, naming the feature or class).")
@click.option("--champion-trust", multiple=True, metavar="[ROLE=]PUBKEY",
              help="A key the champion may be signed by, besides the --key's own. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary, no progress.")
def build(model: Path, train_data: Path, target: str | None, name: str, version: str, key: Path,
          passphrase_env: str | None, ask_passphrase: bool, quantize: str,
          calibration_data: Path | None, keep_first_float: bool,
          max_fidelity_loss: tuple[str, ...], force: bool, eval_data: Path | None, bins: int,
          description: str, code_revision: str | None, out_dir: Path, card: Path | None,
          slice_by: tuple[str, ...], sensitive: tuple[str, ...],
          max_fairness_gap: tuple[str, ...], positive_label: str | None,
          time_column: str | None, importances: bool, champion: Path | None,
          promote_if: tuple[str, ...], max_slice_loss: float, allow_schema_change: bool,
          champion_trust: tuple[str, ...], as_json: bool) -> None:
    """Convert MODEL (pickle/joblib scikit-learn estimator or .onnx) into a signed bundle.

    \b
    --force builds past a failed fidelity or fairness gate, or a lost champion
    comparison; the manifest records it.
    \b
    A challenger that does not beat --champion exits 6 (refused by a check), like a
    failed fidelity or fairness gate, with the comparison table on stderr."""
    from packager.build import BuildOptions
    from packager.build import build as run_build
    from packager.evaluate import parse_gaps
    from packager.fidelity import parse_bounds
    from packager.fidelity import table as fidelity_table

    if quantize == "static" and calibration_data is None:
        calibration_data = None  # the training data is used; said in the progress line
    opts = BuildOptions(
        model=model, train_data=train_data, target=target, name=name, version=version, key=key,
        passphrase=_passphrase(passphrase_env, ask_passphrase), quantize=quantize,
        calibration_data=calibration_data, keep_first_float=keep_first_float,
        bounds=parse_bounds(max_fidelity_loss), force=force, out_dir=out_dir, bins=bins,
        eval_data=eval_data, description=description, code_revision=code_revision,
        card=card, slice_by=slice_by, sensitive=sensitive,
        fairness_bounds=parse_gaps(max_fairness_gap), positive_label=positive_label,
        time_column=time_column, importances=importances, champion=champion,
        promote_if=promote_if, max_slice_loss=max_slice_loss,
        allow_schema_change=allow_schema_change, champion_trust=champion_trust)
    steps = ["load", "convert", "quantize", "fidelity", "profile", "card", "sign"]

    def progress(step: str, detail: str) -> None:
        if not as_json:
            n = steps.index(step) + 1 if step in steps else 0
            click.echo(f"[{n}/{len(steps)}] {step:<9} {detail}", err=True)

    result = run_build(opts, progress)
    for warning in [] if as_json else result.warnings:  # --json: in the document
        click.echo(f"edgepack: warning: {warning}", err=True)
    m = result.manifest
    doc = {"path": str(result.path), "sha256": result.sha256, "size": result.size,
           "warnings": result.warnings,
           "name": m.name, "version": m.version, "reference_hash": m.reference_hash,
           "quantization": m.quantization.to_dict(), "fidelity": m.fidelity.to_dict(),
           "metrics": m.metrics, "card": m.card.to_dict() if m.card else None,
           "timings_s": {k: round(v, 4) for k, v in result.timings.items()}}
    text = f"{fidelity_table(result.fidelity_rows)}\n" if result.fidelity_rows else ""
    text += f"built {result.path} ({result.size:,} bytes, sha256 {result.sha256[:16]}…)"
    _emit(as_json, doc, text)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key.")
@_with(passphrase_options)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the signed bundle here (default: replace BUNDLE).")
@click.option("--role", help="Also sign an approval statement in this role (e.g. approver).")
@click.option("--comment", default="", help="Why it is approved (with --role).")
@click.option("--review-by", metavar="YYYY-MM-DD",
              help="The next review date, renewing the card's (with --role).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sign(bundle: Path, key: Path, passphrase_env: str | None, ask_passphrase: bool,
         out: Path | None, role: str | None, comment: str, review_by: str | None,
         as_json: bool) -> None:
    """Add a signature (an approver's, say) to BUNDLE; nothing else changes.

    With --role, also add a signed statement of who approved it, when, in what role and
    why; `edgepack inspect --trust` lists them with the names of the keys."""
    if role is None and (comment or review_by):
        raise click.UsageError("--comment and --review-by go with --role")
    from packager.build import load_signing_key

    private = load_signing_key(key, _passphrase(passphrase_env, ask_passphrase))
    approve = None
    if role is not None:
        from edgefleet.contract.approval import sign_approval

        _, signed_at = _utc_now()

        def approve(manifest: bytes):
            return sign_approval(private, manifest, role=role, comment=comment,
                                 signed_at=signed_at, review_by=review_by)

    with _naming(bundle):
        data = sign_bundle(read_bundle_file(bundle), private, approve=approve)
    target = out or bundle
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    kid = key_id(private.public_key())
    _emit(as_json, {"bundle": str(target), "key_id": kid, "role": role,
                    "review_by": review_by},
          f"signed {target} with key {kid}" + (f" (approval as {role})" if role else ""))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trust", "trust", multiple=True, required=True, metavar="[ROLE=]PUBKEY",
              help="A trusted public key, optionally with a role. Repeatable.")
@click.option("--threshold", type=click.IntRange(1), default=1, show_default=True,
              help="Distinct trusted signatures required.")
@click.option("--require-role", multiple=True, help="A role that must have signed. Repeatable.")
@click.option("--installed-version", help="Refuse a version lower than this (downgrade check).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(bundle: Path, trust: tuple[str, ...], threshold: int, require_role: tuple[str, ...],
           installed_version: str | None, as_json: bool) -> None:
    """Verify BUNDLE against trusted keys: exit 0 if valid, 1 with the reason if not."""
    store = TrustStore.from_files(trust)
    # streamed into a temporary directory: memory stays flat however large the bundle
    with _naming(bundle), unpack_verified(bundle, store, Policy(threshold, frozenset(require_role)),
                                          installed_version=installed_version) as result:
        pass
    m = result.manifest
    signers = [{"keyid": k.keyid, "role": k.role, "name": k.name} for k in result.signers]
    # verified with the signatures; those by keys outside the trust store are left out
    approvals = [a.to_dict() for a in check_approvals(
        result.envelope.approvals, result.member("manifest.json"), store) if a.trusted]
    _emit(as_json, {"valid": True, "name": m.name, "version": m.version, "sha256": result.sha256,
                    "signers": signers, "approvals": approvals},
          f"valid: {m.name} {m.version}, signed by "
          + ", ".join(f"{s['name'] or s['keyid'][:16]} ({s['role']})" for s in signers)
          + "".join(f"\napproved by {a['name'] or a['keyid'][:16]} as {a['role']}"
                    + ("" if a["role_confirmed"] else " (role NOT confirmed)")
                    + f" at {a['signed_at']}"
                    + (f", review by {a['review_by']}" if a["review_by"] else "")
                    + (f": {a['comment']}" if a["comment"] else "") for a in approvals))


def _utc_now() -> tuple[float, str]:
    import time
    from datetime import datetime, timezone

    now = time.time()
    return now, datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trust", "trust", multiple=True, metavar="[ROLE=]PUBKEY",
              help="Mark which signatures come from these keys.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and signatures as JSON.")
def inspect(bundle: Path, trust: tuple[str, ...], as_json: bool) -> None:
    """Show what BUNDLE holds. Checks structure and digests; signatures are listed, not judged
    (use `edgepack verify` for that)."""
    with _naming(bundle), unpack_unverified(bundle) as b:
        pass
    store = TrustStore.from_files(trust) if trust else TrustStore()
    sigs = []
    for s in b.envelope.signatures:
        known = store.get(s.keyid)
        sigs.append({"keyid": s.keyid, "trusted": known is not None,
                     "role": known.role if known else None, "name": known.name if known else ""})
    with _naming(bundle):
        approvals = [a.to_dict() for a in check_approvals(
            b.envelope.approvals, b.member("manifest.json"), store)]
    if as_json:
        _emit(True, {"sha256": b.sha256, "size": b.size, "manifest": b.manifest.to_dict(),
                     "signatures": sigs, "approvals": approvals}, "")
        return
    m = b.manifest
    out = [f"{m.name} {m.version}  ({m.task}, created {m.created_at})",
           f"bundle sha256 {b.sha256}  {b.size:,} bytes",
           f"reference_hash {m.reference_hash}"]
    if m.description:
        out.append(m.description)
    out += schema_lines(m) + build_lines(m) + card_lines(m)
    out += signature_lines(sigs, approvals, bool(trust))
    click.echo("\n".join(out))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md",
              show_default=True, help="Markdown, HTML or JSON.")
@click.option("--trust", "trust", multiple=True, metavar="[ROLE=]PUBKEY",
              help="Check approvals against these keys and name the approvers. Repeatable.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the card here (default: standard output).")
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
def card(bundle: Path, fmt: str, trust: tuple[str, ...], out: Path | None,
         as_json: bool) -> None:
    """Render BUNDLE's model card: who approved it, what data trained it, how it was
    evaluated, what biases were tested, when it is reviewed next, how it can be explained.
    Checks structure and digests; use `edgepack verify` to judge the signatures."""
    from packager.card import card_document, render

    store = TrustStore.from_files(trust) if trust else None
    with _naming(bundle), unpack_unverified(bundle) as b:
        text = render(card_document(b, store), "json" if as_json else fmt)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")


@cli.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--server", envvar="FLEET_SERVER", required=True,
              help="The fleet server's URL (env FLEET_SERVER).")
@click.option("--token", envvar="FLEET_TOKEN", default=None,
              help="An operator token (env FLEET_TOKEN).")
@click.option("--trigger", default="manual", show_default=True,
              help="What started this run: manual, schedule or alert:<id>.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the data, the model and the bundles go (default: "
                   "retrain-<recipe>/ beside the recipe).")
@click.option("--watch", is_flag=True,
              help="Keep running: start runs on the recipe's triggers ([watch]: requested "
                   "runs, open alerts, a schedule) within its cooldown and daily cap, "
                   "until SIGTERM or Ctrl-C.")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="With --watch: also receive the fleet's alert webhook here (HMAC-signed; "
                   "needs --webhook-secret-file) and answer an alert as it arrives.")
@click.option("--webhook-secret-file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path), default=None,
              help="The secret the fleet signs its webhook with (fleet serve's).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def retrain(recipe: Path, server: str, token: str | None, trigger: str, work: Path | None,
            watch: bool, listen: str | None, webhook_secret_file: Path | None,
            as_json: bool) -> None:
    """One run of the retraining loop: fetch, split, train, build against the champion,
    and roll the challenger out only if it wins (recorded on the server either way).

    \b
    Exit status: 0 promoted (uploaded, staged rollout created); 6 rejected (the
    challenger did not beat the champion; nothing deployed); 1 failed."""
    from packager.errors import ChampionLostError
    from packager.retrain import FleetApi, load_recipe
    from packager.retrain import run as run_once

    rec = load_recipe(recipe)
    if listen is not None and not watch:
        raise click.UsageError("--listen receives alerts for --watch: give both")
    api = FleetApi(server, token)
    if watch:
        _watch(rec, api, work or recipe.parent / f"retrain-{rec.name}", listen,
               webhook_secret_file)
        return
    try:
        outcome = run_once(rec, api, trigger=trigger,
                           work=work or recipe.parent / f"retrain-{rec.name}",
                           say=lambda line: None if as_json else click.echo(line, err=True))
    finally:
        api.close()
    if as_json:
        click.echo(json.dumps(outcome.__dict__, sort_keys=True))
    else:
        click.echo(f"retrain run {outcome.run_id}: {outcome.status}"
                   + (f" ({outcome.reason})" if outcome.reason else "")
                   + (f", rollout {outcome.rollout}" if outcome.rollout else ""))
    if outcome.status == "rejected":
        raise ChampionLostError(f"retrain run {outcome.run_id}: rejected, nothing deployed")


def _watch(rec: Any, api: Any, work: Path, listen: str | None = None,
           secret_file: Path | None = None) -> None:
    import signal
    import threading

    from packager.hook import AlertInbox, HookServer, parse_listen
    from packager.watch import Watcher, policy_of

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    policy = policy_of(rec)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    hook = None
    watcher = Watcher(rec, api, policy, work=work, say=say)
    if listen is not None:
        address = parse_listen(listen)
        # read as fleet serve reads its copy
        secret = secret_file.read_text().strip().encode() if secret_file else b""
        watcher.inbox = AlertInbox(watcher.concerns)
        hook = HookServer(address, secret, watcher.inbox, say=say)
        hook.start()
        say(f"receiving the alert webhook on http://{address[0]}:{hook.port}/")
    click.echo(f"watching recipe {rec.name} (group {rec.group}, bundle {rec.bundle}): "
               f"alerts {', '.join(policy.alerts)}; every {policy.poll_s:g} s", err=True)
    try:
        watcher.serve(stop)
    finally:
        if hook is not None:
            hook.stop()
        api.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; a refusal is one line and an exit status by its kind
    (:mod:`edgefleet.cli`)."""
    return run_program(cli, "edgepack", argv)


if __name__ == "__main__":
    sys.exit(main())
