"""``edgepack`` through :func:`packager.cli.main`: the commands people and CI run, and a
table of bad inputs, each of which must end in one clear line that names what is wrong."""

from __future__ import annotations

import gzip
import io
import json
import re
import stat
import tarfile
from dataclasses import replace
from pathlib import Path

import click
import pytest
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from edgefleet.contract.bundle import pack_bundle, read_unverified
from edgefleet.contract.signing import key_id, load_public_key
from packager.cli import cli, main
from tests.hostile import HOSTILE, Hostile
from tests.packager.conftest import EPOCH, dataset, dump, fit, write_csv

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

PROGRESS = re.compile(r"^\[\d/7\] ")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Keys made by `edgepack keygen`, an iris model, its CSV and a built bundle."""
    root = tmp_path_factory.mktemp("cli")
    keys = root / "keys"
    for name in ("build", "approver", "stranger"):
        assert main(["keygen", name, "--out", str(keys)]) == 0
    X, y = dataset("iris", string_labels=True)
    model = fit(Pipeline([("scale", StandardScaler()),
                          ("lr", LogisticRegression(max_iter=300))]), X, y)
    ctx = {
        "root": root, "keys": keys, "X": X,
        "model": dump(model, root / "iris.joblib"),
        "data": write_csv(root / "iris.csv", X, y),
        "kmeans": dump(fit(KMeans(3, n_init=1, random_state=0), X, y), root / "kmeans.joblib"),
    }
    ctx["bundle"] = _build(ctx, root / "bundles")
    return ctx


def _build(ctx, out: Path, *extra: str, model: Path | None = None) -> Path:
    code = main(["build", str(model or ctx["model"]), "--train-data", str(ctx["data"]),
                 "--target", "target", "--name", "iris", "--version", "1.0.0",
                 "--key", str(ctx["keys"] / "build.key"), "--out", str(out), "--json",
                 *extra])
    assert code == 0
    return out / "iris-1.0.0.edgebundle"


def _trust(ctx, *names: str) -> list[str]:
    out = []
    for name in names:
        out += ["--trust", f"{name}={ctx['keys'] / name}.pub"]
    return out


def _error_line(err: str) -> str:
    """The one error line: progress lines may come first, nothing may come after."""
    lines = [line for line in err.splitlines() if line.strip()]
    others = [line for line in lines if not PROGRESS.match(line)]
    assert len(others) == 1, f"expected one error line, got {others!r}"
    assert lines[-1] == others[0]
    return others[0]


# --------------------------------------------------------------------------- keygen


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    assert main(["keygen", "ci", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "ci.key", tmp_path / "ci.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    kid = key_id(load_public_key(public))
    assert out.splitlines()[0] == f"key id {kid}"
    assert main(["keygen", "ci2", "--out", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["keyid"] == key_id(load_public_key(Path(doc["public_key"])))
    assert doc["private_key"] == str(tmp_path / "ci2.key")


def test_keygen_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keygen", "ci", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "ci.key").read_bytes()
    capsys.readouterr()
    assert main(["keygen", "ci", "--out", str(tmp_path)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("edgepack: error: ")
    assert "ci.key: exists already" in line
    assert (tmp_path / "ci.key").read_bytes() == before


# --------------------------------------------------------------------------- the happy path


def test_build_verify_inspect(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    code = main(["build", str(work["model"]), "--train-data", str(work["data"]), "--target",
                 "target", "--name", "iris", "--version", "1.2.0", "--key",
                 str(work["keys"] / "build.key"), "--out", str(tmp_path),
                 "--description", "iris via the CLI"])
    assert code == 0
    captured = capsys.readouterr()
    steps = [line.split()[1] for line in captured.err.splitlines() if PROGRESS.match(line)]
    assert steps == ["load", "convert", "quantize", "fidelity", "profile", "card",
                     "sign"]
    bundle = tmp_path / "iris-1.2.0.edgebundle"
    assert f"built {bundle}" in captured.out
    assert "label_disagreement" in captured.out  # the fidelity table

    assert main(["verify", str(bundle), *_trust(work, "build")]) == 0
    assert capsys.readouterr().out.strip() == "valid: iris 1.2.0, signed by build (build)"

    assert main(["inspect", str(bundle), *_trust(work, "build")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("iris 1.2.0  (classification, created 2026-01-01T00:00:00Z)")
    assert "iris via the CLI" in text
    for feature in work["X"].columns:
        assert f"\n  {feature} " in text
    assert "classes: setosa, versicolor, virginica" in text
    assert re.search(r"fidelity +rows 150, passed true, label agreement 1,", text)
    assert "computed on the training rows" in text  # no --eval-data: labelled optimistic
    assert "edgepack: warning: metrics computed on the training rows" in captured.err
    assert "trusted, build" in text

    assert main(["inspect", str(bundle), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest"]["name"] == "iris" and doc["manifest"]["version"] == "1.2.0"
    assert [i["name"] for i in doc["manifest"]["inputs"]] == list(work["X"].columns)
    assert doc["size"] == bundle.stat().st_size
    assert [s["trusted"] for s in doc["signatures"]] == [False]  # no --trust given


def test_build_json_summary(work, tmp_path, capsys):
    capsys.readouterr()
    _build(work, tmp_path, "--bins", "4")
    captured = capsys.readouterr()
    assert captured.err == ""  # --json: no progress
    doc = json.loads(captured.out)
    assert doc["path"] == str(tmp_path / "iris-1.0.0.edgebundle")
    assert doc["size"] == Path(doc["path"]).stat().st_size
    assert doc["fidelity"]["passed"] is True and doc["fidelity"]["label_agreement"] == 1.0
    assert doc["quantization"]["mode"] == "none"
    assert set(doc["metrics"]) == {"train_accuracy", "train_f1_macro"}
    assert len(doc["warnings"]) == 1 and "--eval-data" in doc["warnings"][0]
    assert set(doc["timings_s"]) == {"load", "convert", "quantize", "fidelity", "profile",
                                     "card", "sign"}
    assert doc["card"]["evaluation"]["data"] == "training"  # no --eval-data


def test_approver_signature_satisfies_a_two_key_policy(work, tmp_path, capsys):
    bundle = tmp_path / "b.edgebundle"
    bundle.write_bytes(work["bundle"].read_bytes())
    policy = ["--threshold", "2", "--require-role", "approver"]
    trust = _trust(work, "build", "approver")

    assert main(["verify", str(bundle), *trust, *policy]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line == (f"edgepack: error: {bundle}: signatures.json: 1 trusted signature(s), "
                    "the policy asks for 2")
    assert main(["verify", str(bundle), *trust, "--require-role", "approver"]) == 1
    assert "no valid signature with role(s) approver" in _error_line(capsys.readouterr().err)

    assert main(["sign", str(bundle), "--key", str(work["keys"] / "approver.key")]) == 0
    approver = key_id(load_public_key(work["keys"] / "approver.pub"))
    assert capsys.readouterr().out.strip() == f"signed {bundle} with key {approver}"

    assert main(["verify", str(bundle), *trust, *policy, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert sorted(s["role"] for s in doc["signers"]) == ["approver", "build"]
    # nothing but the envelope changed
    before, after = read_unverified(work["bundle"].read_bytes()), \
        read_unverified(bundle.read_bytes())
    assert after.members["manifest.json"] == before.members["manifest.json"]
    assert after.members["model.onnx"] == before.members["model.onnx"]
    assert len(after.envelope.signatures) == 2


def test_sign_to_another_file_leaves_the_original(work, tmp_path, capsys):
    out = tmp_path / "countersigned.edgebundle"
    original = work["bundle"].read_bytes()
    assert main(["sign", str(work["bundle"]), "--key", str(work["keys"] / "approver.key"),
                 "--out", str(out)]) == 0
    assert work["bundle"].read_bytes() == original
    assert len(read_unverified(out.read_bytes()).envelope.signatures) == 2


def test_failed_fidelity_gate_prints_the_table_and_force_overrides(work, tmp_path, capsys):
    X, y = dataset("breast_cancer")
    mlp = fit(MLPClassifier((8,), max_iter=50, random_state=0), X, y)
    model = dump(mlp, tmp_path / "mlp.joblib")
    data = write_csv(tmp_path / "cancer.csv", X, y)
    args = ["build", str(model), "--train-data", str(data), "--target", "target", "--name",
            "mlp", "--version", "0.1.0", "--key", str(work["keys"] / "build.key"), "--out",
            str(tmp_path / "out"), "--max-fidelity-loss", "prob_diff=0",
            "--max-fidelity-loss", "mean_prob_diff=0", "--json"]
    assert main(args) == 6  # refused by a check (edgefleet.cli)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("edgepack: error: mlp.joblib: the packaged model disagrees")
    assert err[1].split() == ["measure", "value", "bound", "result"]
    assert [line.split()[0] for line in err[2:] if line.endswith("FAIL")] == \
        ["prob_diff", "mean_prob_diff"]

    assert main([*args, "--force"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fidelity"]["forced"] is True and doc["fidelity"]["passed"] is False


# --------------------------------------------------------------------------- bad inputs


def _tampered_manifest(ctx, where: Path) -> Path:
    """The manifest changed after signing, re-packed with the old signatures."""
    b = read_unverified(ctx["bundle"].read_bytes())
    files = {k: v for k, v in b.members.items() if k not in ("manifest.json", "signatures.json")}
    forged = replace(b.manifest, description="now approved for production")
    path = where / "forged.edgebundle"
    path.write_bytes(pack_bundle(forged, b.envelope, files, b.mtime))
    return path


def _tampered_member(ctx, where: Path) -> Path:
    """One byte of model.onnx flipped (same size), manifest and signatures untouched."""
    b = read_unverified(ctx["bundle"].read_bytes())
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("manifest.json", "signatures.json", "model.onnx", "reference.json",
                     "samples.json"):
            body = bytearray(b.members[name])
            if name == "model.onnx":
                body[len(body) // 2] ^= 0x01
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), b.mtime, 0o644
            tar.addfile(info, io.BytesIO(bytes(body)))
    path = where / "patched.edgebundle"
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return path


def _flipped_byte(ctx, where: Path) -> Path:
    raw = bytearray(ctx["bundle"].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path = where / "flipped.edgebundle"
    path.write_bytes(bytes(raw))
    return path


def _loose_key(ctx, where: Path) -> Path:
    path = where / "loose.key"
    path.write_bytes((ctx["keys"] / "build.key").read_bytes())
    path.chmod(0o644)
    return path


def _not_a_bundle(ctx, where: Path) -> Path:
    path = where / "notes.txt"
    path.write_text("just some notes\n")
    return path


def _build_args(ctx, **change: str) -> list[str]:
    args = {"model": str(ctx["model"]), "--train-data": str(ctx["data"]), "--target": "target",
            "--name": "iris", "--version": "1.0.0", "--key": str(ctx["keys"] / "build.key")}
    args.update(change)
    out = ["build", args.pop("model")]
    for k, v in args.items():
        if v is not None:
            out += [k, v]
    return [*out, "--out", str(ctx["root"] / "never")]


BAD = [
    ("missing-model-file", lambda c, w: _build_args(c, model=str(w / "absent.joblib")),
     1, ["absent.joblib: cannot read model"]),
    ("missing-data-file", lambda c, w: _build_args(c, **{"--train-data": str(w / "no.csv")}),
     1, ["no.csv: no such data file"]),
    ("wrong-target-column", lambda c, w: _build_args(c, **{"--target": "species"}),
     1, ["target column 'species' not found"]),
    ("unsupported-model", lambda c, w: _build_args(c, model=str(c["kmeans"])),
     1, ["KMeans: only classifiers and regressors"]),
    ("bad-version", lambda c, w: _build_args(c, **{"--version": "1.0"}),
     1, ["--version", "'1.0'", "semantic version"]),
    ("bad-name", lambda c, w: _build_args(c, **{"--name": "Bad Name"}),
     1, ["--name 'Bad Name'"]),
    ("key-mode-0644", lambda c, w: _build_args(c, **{"--key": str(_loose_key(c, w))}),
     1, ["loose.key", "mode 0644", "chmod 600"]),
    ("key-is-the-public-key",
     lambda c, w: _build_args(c, **{"--key": str(c["keys"] / "build.pub")}),
     1, ["build.pub: this is a public key", "build.key"]),
    ("sign-with-the-public-key",
     lambda c, w: ["sign", str(c["bundle"]), "--key", str(c["keys"] / "approver.pub"),
                   "--out", str(w / "never.edgebundle")],
     1, ["approver.pub: this is a public key"]),
    ("unknown-fidelity-bound",
     lambda c, w: [*_build_args(c), "--max-fidelity-loss", "accuracy=0.1"],
     1, ["--max-fidelity-loss: unknown bound 'accuracy'"]),
    ("fidelity-bound-not-a-number",
     lambda c, w: [*_build_args(c), "--max-fidelity-loss", "prob_diff=lots"],
     1, ["--max-fidelity-loss prob_diff: 'lots' is not a number"]),
    ("verify-tampered-manifest",
     lambda c, w: ["verify", str(_tampered_manifest(c, w)), *_trust(c, "build")],
     1, ["forged.edgebundle", "manifest.json", "does not verify"]),
    ("verify-tampered-model",
     lambda c, w: ["verify", str(_tampered_member(c, w)), *_trust(c, "build")],
     1, ["patched.edgebundle", "model.onnx: sha256 differs"]),
    ("verify-flipped-byte",
     lambda c, w: ["verify", str(_flipped_byte(c, w)), *_trust(c, "build")],
     1, ["flipped.edgebundle", "not a bundle"]),
    ("verify-untrusted-key",
     lambda c, w: ["verify", str(c["bundle"]), *_trust(c, "stranger")],
     1, ["iris-1.0.0.edgebundle", "no signature by a trusted key"]),
    ("verify-missing-public-key",
     lambda c, w: ["verify", str(c["bundle"]), "--trust", str(w / "absent.pub")],
     1, ["absent.pub: cannot read public key"]),
    ("inspect-not-a-bundle", lambda c, w: ["inspect", str(_not_a_bundle(c, w))],
     1, ["notes.txt", "not a bundle"]),
    ("inspect-missing-bundle", lambda c, w: ["inspect", str(w / "gone.edgebundle")],
     1, ["gone.edgebundle: cannot read"]),
    ("sign-not-a-bundle",
     lambda c, w: ["sign", str(_not_a_bundle(c, w)), "--key", str(c["keys"] / "approver.key")],
     1, ["notes.txt", "not a bundle"]),
    ("usage-missing-name", lambda c, w: _build_args(c, **{"--name": None}),
     2, ["Missing option '--name'"]),
    ("usage-unknown-quantize-mode", lambda c, w: [*_build_args(c), "--quantize", "int4"],
     2, ["'int4' is not one of"]),
    ("usage-bins-out-of-range", lambda c, w: [*_build_args(c), "--bins", "0"],
     2, ["--bins", "0"]),
    ("usage-verify-without-trust", lambda c, w: ["verify", str(c["bundle"])],
     2, ["Missing option '--trust'"]),
]


@pytest.mark.parametrize("argv, code, names", [pytest.param(a, c, n, id=i) for i, a, c, n in BAD])
def test_bad_input_gives_one_clear_line(argv, code, names, work, tmp_path, capsys):
    args = argv(work, tmp_path)
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err
    if code == 2:  # click's usage error: usage lines, then one "Error:" line
        line = [line for line in err.splitlines() if line.strip()][-1]
        assert line.startswith("Error: ")
    else:
        line = _error_line(err)
        assert line.startswith("edgepack: error: ")
    for name in names:
        assert name in line
    assert not (work["root"] / "never").exists()


# --------------------------------------------------------------------------- help


def test_every_command_and_option_has_help_text(capsys):
    assert cli.help
    assert set(cli.commands) == {"keygen", "build", "sign", "verify", "inspect", "card",
                                 "retrain"}
    for name, command in cli.commands.items():
        assert command.help and len(command.help.strip()) > 20, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"
        assert main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"Usage: edgepack {name} ")
        assert command.help.split("\n")[0][:30] in out


def test_version(capsys):
    from edgefleet import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edgepack, version {__version__}"


# --------------------------------------------------------------------------- hidden data


@pytest.mark.parametrize("case", [pytest.param(h, id=h.id) for h in HOSTILE])
def test_verify_refuses_a_signed_bundle_with_something_hidden(case: Hostile, work, tmp_path,
                                                              capsys):
    """``edgepack verify`` over a file streamed from disk: the refusal keeps its own type
    and one line names the file and what was found."""
    path = tmp_path / "hostile.edgebundle"
    path.write_bytes(case.build(work["bundle"].read_bytes()))
    argv = ["verify", str(path), *_trust(work, "build")]
    with pytest.raises(case.error) as excinfo:
        cli.main(args=argv, prog_name="edgepack", standalone_mode=False)
    assert type(excinfo.value) is case.error
    assert main(argv) == 1
    line = _error_line(capsys.readouterr().err)
    assert str(path) in line and case.names in line
    assert main(["inspect", str(path)]) == 1  # not even shown as if it were a bundle
