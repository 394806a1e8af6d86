"""Ed25519 keys, the DSSE-style signature envelope and the trust policy.

The envelope follows DSSE (in-toto's Dead Simple Signing Envelope) with a detached
payload: ``signatures.json`` holds ``payloadType`` and the signatures, and the payload
is the bundle's ``manifest.json`` bytes, which must be canonical JSON. Each signature
covers ``PAE(payloadType, manifest bytes)``, never a re-serialisation, so the bytes that
were verified are the bytes that get parsed. A key id is the sha256 (hex) of the raw
32-byte public key.

A :class:`TrustStore` maps key ids to keys and roles (``signer``, ``build``,
``approver``, ...); a :class:`Policy` asks for a number of distinct trusted signatures
and, optionally, roles that must be among them (a production group may ask for a build
key and an approver key).

This module does not read bundles (see :mod:`edgefleet.contract.bundle`) and never logs keys.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.contract.approval import MAX_APPROVALS, SignedApproval, check_approvals
from edgefleet.contract.errors import (
    BadSignatureError,
    BundleFormatError,
    KeyFileError,
    SchemaError,
    ThresholdError,
    UntrustedSignerError,
)
from edgefleet.contract.wire import Fields, canonical_json, parse_json, sha256_hex
from edgefleet.parsing import split_pair

__all__ = [
    "PAYLOAD_TYPE",
    "Envelope",
    "Policy",
    "Signature",
    "TrustStore",
    "TrustedKey",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pae",
    "trust_from_mapping",
    "verify_envelope",
    "write_key_pair",
]

PAYLOAD_TYPE = "application/vnd.edgefleet.manifest+json; version=1"
ENVELOPE_SCHEMA = 1
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_SIGNATURES = 16


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what a signature actually covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)


# --------------------------------------------------------------------------- keys


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_key_pair(
    private_key: Ed25519PrivateKey, directory: Path, name: str, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` into ``directory``.

    The private key file is created with mode 0600 from the start (never world-readable,
    not even for an instant) and an existing file is never overwritten.

    Raises:
        KeyFileError: a file of that name exists already.
    """
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (priv_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path}: exists already; refusing to overwrite a key")
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(priv_path, 0o600)  # the umask could only have narrowed it; make it exact
    pub_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key; refuse one that group or others can read.

    Raises:
        KeyFileError: unreadable, too open, encrypted without passphrase, not Ed25519.
    """
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read private key ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: private key is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        raise KeyFileError(
            f"{path}: the key is encrypted; give its passphrase"
            if passphrase is None
            else f"{path}: a passphrase was given but the key is not encrypted"
        ) from exc
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM private key, or wrong passphrase") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from PEM.

    Raises:
        KeyFileError: unreadable or not an Ed25519 public key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key ({exc.strerror})") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


# --------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    public_key: Ed25519PublicKey = field(repr=False, compare=False)
    role: str = "signer"
    name: str = ""


class TrustStore:
    """The keys whose signatures count, by key id."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for key in keys:
            self._keys[key.keyid] = key

    @classmethod
    def from_files(cls, specs: Iterable[str | Path]) -> TrustStore:
        """Build from public key files; ``ROLE=PATH`` assigns a role (default ``signer``).

        Raises:
            KeyFileError: a file cannot be loaded.
        """
        keys = []
        for spec in specs:
            text = str(spec)
            role, path = split_pair(text, "--trust", default_key="signer")
            pub = load_public_key(Path(path))
            keys.append(TrustedKey(key_id(pub), pub, role=role, name=Path(path).stem))
        return cls(keys)

    def get(self, keyid: str) -> TrustedKey | None:
        return self._keys.get(keyid)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys.values())


@dataclass(frozen=True)
class Policy:
    """How many distinct trusted signatures a bundle needs, and which roles."""

    threshold: int = 1
    required_roles: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError("a signature threshold must be at least 1")


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes = field(repr=False)


