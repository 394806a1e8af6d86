"""Bundle verification: a table of tampered bundles, each refused with its own class.

Malicious bundles are written byte by byte here (tar headers from ``TarInfo.tobuf``,
bodies, padding, gzip), never through ``pack_bundle``, which refuses to write most of
them. ``test_crafted_untampered_bundle_verifies`` checks that the crafting itself yields
a valid bundle, so every refusal below is caused by its tamper and nothing else.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from edgefleet.contract import errors
from edgefleet.contract.bundle import (
    Limits,
    UnverifiedBundle,
    VerifiedBundle,
    pack_bundle,
    read_bundle_file,
    read_unverified,
    read_unverified_file,
    sign_bundle,
    unpack_verified,
    verify_bundle,
    verify_bundle_file,
)
from edgefleet.contract.errors import (
    BadSignatureError,
    BundleError,
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    DuplicateMemberError,
    ExtendedHeaderError,
    ExtraMemberError,
    LinkMemberError,
    ManifestError,
    MissingMemberError,
    SignatureError,
    SizeLimitError,
    SizeMismatchError,
    SpecialMemberError,
    ThresholdError,
    TrailingDataError,
    UnsafeMemberError,
    UntrustedSignerError,
)
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.signing import Envelope, Policy, Signature, TrustStore, key_id
from tests.hostile import HOSTILE, Hostile

from .conftest import BUNDLE_MTIME

MiB = 1024 * 1024
SIGS = "signatures.json"
MAN = "manifest.json"
MODEL = "model.onnx"
REF = "reference.json"

# --------------------------------------------------------------------------- crafting


def tar_header(name: str, size: int, *, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime, info.mode = size, kind, BUNDLE_MTIME, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    # GNU format: base-256 sizes beyond 8 GiB and long names, like real-world tars
    return info.tobuf(format=tarfile.GNU_FORMAT)


def tar_member(name: str, body: bytes, *, size: int | None = None, **attrs: Any) -> bytes:
    """One header, the body and its padding; ``size`` may lie about the body."""
    declared = len(body) if size is None else size
    return tar_header(name, declared, **attrs) + body + b"\0" * (-len(body) % 512)


END_OF_ARCHIVE = b"\0" * 1024


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def flip(data: bytes, index: int | None = None) -> bytes:
    """``data`` with one bit flipped (in the middle unless ``index`` is given)."""
    out = bytearray(data)
    out[len(data) // 2 if index is None else index] ^= 0x01
    return bytes(out)


def zeros_gzip(prefix: bytes, zeros: int, suffix: bytes) -> bytes:
    """gzip of prefix + zeros + suffix, streamed so the zeros never sit in memory."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [co.compress(prefix)]
    chunk = b"\0" * MiB
    for _ in range(zeros // MiB):
        out.append(co.compress(chunk))
    out.append(co.compress(b"\0" * (zeros % MiB) + suffix))
    out.append(co.flush())
    return b"".join(out)


@dataclass
class Kit:
    """The members of the valid bundle, the keys, and ways to re-tar them."""

    manifest: Manifest
    members: dict[str, bytes]  # in bundle order: manifest, signatures, files
    build_key: Any
    approver_key: Any
    stranger_key: Any
    valid: bytes = field(repr=False, default=b"")

    def tar(self, members: dict[str, bytes] | None = None, extra: bytes = b"") -> bytes:
        """Raw (uncompressed) tar of ``members`` (default: the valid ones), then ``extra``."""
        members = self.members if members is None else members
        return b"".join(tar_member(n, b) for n, b in members.items()) + extra + END_OF_ARCHIVE

    def bundle(self, members: dict[str, bytes] | None = None, extra: bytes = b"") -> bytes:
        return gz(self.tar(members, extra))

    def replaced(self, name: str, body: bytes) -> bytes:
        return self.bundle({**self.members, name: body})

    def without(self, name: str) -> bytes:
        return self.bundle({k: v for k, v in self.members.items() if k != name})

    def plus(self, *raw_members: bytes) -> bytes:
        return self.bundle(extra=b"".join(raw_members))

    def with_raw_member(self, name: str, raw: bytes) -> bytes:
        """``name``'s header and body replaced by ``raw``, in place."""
        parts = [raw if n == name else tar_member(n, b) for n, b in self.members.items()]
        return gz(b"".join(parts) + END_OF_ARCHIVE)

    def envelope(self, *keys: Any, payload: bytes | None = None) -> Envelope:
        payload = self.members["manifest.json"] if payload is None else payload
        env = Envelope()
        for key in keys:
            env = env.signed(key, payload)
        return env

    def with_envelope(self, envelope: Envelope) -> bytes:
        return self.replaced("signatures.json", envelope.to_bytes())

    def with_manifest(self, manifest_bytes: bytes, *signers: Any) -> bytes:
        """A new manifest.json, signed (correctly) by ``signers``."""
        env = self.envelope(*signers, payload=manifest_bytes)
        return self.bundle({**self.members, "manifest.json": manifest_bytes,
                            "signatures.json": env.to_bytes()})


@pytest.fixture
def kit(manifest, bundle_bytes, build_key, approver_key, stranger_key) -> Kit:
    with tarfile.open(fileobj=io.BytesIO(bundle_bytes), mode="r:gz") as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar}  # type: ignore[union-attr]
    assert list(members) == ["manifest.json", "signatures.json", "model.onnx", "reference.json"]
    return Kit(manifest, members, build_key, approver_key, stranger_key, bundle_bytes)


