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
from edgefleet.errors import EdgefleetError

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary, no progress.")
def build(model: Path, train_data: Path, target: str | None, name: str, version: str, key: Path,
          passphrase_env: str | None, ask_passphrase: bool, quantize: str,
          calibration_data: Path | None, keep_first_float: bool,
          max_fidelity_loss: tuple[str, ...], force: bool, eval_data: Path | None, bins: int,
          description: str, code_revision: str | None, out_dir: Path, as_json: bool) -> None:
    """Convert MODEL (pickle/joblib scikit-learn estimator or .onnx) into a signed bundle."""
    from packager.build import BuildOptions
    from packager.build import build as run_build
    from packager.fidelity import parse_bounds
    from packager.fidelity import table as fidelity_table

    if quantize == "static" and calibration_data is None:
        calibration_data = None  # the training data is used; said in the progress line
    opts = BuildOptions(
        model=model, train_data=train_data, target=target, name=name, version=version, key=key,
        passphrase=_passphrase(passphrase_env, ask_passphrase), quantize=quantize,
        calibration_data=calibration_data, keep_first_float=keep_first_float,
        bounds=parse_bounds(max_fidelity_loss), force=force, out_dir=out_dir, bins=bins,
        eval_data=eval_data, description=description, code_revision=code_revision)
    steps = ["load", "convert", "quantize", "fidelity", "profile", "sign"]

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
           "metrics": m.metrics, "timings_s": {k: round(v, 4) for k, v in result.timings.items()}}
    text = f"{fidelity_table(result.fidelity_rows)}\n" if result.fidelity_rows else ""
    text += f"built {result.path} ({result.size:,} bytes, sha256 {result.sha256[:16]}…)"
    _emit(as_json, doc, text)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Private key.")
@_with(passphrase_options)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the signed bundle here (default: replace BUNDLE).")
def sign(bundle: Path, key: Path, passphrase_env: str | None, ask_passphrase: bool,
         out: Path | None) -> None:
    """Add a signature (an approver's, say) to BUNDLE; nothing else changes."""
    from packager.build import load_signing_key

    private = load_signing_key(key, _passphrase(passphrase_env, ask_passphrase))
    with _naming(bundle):
        data = sign_bundle(read_bundle_file(bundle), private)
    target = out or bundle
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    click.echo(f"signed {target} with key {key_id(private.public_key())}")


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
    _emit(as_json, {"valid": True, "name": m.name, "version": m.version, "sha256": result.sha256,
                    "signers": signers},
          f"valid: {m.name} {m.version}, signed by "
          + ", ".join(f"{s['name'] or s['keyid'][:16]} ({s['role']})" for s in signers))


def _fmt_range(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f"[{lo:.6g}, {hi:.6g}]"


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
                     "role": known.role if known else None})
    if as_json:
        _emit(True, {"sha256": b.sha256, "size": b.size, "manifest": b.manifest.to_dict(),
                     "signatures": sigs}, "")
        return
    m = b.manifest
    out = [f"{m.name} {m.version}  ({m.task}, created {m.created_at})",
           f"bundle sha256 {b.sha256}  {b.size:,} bytes",
           f"reference_hash {m.reference_hash}"]
    if m.description:
        out.append(m.description)
    out.append("\ninputs")
    out.append(f"  {'name':<24} {'kind':<12} {'dtype':<8} {'range / categories':<34} missing")
    for s in m.inputs:
        detail = _fmt_range(s.min, s.max) if s.kind == "numeric" else \
            ", ".join(s.categories[:5]) + (f" …(+{len(s.categories) - 5})"
                                           if len(s.categories) > 5 else "")
        out.append(f"  {s.name:<24} {s.kind:<12} {s.dtype:<8} {detail:<34} "
                   f"{'allowed' if s.missing_allowed else 'refused'}")
    out.append("\noutputs")
    for o in m.outputs:
        out.append(f"  {o.name:<24} {o.role:<14} {o.dtype}")
    if m.classes:
        out.append(f"  classes: {', '.join(map(str, m.classes[:20]))}")
    out.append("\nfiles")
    for e in m.files:
        out.append(f"  {e.path:<16} {e.size:>12,} bytes  sha256 {e.sha256[:16]}…")
    q = m.quantization
    out.append(f"\nquantization  mode {q.mode}, applied {str(q.applied).lower()}, "
               f"{q.quantized_ops} ops quantised"
               + (f", kept in float: {', '.join(q.float_ops_kept)}" if q.float_ops_kept else ""))
    if q.note:
        out.append(f"  {q.note}")
    f = m.fidelity
    parts = [f"rows {f.rows}", f"passed {str(f.passed).lower()}"]
    if f.forced:
        parts.append("FORCED past a failed gate")
    for label, v in (("label agreement", f.label_agreement),
                     ("max |Δp|", f.max_abs_prob_diff), ("mean |Δp|", f.mean_abs_prob_diff),
                     ("max |err|", f.max_abs_error), ("max rel err", f.max_rel_error)):
        if v is not None:
            parts.append(f"{label} {v:.6g}")
    out.append("fidelity      " + ", ".join(parts))
    if m.metrics:
        out.append("metrics       " + ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items()))
        if any(k.startswith("train_") for k in m.metrics):
            out.append("  computed on the training rows (optimistic: the model has seen them;"
                       " build with --eval-data for held-out metrics)")
    else:
        out.append("metrics       none (built without --target)")
    ln = m.lineage
    out.append(f"\nlineage\n  source   {ln.source_kind} {ln.estimator}\n"
               f"  model    sha256 {ln.source_sha256}\n"
               f"  data     sha256 {ln.data_sha256} ({ln.data_rows} rows)\n"
               f"  code     {ln.code_revision or '(not in a git repository)'}\n"
               f"  versions " + ", ".join(f"{k} {v}" for k, v in ln.libraries.items()))
    out.append("\nsignatures (not judged here: use `edgepack verify`)")
    for s in sigs:
        mark = f"trusted, {s['role']}" if s["trusted"] else "unknown key"
        out.append(f"  {s['keyid']}  {mark}")
    if not sigs:
        out.append("  none")
    click.echo("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning edgefleet errors into one line and exit 1."""
    try:
        cli.main(args=argv, prog_name="edgepack", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edgepack: aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except EdgefleetError as exc:
        click.echo(f"edgepack: error: {exc}", err=True)
        table = getattr(exc, "table", "")
        if table:
            click.echo(table, err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