@dataclass(frozen=True)
class Envelope:
    """``signatures.json``: a DSSE envelope whose payload is ``manifest.json``."""

    payload_type: str = PAYLOAD_TYPE
    signatures: tuple[Signature, ...] = ()
    # signed approval statements (edgefleet.contract.approval), beside the signatures
    approvals: tuple[SignedApproval, ...] = ()

    def to_dict(self) -> dict:
        doc = {
            "schema": ENVELOPE_SCHEMA,
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                for s in self.signatures
            ],
        }
        if self.approvals:  # only when present: unapproved envelopes keep their bytes
            doc["approvals"] = [a.to_dict() for a in self.approvals]
        return doc

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: object) -> Envelope:
        f = Fields(obj, "signatures.json")
        if f.int("schema") != ENVELOPE_SCHEMA:
            raise f.bad("schema", f"unsupported envelope schema (expected {ENVELOPE_SCHEMA})")
        payload_type = f.str("payloadType")
        sigs = []
        for i, item in enumerate(f.list("signatures", max_len=MAX_SIGNATURES)):
            s = Fields(item, f"signatures.json.signatures[{i}]")
            keyid = s.str("keyid", max_len=64)
            try:
                raw = base64.b64decode(s.str("sig", max_len=128), validate=True)
            except binascii.Error as exc:
                raise s.bad("sig", "not base64") from exc
            s.done()
            sigs.append(Signature(keyid, raw))
        approvals = tuple(
            SignedApproval.from_dict(a, f"signatures.json.approvals[{i}]")
            for i, a in enumerate(f.list("approvals", [], max_len=MAX_APPROVALS)))
        f.done()
        return cls(payload_type, tuple(sigs), approvals)

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse ``signatures.json``.

        Raises:
            BundleFormatError: too large, not JSON or not an envelope.
        """
        try:
            return cls.from_dict(parse_json(data, what="signatures.json",
                                            max_bytes=MAX_ENVELOPE_BYTES))
        except SchemaError as exc:
            raise BundleFormatError(str(exc), member="signatures.json") from exc

    def signed(self, private_key: Ed25519PrivateKey, payload: bytes) -> Envelope:
        """Return a copy with a signature by ``private_key`` added (or replaced).

        Ed25519 is deterministic, so signing twice gives identical bytes.
        """
        kid = key_id(private_key.public_key())
        sig = Signature(kid, private_key.sign(pae(self.payload_type, payload)))
        others = [s for s in self.signatures if s.keyid != kid]
        return Envelope(self.payload_type, tuple(sorted([*others, sig], key=lambda s: s.keyid)),
                        self.approvals)

    def approved(self, approval: SignedApproval) -> Envelope:
        """Return a copy with ``approval`` added after the earlier ones (a key may approve
        again, say with a new review date: the history is kept).

        Raises:
            SchemaError: the envelope holds the maximum number of approvals already.
        """
        if len(self.approvals) >= MAX_APPROVALS:
            raise SchemaError(f"signatures.json: already {MAX_APPROVALS} approvals",
                              field="approvals")
        return Envelope(self.payload_type, self.signatures, (*self.approvals, approval))


def verify_envelope(
    envelope: Envelope, payload: bytes, trust: TrustStore, policy: Policy
) -> tuple[TrustedKey, ...]:
    """Check the envelope's signatures over ``payload`` against trust and policy.

    A signature by an unknown key is ignored (it may be a key this verifier does not
    trust, such as a developer's); a signature that claims a trusted key id and does not
    verify is a hard failure, because it means the payload or signature was altered.

    The steps run in this order on purpose, and the order is the security argument:
    parse, match keys and verify, count signers, then approvals, then roles.

    Returns:
        The trusted keys whose signatures verified, in key id order.

    Raises:
        BundleFormatError: unexpected payload type.
        BadSignatureError: a trusted key's signature or approval does not verify.
        UntrustedSignerError: no signature by a trusted key.
        ThresholdError: fewer valid trusted signatures or roles than the policy asks.
    """
    _check_payload_type(envelope)
    valid = _trusted_signers(envelope, payload, trust)
    _check_threshold(envelope, valid, policy)
    # an altered approval by a trusted key is as bad as an altered signature
    check_approvals(envelope.approvals, payload, trust)
    _check_roles(valid, policy)
    return tuple(valid[k] for k in sorted(valid))


def _check_payload_type(envelope: Envelope) -> None:
    if envelope.payload_type != PAYLOAD_TYPE:
        raise BundleFormatError(
            f"signatures.json: payloadType {envelope.payload_type!r} is not {PAYLOAD_TYPE!r}",
            member="signatures.json",
        )


def _trusted_signers(envelope: Envelope, payload: bytes, trust: TrustStore
                     ) -> dict[str, TrustedKey]:
    """The trusted keys whose signatures verify, by key id; unknown keys are skipped, a
    trusted key whose signature fails is an alteration."""
    message = pae(envelope.payload_type, payload)
    valid: dict[str, TrustedKey] = {}
    for sig in envelope.signatures:
        trusted = trust.get(sig.keyid)
        if trusted is None:
            continue
        try:
            trusted.public_key.verify(sig.sig, message)
        except InvalidSignature as exc:
            raise BadSignatureError(
                f"manifest.json: signature by key {sig.keyid[:16]}… "
                f"({trusted.name or trusted.role}) does not verify: the manifest or the "
                "signature was altered",
                member="signatures.json",
            ) from exc
        valid[sig.keyid] = trusted
    return valid


def _check_threshold(envelope: Envelope, valid: dict[str, TrustedKey], policy: Policy) -> None:
    if not valid:
        if not envelope.signatures:
            raise ThresholdError("signatures.json: the bundle is not signed",
                                 member="signatures.json")
        ids = ", ".join(s.keyid[:16] + "…" for s in envelope.signatures)
        raise UntrustedSignerError(
            f"signatures.json: no signature by a trusted key (signed by {ids})",
            member="signatures.json",
        )
    if len(valid) < policy.threshold:
        raise ThresholdError(
            f"signatures.json: {len(valid)} trusted signature(s), the policy asks for "
            f"{policy.threshold}",
            member="signatures.json",
        )


def _check_roles(valid: dict[str, TrustedKey], policy: Policy) -> None:
    roles = {k.role for k in valid.values()}
    missing = sorted(policy.required_roles - roles)
    if missing:
        raise ThresholdError(
            f"signatures.json: no valid signature with role(s) {', '.join(missing)}",
            member="signatures.json",
        )


def trust_from_mapping(entries: Mapping[str, Ed25519PublicKey],
                       role: str = "signer") -> TrustStore:
    """A trust store from named public keys (tests, servers holding keys in memory)."""
    return TrustStore(TrustedKey(key_id(k), k, role=role, name=n) for n, k in entries.items())