# --------------------------------------------------------------------------- builders
# Each takes the kit and returns the bytes of a bundle to refuse.


def signatures_flipped_in_keyid(k: Kit) -> bytes:
    doc = json.loads(k.members["signatures.json"])
    kid = doc["signatures"][0]["keyid"]
    doc["signatures"][0]["keyid"] = ("1" if kid[0] != "1" else "2") + kid[1:]
    return k.replaced("signatures.json", json.dumps(doc).encode())


def signatures_flipped_in_sig(k: Kit) -> bytes:
    raw = k.members["signatures.json"]
    at = raw.index(b'"sig":"') + len(b'"sig":"')  # first base64 character: 6 real bits
    out = bytearray(raw)
    out[at] = ord("A") if out[at] != ord("A") else ord("B")
    return bytes(out)


def edited_manifest(k: Kit) -> bytes:
    """Re-serialised canonically with another version; the old signature kept."""
    return k.replaced("manifest.json", replace(k.manifest, version="9.9.9").to_bytes())


def non_canonical_manifest(k: Kit) -> bytes:
    text = json.dumps(k.manifest.to_dict(), indent=2, sort_keys=True).encode()
    return k.with_manifest(text, k.build_key)


def schema_breaking_manifest(k: Kit) -> bytes:
    doc = k.manifest.to_dict()
    doc["version"] = "latest"
    return k.with_manifest(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
                           k.build_key)


def corrupt_signature(k: Kit) -> bytes:
    (sig,) = k.envelope(k.build_key).signatures
    bad = Signature(sig.keyid, bytes([sig.sig[0] ^ 0x01]) + sig.sig[1:])
    return k.with_envelope(Envelope(signatures=(bad,)))


def signature_over_other_payload(k: Kit) -> bytes:
    other = replace(k.manifest, version="9.9.9").to_bytes()
    return k.with_envelope(k.envelope(k.build_key, payload=other))


def duplicated_signature(k: Kit) -> bytes:
    (sig,) = k.envelope(k.build_key).signatures
    return k.with_envelope(Envelope(signatures=(sig, sig)))


def wrong_payload_type(k: Kit) -> bytes:
    env = Envelope(payload_type="application/json").signed(k.build_key,
                                                           k.members["manifest.json"])
    return k.with_envelope(env)


def duplicate_manifest(k: Kit) -> bytes:
    """A second manifest.json after the signed one (a last-wins extractor's trap)."""
    evil = replace(k.manifest, version="9.9.9").to_bytes()
    return k.plus(tar_member("manifest.json", evil))


def too_many_members(k: Kit) -> bytes:
    return k.plus(*(tar_member(f"extra{i:02d}", b"x") for i in range(15)))


def header_declares_huge_size(k: Kit) -> bytes:
    body = k.members["model.onnx"]
    return k.with_raw_member("model.onnx", tar_member("model.onnx", body, size=1 << 40))


def header_declares_more_than_present(k: Kit) -> bytes:
    """The last member claims 64 KiB; the archive ends long before."""
    body = k.members["reference.json"]
    return k.with_raw_member("reference.json", tar_member("reference.json", body, size=65536))


def header_declares_less_than_present(k: Kit) -> bytes:
    """The rest of the body is then read as a (garbage) header: the archive ends there."""
    body = k.members["reference.json"]
    return k.with_raw_member("reference.json", tar_member("reference.json", body, size=10))


def pax_path_override(k: Kit) -> bytes:
    """A pax header renames the next member to ``../model.onnx``."""
    info = tarfile.TarInfo("model.onnx")
    info.size, info.mtime = len(k.members["model.onnx"]), BUNDLE_MTIME
    info.pax_headers = {"path": "../model.onnx"}
    raw = info.tobuf(format=tarfile.PAX_FORMAT) + k.members["model.onnx"]
    return k.with_raw_member("model.onnx", raw)


def gzip_bomb_honest_header(k: Kit) -> bytes:
    """The signed members, then a model.onnx of 32 MiB of zeros (~32 KiB compressed)
    whose header tells the truth: the limit must hold before anything is inflated."""
    prefix = b"".join(tar_member(n, k.members[n]) for n in (MAN, SIGS))
    return zeros_gzip(prefix + tar_header(MODEL, 32 * MiB), 32 * MiB, END_OF_ARCHIVE)


