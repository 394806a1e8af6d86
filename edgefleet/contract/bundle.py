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
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.approval import SignedApproval
from edgefleet.contract.errors import (
    BundleFormatError,
    DigestMismatchError,
    DowngradeError,
    DuplicateMemberError,
    ExtendedHeaderError,
    ExtraMemberError,
    GzipHeaderError,
    LinkMemberError,
    ManifestError,
    MemberAfterEndError,
    MissingMemberError,
    MultipleStreamError,
    SchemaError,
    SizeLimitError,
    SizeMismatchError,
    SparseMemberError,
    SpecialMemberError,
    TrailingDataError,
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
    "read_unverified_file",
    "sign_bundle",
    "unpack_unverified",
    "unpack_verified",
    "verify_bundle",
    "verify_bundle_file",
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
    # manifest.json and signatures.json are held in memory; so is what member() reads
    # from a directory (reference.json, samples.json): larger ones are refused
    max_document_bytes: int = 16 * 1024 * 1024


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


# --------------------------------------------------------------------------- reading
#
# The container is walked by hand rather than by ``gzip`` and ``tarfile``: Python's gzip
# reader joins concatenated streams silently, and tarfile stops at the first zero block
# (or at a corrupt header) without looking at what follows, folds pax and GNU long-name
# headers into the next member, and reads their bodies whole. Here every byte of the
# decompressed stream is accounted for: a USTAR header, a member body, zero padding up to
# the next 512-byte block, the end-of-archive marker and zero padding to the end of exactly
# one gzip stream, then the end of the file.

_BLOCK = 512
_CHUNK_IN = 64 * 1024  # compressed bytes per read
_CHUNK_OUT = 256 * 1024  # decompressed bytes per step: what verification holds at a time
_MAX_TAIL = 1024 * 1024  # zero padding after the end-of-archive (tarfile writes < 10 KiB)
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16
_GZIP_FLAGS = {_FHCRC: "a header CRC", _FEXTRA: "an extra field", _FNAME: "a file name",
               _FCOMMENT: "a comment"}
_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX USTAR, and GNU (what most tars write)
_REGULAR = (b"0", b"\0")
_LINKS = {b"1": "hardlink", b"2": "symlink"}
_SPECIAL = {b"3": "character device", b"4": "block device", b"5": "directory", b"6": "fifo",
            b"7": "contiguous file"}
_EXTENDED = {b"x": "pax extended header", b"g": "pax global header",
             b"L": "GNU long-name header", b"K": "GNU long-link-name header"}


class _Source:
    """The compressed bytes, read in bounded chunks, counted and hashed as they pass."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self._fh, self._limit = fh, limit
        self.size = 0
        self._digest = hashlib.sha256()

    def read(self) -> bytes:
        chunk = self._fh.read(_CHUNK_IN)
        self.size += len(chunk)
        if self.size > self._limit:
            raise SizeLimitError(
                f"bundle is more than {self._limit} bytes; the limit is {self._limit}")
        self._digest.update(chunk)
        return chunk

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _zlib_reason(exc: zlib.error) -> str:
    text = str(exc)
    if "incorrect data check" in text:
        return f"not a bundle: corrupt gzip stream (CRC check failed: {text})"
    if "incorrect length check" in text:
        return f"not a bundle: corrupt gzip stream (length check failed: {text})"
    return f"not a bundle: corrupt gzip stream ({text})"


def _inflate(src: _Source, bound: int) -> Iterator[bytes]:
    """Decompressed chunks (each at most ``_CHUNK_OUT``) of the file's one gzip stream.

    Raises:
        BundleFormatError: not gzip, corrupt, or truncated.
        GzipHeaderError: optional header fields.
        MultipleStreamError, TrailingDataError: anything after the stream's trailer.
        SizeLimitError: the stream inflates past ``bound`` (a bomb).
    """
    head = b""
    while len(head) < 10:
        chunk = src.read()
        if not chunk:
            break
        head += chunk
    if head[:2] != b"\x1f\x8b":
        raise BundleFormatError("not a bundle: not gzip-compressed (expected a .edgebundle file)")
    if len(head) < 10:
        raise BundleFormatError("truncated bundle: the gzip header is incomplete")
    if head[2] != 8:
        raise BundleFormatError(f"not a bundle: gzip compression method {head[2]} "
                                "(only deflate, 8, is used)")
    flags = head[3] & ~_FTEXT
    if flags:
        found = [what for bit, what in _GZIP_FLAGS.items() if flags & bit]
        if flags & 0xE0:
            found.append(f"reserved flag bits {flags & 0xE0:#04x}")
        raise GzipHeaderError(f"the gzip header carries {', '.join(found)}; a bundle's gzip "
                              "header has no optional fields")
    inflater = zlib.decompressobj(31)
    pending, produced, full = head, 0, False
    while not inflater.eof:
        if not pending and not full:  # a full output step may hold more: drain it first
            pending = src.read()
            if not pending:
                raise BundleFormatError("truncated bundle: the gzip stream ends early")
        try:
            out = inflater.decompress(pending, _CHUNK_OUT)
        except zlib.error as exc:
            raise BundleFormatError(_zlib_reason(exc)) from exc
        pending, full = inflater.unconsumed_tail, len(out) == _CHUNK_OUT
        produced += len(out)
        if produced > bound:
            raise SizeLimitError(f"bundle decompresses to more than {bound} bytes (a tar bomb?)")
        if out:
            yield out
    rest = inflater.unused_data or src.read()
    if rest[:2] == b"\x1f\x8b" or rest == b"\x1f":
        raise MultipleStreamError(
            "a second gzip stream follows the bundle's gzip stream (a gzip reader would join "
            "it to the archive unverified); a bundle is exactly one gzip stream")
    if rest:
        raise TrailingDataError(f"bytes after the end of the gzip stream ({rest[:16]!r}…); "
                                "a bundle ends with its gzip trailer")


def _number(field: bytes, what: str, offset: int) -> int:
    """A tar numeric field: octal digits, or GNU base-256 for values too large for them."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise BundleFormatError(f"not a bundle: not a valid tar archive ({what} field "
                                f"{field!r} at offset {offset})") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class _Header:
    name: str
    kind: bytes
    size: int
    mtime: int
    linkname: str


def _header(block: bytes, offset: int) -> _Header | None:
    """Parse one 512-byte block as a USTAR header; None if it is not one (bad checksum)."""
    try:
        stored = _number(block[148:156], "checksum", offset)
    except BundleFormatError:
        return None
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 128)
    if stored not in (unsigned, signed):
        return None
    magic = bytes(block[257:265])
    if magic not in _MAGICS:
        raise BundleFormatError(f"not a bundle: not a valid tar archive (header format "
                                f"{magic!r} at offset {offset}; only USTAR headers are read)")
    name, kind = _text(block[0:100]), bytes(block[156:157])
    prefix = _text(block[345:500]) if magic == _MAGICS[0] else ""
    if prefix:
        name = f"{prefix}/{name}"
    if kind == b"5":
        name = name.rstrip("/") or name
    return _Header(name, kind, _number(block[124:136], "size", offset),
                   _number(block[136:148], "mtime", offset), _text(block[157:257]))


