"""Reading, verifying and writing bundle files (``.edgebundle``).

A bundle is a gzip-compressed tar with deterministic bytes: members in a fixed order
(``manifest.json``, ``signatures.json``, then the listed files by name), owner 0,
mode 0644, one mtime, USTAR headers, a gzip header without name or time. Same inputs,
same bytes.

:func:`verify_bundle` is a pure verifier over bytes. Its order is the security
argument: the container is walked with every limit enforced on the *decompressed*
stream (no member is trusted to tell its own size), every member must be a plain
regular file with a flat name, then the signature envelope is checked over the exact
``manifest.json`` bytes, and only then is the manifest parsed and every file's size and
sha256 compared. Nothing inside (ONNX, reference, samples) is parsed here.

:func:`read_unverified` does all of that except the signature policy, for ``inspect``
and for adding a signature; its result must never be loaded on a device.

This module does not touch the file system except in :func:`read_bundle_file`, and
does not extract anything to disk.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    DuplicateMemberError,
    ExtraMemberError,
    LinkMemberError,
    ManifestError,
    MissingMemberError,
    SchemaError,
    SizeLimitError,
    SizeMismatchError,
    SpecialMemberError,
    UnsafeMemberError,
)
from edgefleet.contract.manifest import MEMBER_RE, FileEntry, Manifest, parse_version
from edgefleet.contract.signing import Envelope, Policy, TrustedKey, TrustStore, verify_envelope
from edgefleet.contract.wire import sha256_hex

__all__ = [
    "BUNDLE_SUFFIX",
    "Limits",
    "UnverifiedBundle",
    "VerifiedBundle",
    "file_entry",
    "pack_bundle",
    "read_bundle_file",
    "read_unverified",
    "sign_bundle",
    "verify_bundle",
]

BUNDLE_SUFFIX = ".edgebundle"
MANIFEST = "manifest.json"
SIGNATURES = "signatures.json"
_TAR_OVERHEAD = 1024  # header + padding per member, for the decompressed-stream bound


@dataclass(frozen=True)
class Limits:
    """Bounds applied while reading a bundle. Defaults suit a 0.5-4 GB device."""

    max_bundle_bytes: int = 256 * 1024 * 1024  # the compressed file
    max_member_bytes: int = 256 * 1024 * 1024  # one decompressed member
    max_total_bytes: int = 512 * 1024 * 1024  # all decompressed members
    max_members: int = 16


@dataclass(frozen=True)
class UnverifiedBundle:
    """Members whose structure and digests checked out, signatures not judged."""

    manifest: Manifest
    envelope: Envelope
    members: dict[str, bytes] = field(repr=False)
    mtime: int
    sha256: str  # of the bundle file

    def member(self, path: str) -> bytes:
        return self.members[path]


@dataclass(frozen=True)
class VerifiedBundle(UnverifiedBundle):
    """A bundle that satisfied the trust policy: safe to load."""

    signers: tuple[TrustedKey, ...] = ()


def file_entry(path: str, data: bytes) -> FileEntry:
    return FileEntry(path, sha256_hex(data), len(data))


# --------------------------------------------------------------------------- reading


class _BoundedReader(io.RawIOBase):
    """Decompressed stream that refuses to yield more than ``limit`` bytes."""

    def __init__(self, raw: io.BufferedIOBase, limit: int) -> None:
        self._raw, self._left, self._limit = raw, limit, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            # one probe byte: a stream that ends exactly at the limit is fine
            if self._raw.read(1):
                raise SizeLimitError(
                    f"bundle decompresses to more than {self._limit} bytes (a tar bomb?)")
            return 0
        n = self._raw.readinto(memoryview(buffer)[: min(len(buffer), self._left)])
        self._left -= n
        return n


def _check_member(info: tarfile.TarInfo, limits: Limits) -> None:
    name = info.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMemberError(f"{name}: absolute path in bundle", member=name)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeMemberError(f"{name}: path with '..' in bundle", member=name)
    if info.issym() or info.islnk():
        kind = "symlink" if info.issym() else "hardlink"
        raise LinkMemberError(f"{name}: {kind} to {info.linkname!r} in bundle", member=name)
    if not info.isreg():
        kind = ("directory" if info.isdir() else "device" if info.isdev() else
                "fifo" if info.isfifo() else "special file")
        raise SpecialMemberError(f"{name}: {kind} in bundle; only regular files are allowed",
                                 member=name)
    if len(parts) > 1 or not MEMBER_RE.match(name):
        raise UnsafeMemberError(f"{name}: not a plain lower-case file name", member=name)
    if info.size > limits.max_member_bytes:
        raise SizeLimitError(
            f"{name}: {info.size} bytes exceeds the member limit of {limits.max_member_bytes}",
            member=name)


def _read_members(data: bytes, limits: Limits) -> tuple[dict[str, bytes], int]:
    if len(data) > limits.max_bundle_bytes:
        raise SizeLimitError(
            f"bundle is {len(data)} bytes; the limit is {limits.max_bundle_bytes}")
    if data[:2] != b"\x1f\x8b":
        raise BundleFormatError("not a bundle: not gzip-compressed (expected a .edgebundle file)")
    members: dict[str, bytes] = {}
    mtime = 0
    total = 0
    bound = limits.max_total_bytes + _TAR_OVERHEAD * (limits.max_members + 2) + 10240
    gz = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
    try:
        stream = io.BufferedReader(_BoundedReader(gz, bound))
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if len(members) >= limits.max_members:
                    raise SizeLimitError(
                        f"{info.name}: more than {limits.max_members} members in bundle",
                        member=info.name)
                _check_member(info, limits)
                if info.name in members:
                    raise DuplicateMemberError(f"{info.name}: appears twice in bundle",
                                               member=info.name)
                total += info.size
                if total > limits.max_total_bytes:
                    raise SizeLimitError(
                        f"{info.name}: members add up to more than {limits.max_total_bytes} "
                        "bytes", member=info.name)
                fh = tar.extractfile(info)
                assert fh is not None  # a regular file always has a body
                try:
                    body = fh.read()
                except tarfile.ReadError as exc:  # the stream ended inside this member
                    raise BundleFormatError(f"{info.name}: truncated bundle ({exc})",
                                            member=info.name) from exc
                if len(body) != info.size:
                    raise BundleFormatError(f"{info.name}: truncated bundle", member=info.name)
                members[info.name] = body
                mtime = int(info.mtime)
            # tarfile ends the archive silently at an invalid header after the first
            # member, and gzip checks its CRC and length only at the end of the stream:
            # read to the end (still bounded) so a corrupt file is refused as corrupt,
            # not reported as a member missing from an honest-looking archive.
            while stream.read(1 << 16):
                pass
    except (tarfile.ReadError, tarfile.HeaderError) as exc:
        what = "truncated bundle" if "unexpected end" in str(exc) or "end of" in str(exc) \
            else "not a bundle: not a valid tar archive"
        raise BundleFormatError(f"{what} ({exc})") from exc
    except EOFError as exc:
        raise BundleFormatError(f"truncated bundle ({exc})") from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise BundleFormatError(f"not a bundle: corrupt gzip stream ({exc})") from exc
    for required in (MANIFEST, SIGNATURES):
        if required not in members:
            raise MissingMemberError(f"{required}: missing from bundle", member=required)
    return members, mtime


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        return Manifest.from_bytes(raw)
    except SchemaError as exc:
        raise ManifestError(f"manifest.json: {exc}", member=MANIFEST) from exc


def _check_files(manifest: Manifest, members: dict[str, bytes]) -> None:
    listed = {e.path for e in manifest.files}
    present = set(members) - {MANIFEST, SIGNATURES}
    for name in sorted(listed - present):
        raise MissingMemberError(f"{name}: listed in the manifest but missing", member=name)
    for name in sorted(present - listed):
        raise ExtraMemberError(f"{name}: in the bundle but not listed in the manifest",
                               member=name)
    for entry in manifest.files:
        body = members[entry.path]
        if len(body) != entry.size:
            raise SizeMismatchError(
                f"{entry.path}: {len(body)} bytes, the manifest says {entry.size}",
                member=entry.path)
        if sha256_hex(body) != entry.sha256:
            raise DigestMismatchError(
                f"{entry.path}: sha256 differs from the manifest (altered after signing)",
                member=entry.path)


def read_unverified(data: bytes, limits: Limits = Limits()) -> UnverifiedBundle:
    """Structure and digests checked, signatures *not* judged: for inspect and sign.

    Raises:
        BundleError: any structural refusal (see :func:`verify_bundle`).
    """
    members, mtime = _read_members(data, limits)
    envelope = Envelope.from_bytes(members[SIGNATURES])
    manifest = _parse_manifest(members[MANIFEST])
    _check_files(manifest, members)
    return UnverifiedBundle(manifest, envelope, members, mtime, sha256_hex(data))


def verify_bundle(
    data: bytes,
    trust: TrustStore,
    policy: Policy = Policy(),
    *,
    limits: Limits = Limits(),
    installed_version: str | None = None,
    allow_downgrade: bool = False,
) -> VerifiedBundle:
    """Verify a bundle's bytes; return its members only if everything holds.

    Raises:
        BundleFormatError: not a gzip tar, truncated, unreadable envelope.
        UnsafeMemberError, LinkMemberError, SpecialMemberError: a member that is not a
            plain regular file with a flat name.
        SizeLimitError: the file, a member, the total or the count beyond ``limits``.
        DuplicateMemberError, MissingMemberError, ExtraMemberError: the member set
            differs from the manifest's list.
        SignatureError: bad, untrusted or too few signatures (see its subclasses).
        ManifestError: the signed manifest breaks its schema.
        SizeMismatchError, DigestMismatchError: a member differs from the manifest.
        DowngradeError: lower than ``installed_version`` and no downgrade allowed.
    """
    members, mtime = _read_members(data, limits)
    envelope = Envelope.from_bytes(members[SIGNATURES])
    signers = verify_envelope(envelope, members[MANIFEST], trust, policy)
    manifest = _parse_manifest(members[MANIFEST])
    _check_files(manifest, members)
    if installed_version is not None and not allow_downgrade:
        try:
            lower = manifest.version_key < parse_version(installed_version)
        except SchemaError:
            lower = False  # an unreadable installed version cannot block an install
        if lower:
            raise DowngradeError(
                f"manifest.json: version {manifest.version} is lower than the installed "
                f"{installed_version}; a downgrade must be asked for explicitly",
                member=MANIFEST)
    return VerifiedBundle(manifest, envelope, members, mtime, sha256_hex(data),
                          signers=signers)


def read_bundle_file(path: Path, limits: Limits = Limits()) -> bytes:
    """Read a bundle file's bytes, refusing one larger than the limit before reading it.

    Raises:
        BundleFormatError: the file cannot be read.
        SizeLimitError: the file is larger than ``limits.max_bundle_bytes``.
    """
    try:
        size = path.stat().st_size
        if size > limits.max_bundle_bytes:
            raise SizeLimitError(
                f"{path}: {size} bytes; the limit is {limits.max_bundle_bytes}")
        with path.open("rb") as fh:
            return fh.read(limits.max_bundle_bytes + 1)
    except OSError as exc:
        raise BundleFormatError(f"{path}: cannot read ({exc.strerror})") from exc


# --------------------------------------------------------------------------- writing


def pack_bundle(manifest: Manifest, envelope: Envelope, files: dict[str, bytes],
                mtime: int) -> bytes:
    """Write the deterministic gzip tar for a manifest, its envelope and its files.

    Raises:
        ValueError: ``files`` differs from what the manifest lists (a packager bug).
    """
    if {e.path for e in manifest.files} != set(files):
        raise ValueError("files do not match the manifest's file list")
    for entry in manifest.files:
        if file_entry(entry.path, files[entry.path]) != entry:
            raise ValueError(f"{entry.path}: does not match its manifest entry")
    ordered = [(MANIFEST, manifest.to_bytes()), (SIGNATURES, envelope.to_bytes())]
    ordered += [(name, files[name]) for name in sorted(files)]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in ordered:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), mtime, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(body))
    out = io.BytesIO()
    # level 6: on a 19.7 MB forest graph, level 9 took ~7x longer for a 1 % smaller file
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def sign_bundle(data: bytes, private_key: Ed25519PrivateKey, limits: Limits = Limits()) -> bytes:
    """Add (or renew) one signature; every other byte of meaning stays the same.

    The bundle's structure and digests are checked first: a key never signs a bundle
    whose files no longer match its manifest.

    Raises:
        BundleError: the bundle is malformed or altered.
    """
    bundle = read_unverified(data, limits)
    raw_manifest = bundle.members[MANIFEST]
    envelope = bundle.envelope.signed(private_key, raw_manifest)
    files = {k: v for k, v in bundle.members.items() if k not in (MANIFEST, SIGNATURES)}
    return pack_bundle(bundle.manifest, envelope, files, bundle.mtime)