def pax_header_bomb(_k: Kit) -> bytes:
    """A pax extended header of 16 MiB: tarfile reads it whole before yielding a member,
    so only the bound on the decompressed stream can stop it (no TarInfo to check)."""
    header = tar_header("././@PaxHeader", 16 * MiB, kind=tarfile.XHDTYPE)
    return zeros_gzip(header, 16 * MiB, END_OF_ARCHIVE)


def gnu_longname_bomb(_k: Kit) -> bytes:
    header = tar_header("././@LongLink", 16 * MiB, kind=tarfile.GNUTYPE_LONGNAME)
    return zeros_gzip(header, 16 * MiB, END_OF_ARCHIVE)


def random_bytes(_k: Kit) -> bytes:
    data = random.Random(7).randbytes(4096)
    assert data[:2] != b"\x1f\x8b"
    return data


def gzip_crc_flipped(k: Kit) -> bytes:
    return flip(k.valid, len(k.valid) - 6)  # inside the CRC32 of the gzip trailer


def gzip_isize_flipped(k: Kit) -> bytes:
    return flip(k.valid, len(k.valid) - 2)  # inside ISIZE, the length mod 2**32


def truncate(at: Callable[[int], int]) -> Callable[[Kit], bytes]:
    return lambda k: k.valid[: at(len(k.valid))]


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Kit], bytes]
    error: type[BundleError]
    member: str | None  # the exception's .member
    names: str | None = None  # what the message must name (default: member)
    policy: Policy = Policy()
    limits: Limits = Limits()
    verify: dict[str, Any] = field(default_factory=dict)

    @property
    def param(self):
        return pytest.param(self, id=self.id)


BOMB_LIMITS = Limits(max_member_bytes=64 * MiB, max_total_bytes=8 * MiB)
HEADER_BOMB_LIMITS = Limits(max_member_bytes=MiB, max_total_bytes=MiB)

