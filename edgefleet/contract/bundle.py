"""Reading, verifying and writing bundle files (``.edgebundle``).

A bundle is a gzip-compressed tar with deterministic bytes: members in a fixed order
(``manifest.json``, ``signatures.json``, then the listed files by name), owner 0,
mode 0644, one mtime, USTAR headers, a gzip header without name or time. Same inputs,
same bytes. Nothing else: exactly one gzip stream, and after the tar's end-of-archive
marker only zero padding, then the end of that stream and of the file.

Verification is a pure walk over a stream, and its order is the security argument: the
container is walked with every limit enforced on the *decompressed* stream (no member is
trusted to tell its own size, no byte is skipped unlooked-at), every member must be a
plain regular file with a flat name, then the signature envelope is checked over the
exact ``manifest.json`` bytes, and only then is the manifest parsed and every file's size
and sha256 (computed while the body streamed past) compared. Nothing inside (ONNX,
reference, samples) is parsed here.

Two shells around the walk:

- :func:`verify_bundle_file` (and :func:`unpack_verified`) stream a bundle *file* in
  bounded chunks and write each member to a file in a fresh directory while hashing it:
  memory stays flat whatever the file holds. The agent, the server and ``edgepack
  verify`` use these; the result refers to the files (:meth:`UnverifiedBundle.path`).
- :func:`verify_bundle` (and :func:`read_unverified`) take bytes already in memory and
  keep the members in memory: the convenience for tests, tools and signing.

:func:`read_unverified` / :func:`read_unverified_file` do all of it except the signature
policy, for ``inspect`` and for adding a signature; their result must never be loaded on
a device.

This module writes only into the directory a caller names, never extracts by a member's
own say (names are checked to be flat before a file is created), and parses nothing a
member contains.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.approval import SignedApproval
from edgefleet.contract.container import MANIFEST, SIGNATURES, Limits, Walked, walk
from edgefleet.contract.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    ExtraMemberError,
    ManifestError,
    MissingMemberError,
    SchemaError,
    SizeLimitError,
    SizeMismatchError,
)
from edgefleet.contract.manifest import FileEntry, Manifest, parse_version
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
    "read_unverified_file",
    "sign_bundle",
    "unpack_unverified",
    "unpack_verified",
    "verify_bundle",
    "verify_bundle_file",
]

BUNDLE_SUFFIX = ".edgebundle"


class _MemberFiles(Mapping[str, bytes]):
    """The members of a bundle verified into a directory, read on demand, each bounded:
    the in-memory convenience for small documents, never for the model."""

    def __init__(self, directory: Path, entries: dict[str, FileEntry], docs: dict[str, bytes],
                 max_bytes: int) -> None:
        self.directory, self._entries, self._docs = directory, entries, docs
        self._max = max_bytes

    def __getitem__(self, name: str) -> bytes:
        if name in self._docs:
            return self._docs[name]
        entry = self._entries[name]  # KeyError: not a member
        if entry.size > self._max:
            raise SizeLimitError(f"{name}: {entry.size} bytes is more than the "
                                 f"{self._max} read into memory; open its file instead",
                                 member=name)
        with (self.directory / name).open("rb") as fh:
            return fh.read(self._max + 1)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class UnverifiedBundle:
    """Members whose structure and digests checked out, signatures not judged.

    ``directory`` is where the members are as files (None: ``members`` holds them in
    memory, from :func:`verify_bundle` over bytes).
    """

    manifest: Manifest
    envelope: Envelope
    members: Mapping[str, bytes] = field(repr=False)
    mtime: int
    sha256: str  # of the bundle file
    directory: Path | None = None
    size: int = 0  # of the bundle file

    def member(self, path: str) -> bytes:
        """A member's bytes (read from its file, bounded, when verified into a directory).

        Raises:
            KeyError: no such member.
            SizeLimitError: larger than ``Limits.max_document_bytes`` (use :meth:`path`).
        """
        return self.members[path]

    def path(self, name: str) -> Path:
        """The file holding a member.

        Raises:
            KeyError: no such member.
            ValueError: the bundle was verified in memory (no directory).
        """
        if name not in self.members:
            raise KeyError(name)
        if self.directory is None:
            raise ValueError("this bundle was verified in memory; it has no member files")
        return self.directory / name


@dataclass(frozen=True)
class VerifiedBundle(UnverifiedBundle):
    """A bundle that satisfied the trust policy: safe to load."""

    signers: tuple[TrustedKey, ...] = ()


def file_entry(path: str, data: bytes) -> FileEntry:
    return FileEntry(path, sha256_hex(data), len(data))


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        return Manifest.from_bytes(raw)
    except SchemaError as exc:
        raise ManifestError(f"manifest.json: {exc}", member=MANIFEST) from exc


def _check_files(manifest: Manifest, entries: dict[str, FileEntry]) -> None:
    listed = {e.path for e in manifest.files}
    present = set(entries) - {MANIFEST, SIGNATURES}
    for name in sorted(listed - present):
        raise MissingMemberError(f"{name}: listed in the manifest but missing", member=name)
    for name in sorted(present - listed):
        raise ExtraMemberError(f"{name}: in the bundle but not listed in the manifest",
                               member=name)
    for entry in manifest.files:
        found = entries[entry.path]
        if found.size != entry.size:
            raise SizeMismatchError(
                f"{entry.path}: {found.size} bytes, the manifest says {entry.size}",
                member=entry.path)
        if found.sha256 != entry.sha256:
            raise DigestMismatchError(
                f"{entry.path}: sha256 differs from the manifest (altered after signing)",
                member=entry.path)


def _judge(walked: Walked, trust: TrustStore | None, policy: Policy,
           installed_version: str | None, allow_downgrade: bool,
           ) -> tuple[Manifest, Envelope, tuple[TrustedKey, ...]]:
    """The checks after the walk, in the security argument's order: envelope, signatures
    over the exact manifest bytes (unless ``trust`` is None: unverified), manifest, files,
    downgrade."""
    raw_manifest = walked.docs[MANIFEST]
    envelope = Envelope.from_bytes(walked.docs[SIGNATURES])
    signers = () if trust is None else verify_envelope(envelope, raw_manifest, trust, policy)
    manifest = _parse_manifest(raw_manifest)
    _check_files(manifest, walked.entries)
    if trust is not None and installed_version is not None and not allow_downgrade:
        try:
            lower = manifest.version_key < parse_version(installed_version)
        except SchemaError:
            lower = False  # an unreadable installed version cannot block an install
        if lower:
            raise DowngradeError(
                f"manifest.json: version {manifest.version} is lower than the installed "
                f"{installed_version}; a downgrade must be asked for explicitly",
                member=MANIFEST)
    return manifest, envelope, signers


def _from_bytes(data: bytes, limits: Limits) -> Walked:
    if len(data) > limits.max_bundle_bytes:
        raise SizeLimitError(
            f"bundle is {len(data)} bytes; the limit is {limits.max_bundle_bytes}")
    return walk(io.BytesIO(data), limits, None)


def read_unverified(data: bytes, limits: Limits = Limits()) -> UnverifiedBundle:
    """Structure and digests checked, signatures *not* judged: for inspect and sign.

    Raises:
        BundleError: any structural refusal (see :func:`verify_bundle`).
    """
    walked = _from_bytes(data, limits)
    manifest, envelope, _ = _judge(walked, None, Policy(), None, True)
    return UnverifiedBundle(manifest, envelope, walked.memory, walked.mtime, walked.sha256,
                            size=walked.size)


def verify_bundle(
    data: bytes,
    trust: TrustStore,
    policy: Policy = Policy(),
    *,
    limits: Limits = Limits(),
    installed_version: str | None = None,
    allow_downgrade: bool = False,
) -> VerifiedBundle:
    """Verify a bundle's bytes; return its members (in memory) only if everything holds.

    The convenience for bytes a caller already holds (tests, tools, small bundles): the
    members end up in memory too. A bundle that arrives as a file is verified with
    :func:`verify_bundle_file` or :func:`unpack_verified`, which never hold a member whole.

    Raises:
        BundleFormatError: not a gzip tar, truncated, unreadable envelope; and, each with
            its own subclass, anything hidden: optional gzip header fields
            (``GzipHeaderError``), a second gzip stream (``MultipleStreamError``), bytes
            after the stream, non-zero padding (``TrailingDataError``), a member after the
            end-of-archive marker (``MemberAfterEndError``), pax or GNU long-name headers
            (``ExtendedHeaderError``).
        UnsafeMemberError, LinkMemberError, SpecialMemberError (``SparseMemberError``): a
            member that is not a plain regular file with a flat name.
        SizeLimitError: the file, a member, the total or the count beyond ``limits``.
        DuplicateMemberError, MissingMemberError, ExtraMemberError: the member set
            differs from the manifest's list.
        SignatureError: bad, untrusted or too few signatures (see its subclasses).
        ManifestError: the signed manifest breaks its schema.
        SizeMismatchError, DigestMismatchError: a member differs from the manifest.
        DowngradeError: lower than ``installed_version`` and no downgrade allowed.
    """
    walked = _from_bytes(data, limits)
    manifest, envelope, signers = _judge(walked, trust, policy, installed_version,
                                         allow_downgrade)
    return VerifiedBundle(manifest, envelope, walked.memory, walked.mtime, walked.sha256,
                          size=walked.size, signers=signers)


def _walk_file(path: Path, into: Path, limits: Limits) -> Walked:
    try:
        size = path.stat().st_size
        if size > limits.max_bundle_bytes:
            raise SizeLimitError(f"{path}: {size} bytes; the limit is {limits.max_bundle_bytes}")
        fh = path.open("rb")
    except OSError as exc:
        raise BundleFormatError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        into.mkdir(mode=0o700)
    except OSError as exc:
        fh.close()
        raise BundleFormatError(f"{into}: cannot create the directory to verify into "
                                f"({exc.strerror})") from exc
    try:
        with fh:
            return walk(fh, limits, into)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise


def verify_bundle_file(
    path: Path,
    into: Path,
    trust: TrustStore,
    policy: Policy = Policy(),
    *,
    limits: Limits = Limits(),
    installed_version: str | None = None,
    allow_downgrade: bool = False,
) -> VerifiedBundle:
    """Verify the bundle file at ``path``, streaming its members into files in ``into``.

    ``into`` must not exist; it is created (mode 0700) and holds the members when this
    returns (the caller removes it when done). On a refusal it is removed. Nothing is held
    in memory whole but ``manifest.json`` and ``signatures.json`` (bounded by
    ``limits.max_document_bytes``): memory stays flat however large or hostile the file.

    Raises:
        BundleError: every refusal of :func:`verify_bundle`; BundleFormatError also when
            the file cannot be read or ``into`` cannot be created.
    """
    walked = _walk_file(path, into, limits)
    try:
        manifest, envelope, signers = _judge(walked, trust, policy, installed_version,
                                             allow_downgrade)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    members = _MemberFiles(into, walked.entries, walked.docs, limits.max_document_bytes)
    return VerifiedBundle(manifest, envelope, members, walked.mtime, walked.sha256,
                          directory=into, size=walked.size, signers=signers)


def read_unverified_file(path: Path, into: Path, limits: Limits = Limits()) -> UnverifiedBundle:
    """:func:`read_unverified` for a file, members streamed into ``into`` (see
    :func:`verify_bundle_file`). Signatures are not judged: never load the result.

    Raises:
        BundleError: any structural refusal.
    """
    walked = _walk_file(path, into, limits)
    try:
        manifest, envelope, _ = _judge(walked, None, Policy(), None, True)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    members = _MemberFiles(into, walked.entries, walked.docs, limits.max_document_bytes)
    return UnverifiedBundle(manifest, envelope, members, walked.mtime, walked.sha256,
                            directory=into, size=walked.size)


@contextmanager
def unpack_verified(
    path: Path,
    trust: TrustStore,
    policy: Policy = Policy(),
    *,
    work_dir: Path | None = None,
    limits: Limits = Limits(),
    installed_version: str | None = None,
    allow_downgrade: bool = False,
) -> Iterator[VerifiedBundle]:
    """Verify ``path`` into a fresh temporary directory under ``work_dir`` (default: the
    system's), yield the bundle, and remove the directory afterwards.

    Raises:
        BundleError: every refusal of :func:`verify_bundle_file`.
    """
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=work_dir) as tmp:
        yield verify_bundle_file(path, Path(tmp) / "members", trust, policy, limits=limits,
                                 installed_version=installed_version,
                                 allow_downgrade=allow_downgrade)


@contextmanager
def unpack_unverified(path: Path, *, work_dir: Path | None = None,
                      limits: Limits = Limits()) -> Iterator[UnverifiedBundle]:
    """:func:`read_unverified_file` into a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=".inspect-", dir=work_dir) as tmp:
        yield read_unverified_file(path, Path(tmp) / "members", limits)


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


def sign_bundle(data: bytes, private_key: Ed25519PrivateKey, limits: Limits = Limits(), *,
                approve: Callable[[bytes], SignedApproval] | None = None) -> bytes:
    """Add (or renew) one signature; every other byte of meaning stays the same.

    ``approve``, given the manifest bytes, returns a signed approval statement to add
    beside the signature (:func:`edgefleet.contract.approval.sign_approval`).

    The bundle's structure and digests are checked first: a key never signs a bundle
    whose files no longer match its manifest.

    Raises:
        BundleError: the bundle is malformed or altered.
    """
    bundle = read_unverified(data, limits)
    raw_manifest = bundle.members[MANIFEST]
    envelope = bundle.envelope.signed(private_key, raw_manifest)
    if approve is not None:
        envelope = envelope.approved(approve(raw_manifest))
    files = {k: v for k, v in bundle.members.items() if k not in (MANIFEST, SIGNATURES)}
    return pack_bundle(bundle.manifest, envelope, files, bundle.mtime)
