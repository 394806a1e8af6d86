"""Keys on disk, key ids, the trust store and policy, and the signature envelope."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import (
    BadSignatureError,
    BundleFormatError,
    KeyFileError,
    ThresholdError,
    UntrustedSignerError,
)
from edgefleet.contract.signing import (
    MAX_SIGNATURES,
    PAYLOAD_TYPE,
    Envelope,
    Policy,
    Signature,
    TrustStore,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    pae,
    trust_from_mapping,
    verify_envelope,
    write_key_pair,
)


def raw_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def raw_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


# --------------------------------------------------------------------------- key files


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=["umask-000", "umask-022",
                                                               "umask-077"])
def test_private_key_file_mode_is_exactly_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        priv, pub = write_key_pair(generate_key(), tmp_path / "keys", "build")
    finally:
        os.umask(old)
    assert priv.name == "build.key" and pub.name == "build.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_ISREG(priv.stat().st_mode)


def test_write_then_load_round_trip(tmp_path):
    key = generate_key()
    priv, pub = write_key_pair(key, tmp_path, "build")
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert raw_private(load_private_key(priv)) == raw_private(key)
    loaded_pub = load_public_key(pub)
    assert key_id(loaded_pub) == key_id(key.public_key())


def test_write_refuses_to_overwrite(tmp_path):
    priv, _ = write_key_pair(generate_key(), tmp_path, "build")
    before = priv.read_bytes()
    with pytest.raises(KeyFileError, match="exists already") as excinfo:
        write_key_pair(generate_key(), tmp_path, "build")
    assert str(priv) in str(excinfo.value)
    assert priv.read_bytes() == before


def test_write_refuses_when_only_the_public_file_exists(tmp_path):
    (tmp_path / "build.pub").write_text("something")
    with pytest.raises(KeyFileError, match=r"build\.pub"):
        write_key_pair(generate_key(), tmp_path, "build")
    assert not (tmp_path / "build.key").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o010],
                         ids=["0644", "0640", "0604", "0660", "0710"])
def test_load_refuses_a_key_readable_by_others(tmp_path, mode):
    priv, _ = write_key_pair(generate_key(), tmp_path, "build")
    priv.chmod(mode)
    with pytest.raises(KeyFileError) as excinfo:
        load_private_key(priv)
    assert type(excinfo.value) is KeyFileError
    assert str(priv) in str(excinfo.value)
    assert f"{mode:04o}" in str(excinfo.value)


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=["0600", "0400"])
def test_load_accepts_owner_only_modes(tmp_path, mode):
    key = generate_key()
    priv, _ = write_key_pair(key, tmp_path, "build")
    priv.chmod(mode)
    assert raw_private(load_private_key(priv)) == raw_private(key)


def test_encrypted_key_needs_its_passphrase(tmp_path):
    key = generate_key()
    priv, _ = write_key_pair(key, tmp_path, "build", passphrase=b"correct horse")
    assert b"ENCRYPTED" in priv.read_bytes()
    with pytest.raises(KeyFileError, match="encrypted") as excinfo:
        load_private_key(priv)
    assert str(priv) in str(excinfo.value)
    with pytest.raises(KeyFileError, match="passphrase") as excinfo:
        load_private_key(priv, b"wrong")
    assert str(priv) in str(excinfo.value)
    assert raw_private(load_private_key(priv, b"correct horse")) == raw_private(key)


def test_passphrase_for_an_unencrypted_key_is_refused(tmp_path):
    priv, _ = write_key_pair(generate_key(), tmp_path, "build")
    with pytest.raises(KeyFileError, match="not encrypted"):
        load_private_key(priv, b"unneeded")


def _private_file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("content", [
    b"", b"hello\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    random.Random(3).randbytes(64),
], ids=["empty", "text", "bad-pem", "binary"])
def test_not_a_key_is_refused(tmp_path, content):
    path = _private_file(tmp_path, "junk.key", content)
    with pytest.raises(KeyFileError) as excinfo:
        load_private_key(path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(KeyFileError) as excinfo:
        load_public_key(path)
    assert str(path) in str(excinfo.value)


def test_non_ed25519_keys_are_refused(tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    priv = _private_file(tmp_path, "ec.key", ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pub = tmp_path / "ec.pub"
    pub.write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519 key") as excinfo:
        load_private_key(priv)
    assert str(priv) in str(excinfo.value)
    with pytest.raises(KeyFileError, match="not an Ed25519 key") as excinfo:
        load_public_key(pub)
    assert str(pub) in str(excinfo.value)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        TrustStore.from_files([f"approver={pub}"])


def test_missing_key_files_are_refused(tmp_path):
    for loader in (load_private_key, load_public_key):
        with pytest.raises(KeyFileError) as excinfo:
            loader(tmp_path / "absent.key")
        assert str(tmp_path / "absent.key") in str(excinfo.value)


def test_a_private_key_is_not_a_public_key(tmp_path):
    priv, _ = write_key_pair(generate_key(), tmp_path, "build")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(priv)


# --------------------------------------------------------------------------- key ids


def test_key_id_is_sha256_of_the_raw_public_key():
    key = generate_key()
    assert key_id(key.public_key()) == hashlib.sha256(raw_public(key)).hexdigest()
    assert len(raw_public(key)) == 32


def test_key_ids_differ_between_keys_and_are_stable():
    a, b = generate_key(), generate_key()
    assert key_id(a.public_key()) != key_id(b.public_key())
    assert key_id(a.public_key()) == key_id(a.public_key())


# --------------------------------------------------------------------------- trust store


def test_trust_store_from_files_with_roles(tmp_path):
    build, approver = generate_key(), generate_key()
    _, build_pub = write_key_pair(build, tmp_path, "ci")
    _, approver_pub = write_key_pair(approver, tmp_path, "alice")
    store = TrustStore.from_files([str(build_pub), f"approver={approver_pub}"])
    assert len(store) == 2
    b = store.get(key_id(build.public_key()))
    a = store.get(key_id(approver.public_key()))
    assert b is not None and a is not None
    assert (b.role, b.name) == ("signer", "ci")
    assert (a.role, a.name) == ("approver", "alice")
    assert {k.keyid for k in store} == {b.keyid, a.keyid}
    assert store.get("0" * 64) is None


def test_trust_store_from_files_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    with pytest.raises(KeyFileError, match=r"bad\.pub"):
        TrustStore.from_files([f"build={bad}"])


def test_trust_from_mapping():
    k1, k2 = generate_key(), generate_key()
    store = trust_from_mapping({"one": k1.public_key(), "two": k2.public_key()}, role="build")
    assert sorted((k.name, k.role) for k in store) == [("one", "build"), ("two", "build")]
    assert store.get(key_id(k1.public_key())).name == "one"


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize("threshold", [0, -1], ids=["zero", "negative"])
def test_policy_threshold_must_be_at_least_one(threshold):
    with pytest.raises(ValueError, match="at least 1"):
        Policy(threshold=threshold)


def test_policy_defaults():
    assert Policy() == Policy(1, frozenset())
    assert Policy(3).threshold == 3


# --------------------------------------------------------------------------- PAE and envelope


def test_pae_follows_dsse():
    assert pae("t", b"abc") == b"DSSEv1 1 t 3 abc"
    assert pae("", b"") == b"DSSEv1 0  0 "
    # lengths are in bytes, not characters
    assert pae("é", b"\x00") == b"DSSEv1 2 \xc3\xa9 1 \x00"


def test_signing_is_deterministic_and_replaces_the_same_key():
    key, other = generate_key(), generate_key()
    once = Envelope().signed(key, b"payload")
    assert once == Envelope().signed(key, b"payload")
    assert once.signed(key, b"payload") == once
    both = once.signed(other, b"payload")
    assert [s.keyid for s in both.signatures] == sorted([key_id(key.public_key()),
                                                         key_id(other.public_key())])
    resigned = both.signed(key, b"other payload")
    assert len(resigned.signatures) == 2
    assert resigned.signatures != both.signatures


def test_envelope_wire_form():
    key = generate_key()
    env = Envelope().signed(key, b"m")
    doc = json.loads(env.to_bytes())
    assert doc == {
        "schema": 1,
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": key_id(key.public_key()),
                        "sig": base64.b64encode(env.signatures[0].sig).decode()}],
    }
    assert env.to_bytes() == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


signatures = st.builds(
    Signature,
    keyid=st.text(max_size=64),
    sig=st.binary(max_size=96),  # base64 of 96 bytes is the 128-character bound
)
envelopes = st.builds(
    Envelope,
    payload_type=st.text(max_size=256),
    signatures=st.lists(signatures, max_size=MAX_SIGNATURES).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(envelopes)
def test_envelope_round_trip(env):
    data = env.to_bytes()
    assert Envelope.from_bytes(data) == env
    assert Envelope.from_dict(env.to_dict()) == env
    assert Envelope.from_bytes(data).to_bytes() == data


_DELETE = object()


def _sig_doc(**changes) -> bytes:
    key = generate_key()
    doc = Envelope().signed(key, b"m").to_dict()
    for path, value in changes.items():
        target = doc
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("data", "field"), [
    pytest.param(_sig_doc(signatures__0__sig="not base64!"), "signatures[0].sig",
                 id="bad-base64"),
    pytest.param(_sig_doc(signatures__0__sig="QUJ"), "signatures[0].sig",
                 id="bad-base64-padding"),
    pytest.param(_sig_doc(signatures__0__sig=12), "signatures[0].sig", id="sig-not-string"),
    pytest.param(_sig_doc(signatures__0__sig="A" * 132), "signatures[0].sig",
                 id="sig-too-long"),
    pytest.param(_sig_doc(signatures__0__keyid="a" * 65), "signatures[0].keyid",
                 id="keyid-too-long"),
    pytest.param(_sig_doc(signatures__0__keyid=_DELETE), "signatures[0].keyid",
                 id="keyid-missing"),
    pytest.param(_sig_doc(signatures__0__extra=1), "signatures[0]: unknown field(s) 'extra'",
                 id="unknown-field-in-signature"),
    pytest.param(_sig_doc(extra=1), "signatures.json: unknown field(s) 'extra'",
                 id="unknown-top-field"),
    pytest.param(_sig_doc(schema=2), "signatures.json.schema", id="schema-2"),
    pytest.param(_sig_doc(schema=True), "signatures.json.schema", id="schema-bool"),
    pytest.param(_sig_doc(payloadType=_DELETE), "signatures.json.payloadType",
                 id="payload-type-missing"),
    pytest.param(_sig_doc(signatures={}), "signatures.json.signatures",
                 id="signatures-not-a-list"),
    pytest.param(_sig_doc(signatures=[{"keyid": "a", "sig": ""}] * (MAX_SIGNATURES + 1)),
                 "signatures.json.signatures", id="too-many-signatures"),
    pytest.param(_sig_doc(signatures=["x"]), "signatures[0]", id="signature-not-object"),
    pytest.param(b"[]", "signatures.json", id="not-an-object"),
    pytest.param(b"{", "not valid JSON", id="not-json"),
    pytest.param(b'{"schema": NaN}', "not valid JSON", id="nan"),
    pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    pytest.param(b" " * (64 * 1024 + 1), "exceeds the limit", id="too-large"),
])
def test_envelope_parse_errors(data, field):
    with pytest.raises(BundleFormatError) as excinfo:
        Envelope.from_bytes(data)
    assert type(excinfo.value) is BundleFormatError
    assert excinfo.value.member == "signatures.json"
    assert field in str(excinfo.value)


def test_sixteen_signatures_are_accepted():
    env = Envelope(signatures=tuple(Signature(f"{i:064x}", b"s") for i in range(MAX_SIGNATURES)))
    assert Envelope.from_bytes(env.to_bytes()) == env


# --------------------------------------------------------------------------- verify_envelope


@pytest.fixture
def keys():
    return {"build": generate_key(), "approver": generate_key(), "stranger": generate_key()}


@pytest.fixture
def store(keys) -> TrustStore:
    return TrustStore([
        *trust_from_mapping({"ci": keys["build"].public_key()}, role="build"),
        *trust_from_mapping({"alice": keys["approver"].public_key()}, role="approver"),
    ])


def test_verify_envelope_returns_signers_in_key_id_order(keys, store):
    env = Envelope().signed(keys["approver"], b"m").signed(keys["build"], b"m")
    signers = verify_envelope(env, b"m", store, Policy(2, frozenset({"build", "approver"})))
    assert [s.keyid for s in signers] == sorted(
        key_id(keys[r].public_key()) for r in ("build", "approver"))


@pytest.mark.parametrize(("signed_by", "payload", "policy", "error"), [
    pytest.param((), b"m", Policy(), ThresholdError, id="unsigned"),
    pytest.param(("stranger",), b"m", Policy(), UntrustedSignerError, id="untrusted"),
    pytest.param(("build",), b"other", Policy(), BadSignatureError, id="other-payload"),
    pytest.param(("build",), b"m", Policy(2), ThresholdError, id="threshold"),
    pytest.param(("build", "stranger"), b"m", Policy(2), ThresholdError,
                 id="threshold-counts-only-trusted"),
    pytest.param(("build",), b"m", Policy(1, frozenset({"approver"})), ThresholdError,
                 id="role-missing"),
    pytest.param(("build", "approver"), b"m", Policy(3), ThresholdError, id="threshold-3"),
])
def test_verify_envelope_refusals(keys, store, signed_by, payload, policy, error):
    env = Envelope()
    for name in signed_by:
        env = env.signed(keys[name], b"m")
    with pytest.raises(error) as excinfo:
        verify_envelope(env, payload, store, policy)
    assert type(excinfo.value) is error
    assert excinfo.value.member == "signatures.json"


def test_verify_envelope_refuses_an_unknown_payload_type(keys, store):
    env = Envelope(payload_type="text/plain").signed(keys["build"], b"m")
    with pytest.raises(BundleFormatError, match="payloadType"):
        verify_envelope(env, b"m", store, Policy())


def test_signature_by_a_different_key_under_a_trusted_key_id_is_bad(keys, store):
    forged = Envelope().signed(keys["stranger"], b"m").signatures[0]
    impostor = Signature(key_id(keys["build"].public_key()), forged.sig)
    with pytest.raises(BadSignatureError):
        verify_envelope(Envelope(signatures=(impostor,)), b"m", store, Policy())