CASES = [
    # one flipped bit per member
    Case("flip-model", lambda k: k.replaced(MODEL, flip(k.members[MODEL])),
         DigestMismatchError, MODEL),
    Case("flip-reference", lambda k: k.replaced(REF, flip(k.members[REF])),
         DigestMismatchError, REF),
    Case("flip-manifest", lambda k: k.replaced(MAN, flip(k.members[MAN])),
         BadSignatureError, SIGS, names=MAN),
    Case("flip-signatures-structure", lambda k: k.replaced(SIGS, b"z" + k.members[SIGS][1:]),
         BundleFormatError, SIGS),
    Case("flip-signatures-sig", lambda k: k.replaced(SIGS, signatures_flipped_in_sig(k)),
         BadSignatureError, SIGS, names=MAN),
    Case("flip-signatures-keyid", signatures_flipped_in_keyid, UntrustedSignerError, SIGS),
    # the manifest
    Case("edited-manifest-old-signature", edited_manifest, BadSignatureError, SIGS, names=MAN),
    Case("non-canonical-manifest-signed", non_canonical_manifest, ManifestError, MAN),
    Case("schema-breaking-manifest-signed", schema_breaking_manifest, ManifestError, MAN,
         names="manifest.version"),
    # the member set
    Case("added-member", lambda k: k.plus(tar_member("extra.bin", b"x")),
         ExtraMemberError, "extra.bin"),
    Case("removed-reference", lambda k: k.without(REF), MissingMemberError, REF),
    Case("removed-model", lambda k: k.without(MODEL), MissingMemberError, MODEL),
    Case("removed-manifest", lambda k: k.without(MAN), MissingMemberError, MAN),
    Case("removed-signatures", lambda k: k.without(SIGS), MissingMemberError, SIGS),
    Case("member-longer", lambda k: k.replaced(MODEL, k.members[MODEL] + b"\0"),
         SizeMismatchError, MODEL),
    Case("member-shorter", lambda k: k.replaced(MODEL, k.members[MODEL][:-1]),
         SizeMismatchError, MODEL),
    Case("duplicate-model", lambda k: k.plus(tar_member(MODEL, k.members[MODEL])),
         DuplicateMemberError, MODEL),
    Case("duplicate-manifest", duplicate_manifest, DuplicateMemberError, MAN),
    # names
    Case("absolute-path", lambda k: k.with_raw_member(MODEL, tar_member("/model.onnx", b"x")),
         UnsafeMemberError, "/model.onnx"),
    Case("drive-letter-path", lambda k: k.plus(tar_member("C:model.onnx", b"x")),
         UnsafeMemberError, "C:model.onnx"),
    Case("dotdot-path", lambda k: k.plus(tar_member("../model.onnx", b"x")),
         UnsafeMemberError, "../model.onnx"),
    Case("dotdot-inside-path", lambda k: k.plus(tar_member("a/../../evil", b"x")),
         UnsafeMemberError, "a/../../evil"),
    Case("dotdot-backslash-path", lambda k: k.plus(tar_member("..\\evil", b"x")),
         UnsafeMemberError, "..\\evil"),
    Case("nested-path", lambda k: k.plus(tar_member("models/model.onnx", b"x")),
         UnsafeMemberError, "models/model.onnx"),
    Case("dot-slash-path", lambda k: k.plus(tar_member("./model.onnx", b"x")),
         UnsafeMemberError, "./model.onnx"),
    Case("upper-case-name", lambda k: k.plus(tar_member("Model.onnx", b"x")),
         UnsafeMemberError, "Model.onnx"),
    Case("newline-in-name", lambda k: k.plus(tar_member("evil.onnx\n", b"x")),
         UnsafeMemberError, "evil.onnx\n"),
    Case("pax-path-override", pax_path_override, ExtendedHeaderError, "././@PaxHeader",
         names="pax extended header"),
    # member types
    Case("symlink", lambda k: k.with_raw_member(
        MODEL, tar_member(MODEL, b"", kind=tarfile.SYMTYPE, linkname="/etc/passwd")),
        LinkMemberError, MODEL),
    Case("hardlink", lambda k: k.with_raw_member(
        MODEL, tar_member(MODEL, b"", kind=tarfile.LNKTYPE, linkname=REF)),
        LinkMemberError, MODEL),
    Case("char-device", lambda k: k.with_raw_member(
        MODEL, tar_member(MODEL, b"", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)),
        SpecialMemberError, MODEL),
    Case("block-device", lambda k: k.with_raw_member(
        MODEL, tar_member(MODEL, b"", kind=tarfile.BLKTYPE, devmajor=8, devminor=0)),
        SpecialMemberError, MODEL),
    Case("fifo", lambda k: k.with_raw_member(MODEL, tar_member(MODEL, b"", kind=tarfile.FIFOTYPE)),
         SpecialMemberError, MODEL),
    Case("directory", lambda k: k.with_raw_member(
        MODEL, tar_member(MODEL, b"", kind=tarfile.DIRTYPE)), SpecialMemberError, MODEL),
    # sizes and counts
    Case("oversized-member", lambda k: k.bundle(), SizeLimitError, MODEL,
         limits=Limits(max_member_bytes=4096)),
    Case("total-over-limit", lambda k: k.bundle(), SizeLimitError, MODEL,
         limits=Limits(max_total_bytes=9000)),
    Case("too-many-members", too_many_members, SizeLimitError, "extra12"),
    Case("too-many-members-small-limit", lambda k: k.bundle(), SizeLimitError, REF,
         limits=Limits(max_members=3)),
    Case("bundle-file-over-limit", lambda k: k.bundle(), SizeLimitError, None,
         names="limit", limits=Limits(max_bundle_bytes=1000)),
    Case("gzip-bomb-honest-header", gzip_bomb_honest_header, SizeLimitError, MODEL,
         limits=BOMB_LIMITS),
    Case("header-declares-huge-size", header_declares_huge_size, SizeLimitError, MODEL),
    # refused at the header, before a byte of the 16 MiB body is read
    Case("pax-header-bomb", pax_header_bomb, ExtendedHeaderError, "././@PaxHeader",
         names="pax extended header", limits=HEADER_BOMB_LIMITS),
    Case("gnu-longname-bomb", gnu_longname_bomb, ExtendedHeaderError, "././@LongLink",
         names="GNU long-name header", limits=HEADER_BOMB_LIMITS),
    Case("header-declares-more-than-present", header_declares_more_than_present,
         BundleFormatError, REF),
    # the rest of the body lands in the padding, which must be zeros
    Case("header-declares-less-than-present", header_declares_less_than_present,
         TrailingDataError, REF),
    # signatures and policy
    Case("untrusted-key", lambda k: k.with_envelope(k.envelope(k.stranger_key)),
         UntrustedSignerError, SIGS),
    Case("threshold-2-one-signature", lambda k: k.bundle(), ThresholdError, SIGS,
         policy=Policy(threshold=2)),
    Case("threshold-2-same-key-twice", duplicated_signature, ThresholdError, SIGS,
         policy=Policy(threshold=2)),
    Case("threshold-2-second-untrusted",
         lambda k: k.with_envelope(k.envelope(k.build_key, k.stranger_key)),
         ThresholdError, SIGS, policy=Policy(threshold=2)),
    Case("missing-required-role", lambda k: k.bundle(), ThresholdError, SIGS,
         names="approver", policy=Policy(required_roles=frozenset({"build", "approver"}))),
    Case("corrupt-signature", corrupt_signature, BadSignatureError, SIGS, names=MAN),
    Case("corrupt-trusted-beside-valid", lambda k: k.with_envelope(Envelope(signatures=(
        *k.envelope(k.approver_key).signatures,
        *corrupt_envelope(k, k.build_key).signatures))), BadSignatureError, SIGS, names=MAN),
    Case("signature-over-other-payload", signature_over_other_payload, BadSignatureError, SIGS,
         names=MAN),
    Case("no-signatures", lambda k: k.with_envelope(Envelope()), ThresholdError, SIGS),
    Case("wrong-payload-type", wrong_payload_type, BundleFormatError, SIGS),
    # downgrade
    Case("downgrade-major", lambda k: k.bundle(), DowngradeError, MAN, names="2.0.0",
         verify={"installed_version": "2.0.0"}),
    Case("downgrade-numeric-not-lexical", lambda k: k.bundle(), DowngradeError, MAN,
         names="1.10.0", verify={"installed_version": "1.10.0"}),
    Case("downgrade-release-to-prerelease", lambda k: k.with_manifest(
        replace(k.manifest, version="1.2.0-rc.1").to_bytes(), k.build_key),
        DowngradeError, MAN, names="1.2.0-rc.1", verify={"installed_version": "1.2.0"}),
    # not a bundle at all
    Case("empty-file", lambda k: b"", BundleFormatError, None, names="not gzip"),
    Case("random-bytes", random_bytes, BundleFormatError, None, names="not gzip"),
    Case("plain-tar", lambda k: k.tar(), BundleFormatError, None, names="not gzip"),
    Case("zip-file", lambda k: b"PK\x03\x04" + b"\0" * 100, BundleFormatError, None,
         names="not gzip"),
    Case("gzip-of-text", lambda k: gz(b"hello, world\n" * 100), BundleFormatError, None,
         names="not a valid tar"),
    Case("gzip-of-nothing", lambda k: gz(b""), BundleFormatError, None, names="empty"),
    Case("gzip-of-empty-tar", lambda k: gz(END_OF_ARCHIVE), MissingMemberError, MAN),
    Case("gzip-magic-only", lambda k: b"\x1f\x8b", BundleFormatError, None, names="truncated"),
    Case("gzip-crc-flipped", gzip_crc_flipped, BundleFormatError, None, names="CRC"),
    Case("gzip-isize-flipped", gzip_isize_flipped, BundleFormatError, None, names="length"),
    Case("trailing-garbage", lambda k: k.valid + b"garbage", TrailingDataError, None,
         names="after the end of the gzip stream"),
]
TRUNCATIONS = {
    "10-bytes": lambda n: 10,
    "quarter": lambda n: n // 4,
    "half": lambda n: n // 2,
    "three-quarters": lambda n: 3 * n // 4,
    "minus-100": lambda n: n - 100,
    "minus-10": lambda n: n - 10,
    "minus-8": lambda n: n - 8,  # exactly the gzip trailer
    "minus-1": lambda n: n - 1,
}
CASES += [Case(f"truncated-{label}", truncate(at), BundleFormatError, None,
               names="truncated") for label, at in TRUNCATIONS.items()]