def _check_member(head: _Header, limits: Limits) -> None:
    name = head.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMemberError(f"{name}: absolute path in bundle", member=name)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeMemberError(f"{name}: path with '..' in bundle", member=name)
    if head.kind in _EXTENDED:
        raise ExtendedHeaderError(
            f"{name}: {_EXTENDED[head.kind]} in bundle (it would rewrite the next member's "
            "name or size); only plain USTAR headers are allowed", member=name)
    if head.kind in _LINKS:
        raise LinkMemberError(f"{name}: {_LINKS[head.kind]} to {head.linkname!r} in bundle",
                              member=name)
    if head.kind == b"S":
        raise SparseMemberError(f"{name}: GNU sparse member in bundle; only regular files "
                                "are allowed", member=name)
    if head.kind not in _REGULAR:
        kind = _SPECIAL.get(head.kind, f"member of type {head.kind!r}")
        raise SpecialMemberError(f"{name}: {kind} in bundle; only regular files are allowed",
                                 member=name)
    if len(parts) > 1 or not MEMBER_RE.match(name):
        raise UnsafeMemberError(f"{name}: not a plain lower-case file name", member=name)
    if head.size < 0 or head.size > limits.max_member_bytes:
        raise SizeLimitError(
            f"{name}: {head.size} bytes exceeds the member limit of {limits.max_member_bytes}",
            member=name)


