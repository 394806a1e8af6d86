"""The container walk: one gzip stream, plain USTAR members, nothing hidden, bounded memory.

:func:`walk` reads a bundle's bytes once, in bounded chunks, and refuses everything a
bundle may not be (every refusal its own :mod:`~edgefleet.contract.errors` type naming
what was found): optional gzip header fields, a second gzip stream, bytes after the gzip
trailer, pax or GNU headers, sparse, linked or special members, unsafe or duplicate names,
non-zero padding, a member or garbage after the end-of-archive marker, and every size or
count past :class:`Limits` (measured on the decompressed stream, never on what a header
claims). Each member is hashed as it streams, into a file in the directory a caller names
or into memory for the small in-memory API.

What the members mean (the manifest, the signatures, the files it lists) is
:mod:`edgefleet.contract.bundle`'s business, not this module's.
"""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgefleet.contract.errors import (
    BundleFormatError,
    DuplicateMemberError,
    ExtendedHeaderError,
    GzipHeaderError,
    LinkMemberError,
    MemberAfterEndError,
    MissingMemberError,
    MultipleStreamError,
    SizeLimitError,
    SparseMemberError,
    SpecialMemberError,
    TrailingDataError,
    UnsafeMemberError,
)
from edgefleet.contract.manifest import MEMBER_RE, FileEntry

__all__ = ["MANIFEST", "SIGNATURES", "Limits", "Walked", "walk"]

MANIFEST = "manifest.json"  # the first member: the signed document
SIGNATURES = "signatures.json"  # the second: the envelope over it
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
class Walked:
    entries: dict[str, FileEntry]
    docs: dict[str, bytes]
    memory: dict[str, bytes]  # every member's body, when walked into memory
    mtime: int
    sha256: str
    size: int


def walk(fh: BinaryIO, limits: Limits, directory: Path | None) -> Walked:
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
    return Walked(walker.entries, walker.docs, walker.sink.memory, walker.mtime, src.sha256,
                   src.size)