def corrupt_envelope(k: Kit, key: Any) -> Envelope:
    (sig,) = k.envelope(key).signatures
    return Envelope(signatures=(Signature(sig.keyid, sig.sig[:-1] + bytes([sig.sig[-1] ^ 1])),))


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [c.param for c in CASES])
def test_tampered_bundle_is_refused(case: Case, kit: Kit, trust: TrustStore):
    data = case.build(kit)
    assert data != kit.valid
    with pytest.raises(case.error) as excinfo:
        verify_bundle(data, trust, case.policy, limits=case.limits, **case.verify)
    exc = excinfo.value
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, BundleError)
    assert exc.member == case.member, str(exc)
    names = case.names if case.names is not None else case.member
    assert names is not None
    assert names in str(exc)


# Refusals that come from the bytes alone (not from the signature policy or the
# installed version) must be refused by read_unverified, hence by sign_bundle, too.
_POLICY_ONLY = (SignatureError, DowngradeError)


@pytest.mark.parametrize("case", [c.param for c in CASES
                                  if not issubclass(c.error, _POLICY_ONLY)
                                  and c.id != "wrong-payload-type"])
def test_tampered_bundle_is_not_signed(case: Case, kit: Kit, approver_key):
    data = case.build(kit)
    with pytest.raises(case.error) as excinfo:
        sign_bundle(data, approver_key, case.limits)
    assert type(excinfo.value) is case.error