class _Sink:
    """Where member bodies go: files in a new directory, or memory (``directory=None``)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.memory: dict[str, bytes] = {}
        self._parts: list[bytes] = []
        self._fh: io.FileIO | None = None

    def open(self, name: str) -> None:
        self._parts = []
        if self.directory is not None:
            # the name passed MEMBER_RE (flat, lower-case): it cannot leave the directory
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
            self._fh = io.FileIO(fd, "wb")

    def write(self, data: memoryview, keep: bool) -> None:
        if self._fh is not None:
            self._fh.write(data)
        if keep or self.directory is None:
            self._parts.append(bytes(data))

    def close(self, name: str) -> bytes:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        body = b"".join(self._parts)
        self._parts = []
        if self.directory is None:
            self.memory[name] = body
        return body

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _TarWalker:
    """A streaming USTAR reader over decompressed chunks: checks every header against the
    limits as it arrives, streams bodies into the sink while hashing them, and accepts
    after the end-of-archive marker nothing but zero blocks."""

    def __init__(self, limits: Limits, sink: _Sink) -> None:
        self.limits, self.sink = limits, sink
        self.entries: dict[str, FileEntry] = {}  # in archive order
        self.docs: dict[str, bytes] = {}  # manifest.json and signatures.json, in memory
        self.mtime = 0
        self._state = "header"
        self._block = bytearray()
        self._offset = 0  # of the next byte fed
        self._left = 0  # body or padding bytes still to come
        self._total = 0
        self._member: _Header | None = None
        self._digest = hashlib.sha256()
        self._tail = 0  # zero bytes seen from the end-of-archive marker on

    def feed(self, data: bytes) -> None:
        view, pos, end = memoryview(data), 0, len(data)
        while pos < end:
            if self._state == "body":
                take = min(self._left, end - pos)
                part = view[pos:pos + take]
                self._digest.update(part)
                self.sink.write(part, self._member.name in (MANIFEST, SIGNATURES))
                self._left -= take
                if self._left == 0:
                    self._end_member()
            elif self._state == "pad":
                take = min(self._left, end - pos)
                if view[pos:pos + take].tobytes().count(0) != take:
                    name = self._member.name
                    raise TrailingDataError(
                        f"{name}: non-zero bytes in the padding after its body (offset "
                        f"{self._offset + pos}); data hidden between members", member=name)
                self._left -= take
                if self._left == 0:
                    self._state = "header"
            else:
                take = min(_BLOCK - len(self._block), end - pos)
                self._block += view[pos:pos + take]
                if len(self._block) == _BLOCK:
                    block, self._block = bytes(self._block), bytearray()
                    self._on_block(block, self._offset + pos + take - _BLOCK)
            pos += take
        self._offset += end

    def _on_block(self, block: bytes, offset: int) -> None:
        zero = block.count(0) == _BLOCK
        if self._state == "tail":
            if not zero:
                head = _header(block, offset)
                if head is not None:
                    raise MemberAfterEndError(
                        f"{head.name}: a tar member after the end-of-archive marker (offset "
                        f"{offset}), hidden from readers that stop there", member=head.name)
                raise TrailingDataError(f"non-zero bytes after the tar end-of-archive marker "
                                        f"(offset {offset}): {block.strip(bytes(1))[:16]!r}…")
            self._tail += _BLOCK
            if self._tail > _MAX_TAIL:
                raise TrailingDataError(f"more than {_MAX_TAIL} bytes of zero padding after "
                                        "the tar end-of-archive marker")
            return
        if zero:
            self._state, self._tail = "tail", _BLOCK
            return
        head = _header(block, offset)
        if head is None:
            after = f" after {list(self.entries)[-1]}" if self.entries else ""
            raise BundleFormatError(f"not a bundle: not a valid tar archive (corrupt header at "
                                    f"offset {offset}{after})")
        self._on_header(head)

    def _on_header(self, head: _Header) -> None:
        limits, name = self.limits, head.name
        if len(self.entries) >= limits.max_members:
            raise SizeLimitError(f"{name}: more than {limits.max_members} members in bundle",
                                 member=name)
        _check_member(head, limits)
        if name in self.entries:
            raise DuplicateMemberError(f"{name}: appears twice in bundle", member=name)
        self._total += head.size
        if self._total > limits.max_total_bytes:
            raise SizeLimitError(f"{name}: members add up to more than "
                                 f"{limits.max_total_bytes} bytes", member=name)
        if name in (MANIFEST, SIGNATURES) and head.size > limits.max_document_bytes:
            raise SizeLimitError(f"{name}: {head.size} bytes exceeds the limit of "
                                 f"{limits.max_document_bytes} for it", member=name)
        self._member, self._left, self._digest = head, head.size, hashlib.sha256()
        self.entries[name] = FileEntry(name, "", -1)  # claimed: a duplicate is refused
        self.sink.open(name)
        self._state = "body"
        if head.size == 0:
            self._end_member()

    def _end_member(self) -> None:
        head = self._member
        body = self.sink.close(head.name)
        if head.name in (MANIFEST, SIGNATURES):
            self.docs[head.name] = body
        self.entries[head.name] = FileEntry(head.name, self._digest.hexdigest(), head.size)
        self.mtime = head.mtime
        self._left = -head.size % _BLOCK
        self._state = "pad" if self._left else "header"

    def finish(self) -> None:
        """The gzip stream ended: the archive must have ended (two zero blocks) before."""
        if self._state == "tail":
            if self._block.count(0) != len(self._block):
                raise TrailingDataError("non-zero bytes after the tar end-of-archive marker")
            if self._tail >= 2 * _BLOCK:
                return
        if self._state in ("body", "pad"):
            name = self._member.name
            raise BundleFormatError(f"{name}: truncated bundle (the archive ends inside it)",
                                    member=name)
        if not self.entries and self._offset == 0:
            raise BundleFormatError("not a bundle: the archive is empty")
        if self._block and not self.entries:
            raise BundleFormatError("not a bundle: not a valid tar archive (shorter than one "
                                    "header)")
        raise BundleFormatError("truncated bundle: the tar archive has no end-of-archive "
                                "marker")

    def abort(self) -> None:
        self.sink.abort()


@dataclass(frozen=True)
class _Walked:
    entries: dict[str, FileEntry]
    docs: dict[str, bytes]
    memory: dict[str, bytes]  # every member's body, when walked into memory
    mtime: int
    sha256: str
    size: int


def _walk(fh: BinaryIO, limits: Limits, directory: Path | None) -> _Walked:
    """Read a bundle from ``fh`` in bounded steps; member bodies go to ``directory`` (which
    must exist and be empty) or, with None, to memory."""
    bound = limits.max_total_bytes + _TAR_OVERHEAD * (limits.max_members + 2) + _MAX_TAIL
    src = _Source(fh, limits.max_bundle_bytes)
    walker = _TarWalker(limits, _Sink(directory))
    try:
        for chunk in _inflate(src, bound):
            walker.feed(chunk)
        walker.finish()
    finally:
        walker.abort()
    for required in (MANIFEST, SIGNATURES):
        if required not in walker.entries:
            raise MissingMemberError(f"{required}: missing from bundle", member=required)
    return _Walked(walker.entries, walker.docs, walker.sink.memory, walker.mtime, src.sha256,
                   src.size)


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


def _judge(walked: _Walked, trust: TrustStore | None, policy: Policy,
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


def _from_bytes(data: bytes, limits: Limits) -> _Walked:
    if len(data) > limits.max_bundle_bytes:
        raise SizeLimitError(
            f"bundle is {len(data)} bytes; the limit is {limits.max_bundle_bytes}")
    return _walk(io.BytesIO(data), limits, None)


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


def _walk_file(path: Path, into: Path, limits: Limits) -> _Walked:
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
            return _walk(fh, limits, into)
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