def test_every_bundle_refusal_is_a_bundle_error():
    refusals = [errors.BundleFormatError, errors.UnsafeMemberError, errors.LinkMemberError,
                errors.SpecialMemberError, errors.SizeLimitError, errors.DuplicateMemberError,
                errors.MissingMemberError, errors.ExtraMemberError, errors.DigestMismatchError,
                errors.SizeMismatchError, errors.ManifestError, errors.SignatureError,
                errors.BadSignatureError, errors.UntrustedSignerError, errors.ThresholdError,
                errors.DowngradeError]
    for cls in refusals + [c.error for c in CASES]:
        assert issubclass(cls, BundleError), cls
        assert issubclass(cls, errors.EdgefleetError), cls
        assert not issubclass(cls, ValueError), cls  # never a bare ValueError
    # and every class the table expects is a leaf used on purpose, not the base
    assert BundleError not in {c.error for c in CASES}
    assert {c.error for c in CASES} >= set(refusals) - {SignatureError}


# --------------------------------------------------------------------------- gzip level


def test_any_flipped_bit_in_the_file_is_refused_or_harmless(kit: Kit, trust):
    """Every bit flip anywhere in the file is refused with a BundleError, or leaves the
    content exactly as signed. Harmless flips exist: the gzip header's MTIME, XFL, OS
    and flag bits nothing reads, and the odd deflate bit that decodes to the same bytes
    (say, a code length of an unused symbol)."""
    data = kit.valid
    rng = random.Random(11)
    offsets = sorted({*range(0, 64), *rng.sample(range(64, len(data) - 64), 300),
                      *range(len(data) - 64, len(data))})
    refused = accepted_outside_header = 0
    for offset in offsets:
        for bit in range(8):
            bad = bytearray(data)
            bad[offset] ^= 1 << bit
            try:
                verified = verify_bundle(bytes(bad), trust)
            except BundleError:
                refused += 1
                continue
            assert verified.members == kit.members, (offset, bit)
            accepted_outside_header += offset >= 10
    assert accepted_outside_header <= 0.01 * refused
    assert refused >= 0.95 * 8 * (len(offsets) - 10)


# --------------------------------------------------------------------------- valid bundles


def test_crafted_untampered_bundle_verifies(kit: Kit, trust):
    """The crafting helpers alone do not make a bundle invalid."""
    crafted = kit.bundle()
    assert crafted != kit.valid  # other gzip settings, no record padding
    verified = verify_bundle(crafted, trust)
    assert verified.members == verify_bundle(kit.valid, trust).members


def test_valid_bundle_verifies(bundle_bytes, manifest, bundle_files, trust, build_key):
    verified = verify_bundle(bundle_bytes, trust)
    assert isinstance(verified, VerifiedBundle)
    assert verified.manifest == manifest
    assert verified.members["manifest.json"] == manifest.to_bytes()
    assert {k: verified.member(k) for k in bundle_files} == bundle_files
    assert set(verified.members) == {"manifest.json", "signatures.json", *bundle_files}
    assert verified.mtime == BUNDLE_MTIME
    assert verified.sha256 == hashlib.sha256(bundle_bytes).hexdigest()
    assert [s.keyid for s in verified.signers] == [key_id(build_key.public_key())]
    assert verified.signers[0].role == "build"


def test_verification_returns_every_trusted_signer(bundle_bytes, trust, build_key,
                                                   approver_key, stranger_key):
    data = sign_bundle(sign_bundle(bundle_bytes, approver_key), stranger_key)
    policy = Policy(threshold=2, required_roles=frozenset({"build", "approver"}))
    verified = verify_bundle(data, trust, policy)
    expected = sorted([key_id(build_key.public_key()), key_id(approver_key.public_key())])
    assert [s.keyid for s in verified.signers] == expected  # the stranger is ignored
    assert {s.role for s in verified.signers} == {"build", "approver"}
    assert len(verified.envelope.signatures) == 3


def test_signature_by_unknown_key_beside_a_trusted_one_is_ignored(kit: Kit, trust):
    env = Envelope(signatures=(*kit.envelope(kit.build_key).signatures,
                               *corrupt_envelope(kit, kit.stranger_key).signatures))
    verified = verify_bundle(kit.with_envelope(env), trust)
    assert [s.role for s in verified.signers] == ["build"]


@pytest.mark.parametrize("installed", ["1.2.0", "1.1.9", "1.2.0-rc.1", "0.9.0", "not-a-version"],
                         ids=["same", "older", "prerelease-of-same", "much-older", "unreadable"])
def test_upgrade_or_same_version_is_accepted(bundle_bytes, trust, installed):
    verified = verify_bundle(bundle_bytes, trust, installed_version=installed)
    assert verified.manifest.version == "1.2.0"


def test_downgrade_allowed_when_asked(bundle_bytes, trust):
    with pytest.raises(DowngradeError):
        verify_bundle(bundle_bytes, trust, installed_version="2.0.0")
    verified = verify_bundle(bundle_bytes, trust, installed_version="2.0.0",
                             allow_downgrade=True)
    assert verified.manifest.version == "1.2.0"


def test_limits_exactly_at_the_bundle_sizes_accept(kit: Kit, trust):
    sizes = [len(b) for b in kit.members.values()]
    exact = Limits(max_bundle_bytes=len(kit.valid), max_member_bytes=max(sizes),
                   max_total_bytes=sum(sizes), max_members=len(sizes))
    assert verify_bundle(kit.valid, trust, limits=exact).members == kit.members
    for tighter in (replace(exact, max_bundle_bytes=len(kit.valid) - 1),
                    replace(exact, max_member_bytes=max(sizes) - 1),
                    replace(exact, max_total_bytes=sum(sizes) - 1),
                    replace(exact, max_members=len(sizes) - 1)):
        with pytest.raises(SizeLimitError):
            verify_bundle(kit.valid, trust, limits=tighter)


# --------------------------------------------------------------------------- packing


def test_pack_is_reproducible(manifest, bundle_files, build_key):
    env = Envelope().signed(build_key, manifest.to_bytes())
    first = pack_bundle(manifest, env, bundle_files, BUNDLE_MTIME)
    reordered = dict(reversed(bundle_files.items()))
    again = pack_bundle(manifest, Envelope().signed(build_key, manifest.to_bytes()),
                        reordered, BUNDLE_MTIME)
    assert first == again
    later = pack_bundle(manifest, env, bundle_files, BUNDLE_MTIME + 1)
    assert later != first
    assert read_unverified(later).mtime == BUNDLE_MTIME + 1


def test_pack_writes_plain_deterministic_headers(bundle_bytes):
    assert bundle_bytes[:2] == b"\x1f\x8b"
    assert bundle_bytes[3] == 0  # no FNAME or other optional gzip fields
    assert bundle_bytes[4:8] == b"\0\0\0\0"  # gzip MTIME
    with tarfile.open(fileobj=io.BytesIO(bundle_bytes), mode="r:gz") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "signatures.json", "model.onnx",
                                       "reference.json"]
    for info in infos:
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
        assert (info.mode, info.mtime, info.type) == (0o644, BUNDLE_MTIME, tarfile.REGTYPE)


@pytest.mark.parametrize("files_change", ["extra", "missing", "altered"])
def test_pack_refuses_files_that_differ_from_the_manifest(manifest, bundle_files, build_key,
                                                          files_change):
    files = dict(bundle_files)
    if files_change == "extra":
        files["extra.bin"] = b"x"
    elif files_change == "missing":
        del files["reference.json"]
    else:
        files["model.onnx"] = flip(files["model.onnx"])
    with pytest.raises(ValueError, match="manifest"):
        pack_bundle(manifest, Envelope(), files, BUNDLE_MTIME)


# --------------------------------------------------------------------------- signing


def _members(data: bytes) -> dict[str, bytes]:
    return read_unverified(data).members


def test_sign_bundle_adds_a_signature_and_nothing_else(bundle_bytes, approver_key, build_key,
                                                       trust):
    signed = sign_bundle(bundle_bytes, approver_key)
    before, after = _members(bundle_bytes), _members(signed)
    assert list(after) == list(before)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"signatures.json"}
    keyids = [s.keyid for s in Envelope.from_bytes(after["signatures.json"]).signatures]
    assert keyids == sorted([key_id(build_key.public_key()), key_id(approver_key.public_key())])
    assert read_unverified(signed).mtime == read_unverified(bundle_bytes).mtime
    policy = Policy(threshold=2, required_roles=frozenset({"approver"}))
    assert len(verify_bundle(signed, trust, policy).signers) == 2


def test_sign_bundle_is_idempotent(bundle_bytes, approver_key, build_key):
    once = sign_bundle(bundle_bytes, approver_key)
    assert sign_bundle(once, approver_key) == once
    assert sign_bundle(bundle_bytes, build_key) == bundle_bytes  # already signed by it


def test_sign_bundle_renews_a_corrupt_signature_of_the_same_key(kit: Kit, trust):
    broken = kit.with_envelope(corrupt_envelope(kit, kit.build_key))
    with pytest.raises(BadSignatureError):
        verify_bundle(broken, trust)
    renewed = sign_bundle(broken, kit.build_key)
    assert verify_bundle(renewed, trust).signers[0].role == "build"


def test_sign_bundle_refuses_a_tampered_bundle(kit: Kit, approver_key):
    with pytest.raises(DigestMismatchError) as excinfo:
        sign_bundle(kit.replaced("model.onnx", flip(kit.members["model.onnx"])), approver_key)
    assert excinfo.value.member == "model.onnx"


def test_read_unverified_does_not_judge_signatures(kit: Kit):
    data = kit.with_envelope(kit.envelope(kit.stranger_key))
    bundle = read_unverified(data)
    assert type(bundle) is UnverifiedBundle
    assert bundle.manifest == kit.manifest
    with pytest.raises(UntrustedSignerError):
        verify_bundle(data, TrustStore())


# --------------------------------------------------------------------------- files


def test_read_bundle_file(tmp_path, bundle_bytes):
    path = tmp_path / "m.edgebundle"
    path.write_bytes(bundle_bytes)
    assert read_bundle_file(path) == bundle_bytes
    with pytest.raises(SizeLimitError) as excinfo:
        read_bundle_file(path, Limits(max_bundle_bytes=len(bundle_bytes) - 1))
    assert str(path) in str(excinfo.value)
    missing = tmp_path / "absent.edgebundle"
    with pytest.raises(BundleFormatError) as excinfo:
        read_bundle_file(missing)
    assert str(missing) in str(excinfo.value)


def test_signatures_member_is_canonical_base64(bundle_bytes):
    doc = json.loads(_members(bundle_bytes)["signatures.json"])
    (entry,) = doc["signatures"]
    assert len(base64.b64decode(entry["sig"], validate=True)) == 64


# --------------------------------------------------------------------------- hidden data


def test_hostile_ids_are_unique():
    assert len({h.id for h in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("case", [pytest.param(h, id=h.id) for h in HOSTILE])
def test_a_signed_bundle_with_something_hidden_is_refused(case: Hostile, kit: Kit, trust,
                                                          tmp_path):
    """Every case keeps the signed members intact, and tarfile reads each one happily
    (that is what makes the tail hidden); the verifier refuses it, from bytes and from a
    file, and leaves no member file behind."""
    data = case.build(kit.valid)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.getmembers()  # a lenient reader sees an archive
    with pytest.raises(case.error) as excinfo:
        verify_bundle(data, trust)
    assert type(excinfo.value) is case.error, f"{type(excinfo.value).__name__}: {excinfo.value}"
    assert case.names in str(excinfo.value)
    path, into = tmp_path / "hostile.edgebundle", tmp_path / "members"
    path.write_bytes(data)
    with pytest.raises(case.error):
        verify_bundle_file(path, into, trust)
    assert not into.exists()
    with pytest.raises(case.error):
        sign_bundle(data, kit.approver_key)


def test_a_bundle_verified_into_a_directory_refers_to_its_files(kit: Kit, trust, tmp_path):
    path, into = tmp_path / "b.edgebundle", tmp_path / "members"
    path.write_bytes(kit.valid)
    verified = verify_bundle_file(path, into, trust)
    in_memory = verify_bundle(kit.valid, trust)
    assert isinstance(verified, VerifiedBundle) and verified.directory == into
    assert sorted(p.name for p in into.iterdir()) == sorted(kit.members)
    assert oct(into.stat().st_mode & 0o777) == "0o700"
    for name, body in kit.members.items():
        assert verified.path(name).read_bytes() == body
        assert verified.member(name) == body
    assert verified.members == kit.members == in_memory.members
    assert (verified.manifest, verified.sha256, verified.mtime, verified.size) == \
        (in_memory.manifest, in_memory.sha256, in_memory.mtime, len(kit.valid))
    assert verified.signers == in_memory.signers
    with pytest.raises(KeyError):
        verified.path("evil.sh")
    with pytest.raises(ValueError):
        in_memory.path("model.onnx")
    # the in-memory convenience is bounded: a large member is read from its file instead
    small = Limits(max_document_bytes=len(kit.members[MAN]) + len(kit.members[SIGS]))
    bounded = verify_bundle_file(path, tmp_path / "bounded", trust, limits=small)
    with pytest.raises(SizeLimitError) as excinfo:
        bounded.member(MODEL)
    assert excinfo.value.member == MODEL
    # the directory must be new: nothing already there is mixed in
    with pytest.raises(BundleFormatError):
        verify_bundle_file(path, into, trust)


def test_a_refusal_after_the_walk_removes_the_members(kit: Kit, trust, tmp_path):
    path, into = tmp_path / "b.edgebundle", tmp_path / "members"
    path.write_bytes(kit.replaced(MODEL, flip(kit.members[MODEL])))
    with pytest.raises(DigestMismatchError):
        verify_bundle_file(path, into, trust)
    assert not into.exists()
    with pytest.raises(UntrustedSignerError), unpack_verified(path, TrustStore(),
                                                              work_dir=tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.edgebundle"]


def test_unpack_removes_its_directory_and_read_unverified_file(kit: Kit, trust, tmp_path):
    path = tmp_path / "b.edgebundle"
    path.write_bytes(kit.valid)
    with unpack_verified(path, trust, work_dir=tmp_path) as verified:
        assert verified.path(MODEL).read_bytes() == kit.members[MODEL]
        assert verified.directory.parent.parent == tmp_path
    assert not verified.directory.exists()
    unverified = read_unverified_file(path, tmp_path / "u")
    assert type(unverified) is UnverifiedBundle and unverified.manifest == kit.manifest
