"""The error tree of the contracts (bundle, profile, messages, inputs).

Every refusal has a class of its own and a message that names the member, field or
feature at fault, so a caller can react to the kind and a person can read the reason.
Security failures are never reported as bare ``ValueError``.

    EdgefleetError                  (edgefleet.errors: the root of every package's tree)
    ├── SchemaError                 a wire document is malformed (names the field)
    ├── KeyFileError                a key file is unreadable, wrongly typed or too open
    ├── BundleError                 a bundle is refused
    │   ├── BundleFormatError       not a (gzip) tar, truncated, unreadable envelope
    │   │   ├── GzipHeaderError         optional gzip header fields (name, comment, extra)
    │   │   ├── MultipleStreamError     a second gzip stream after the bundle's one
    │   │   ├── TrailingDataError       bytes where only zero padding or nothing may be
    │   │   ├── MemberAfterEndError     a tar member after the end-of-archive marker
    │   │   └── ExtendedHeaderError     pax or GNU long-name headers
    │   ├── UnsafeMemberError       absolute path, ``..``, nested path
    │   ├── LinkMemberError         symlink or hardlink
    │   ├── SpecialMemberError      device, fifo, directory
    │   │   └── SparseMemberError       a GNU sparse member
    │   ├── SizeLimitError          a member, the total or the member count over a limit
    │   ├── DuplicateMemberError    the same name twice
    │   ├── MissingMemberError      a file the manifest lists is absent
    │   ├── ExtraMemberError        a file the manifest does not list is present
    │   ├── DigestMismatchError     a member's sha256 differs from the manifest
    │   ├── SizeMismatchError       a member's size differs from the manifest
    │   ├── ManifestError           the signed manifest breaks its own schema
    │   ├── SignatureError          signature checks failed
    │   │   ├── BadSignatureError       a signature does not verify (corrupt, wrong payload)
    │   │   ├── UntrustedSignerError    no signature from a key in the trust store
    │   │   └── ThresholdError          fewer trusted signatures than the policy asks
    │   └── DowngradeError          the version is lower than the one installed
    ├── ReferenceMismatchError      profiles over different references are never merged
    └── InputError                  prediction input refused (names the feature)

``ManifestError`` wraps the ``SchemaError`` of a manifest whose signature checked out
(a trusted signer shipped a bad document): it is a bundle refusal like the others.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError

__all__ = [
    "BadSignatureError",
    "BundleError",
    "BundleFormatError",
    "DigestMismatchError",
    "DowngradeError",
    "DuplicateMemberError",
    "ExtendedHeaderError",
    "ExtraMemberError",
    "GzipHeaderError",
    "InputError",
    "KeyFileError",
    "LinkMemberError",
    "ManifestError",
    "MemberAfterEndError",
    "MissingMemberError",
    "MultipleStreamError",
    "ReferenceMismatchError",
    "SchemaError",
    "SignatureError",
    "SizeLimitError",
    "SizeMismatchError",
    "SparseMemberError",
    "SpecialMemberError",
    "ThresholdError",
    "TrailingDataError",
    "UnsafeMemberError",
    "UntrustedSignerError",
]


class SchemaError(EdgefleetError):
    """A document does not follow its schema; the message names the field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class KeyFileError(EdgefleetError):
    """A key file cannot be used (unreadable, wrong type, wrong passphrase, mode)."""


class BundleError(EdgefleetError):
    """A bundle is refused. ``member`` names the file inside the bundle at fault."""

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


class BundleFormatError(BundleError):
    """Not a gzip-compressed tar, truncated, or an unreadable signature envelope."""


class GzipHeaderError(BundleFormatError):
    """The gzip header carries optional fields (a name, a comment, extra data, a header
    CRC): a bundle's header has none, so nothing can ride along unread."""


class MultipleStreamError(BundleFormatError):
    """A second gzip stream follows the first. Python's gzip reader joins them silently;
    the verifier sees exactly one, so a second one would be bytes nobody verified."""


class TrailingDataError(BundleFormatError):
    """Bytes where the format allows only zero padding or nothing: after the gzip stream,
    after the tar end-of-archive marker, or in the padding after a member's body."""


class MemberAfterEndError(BundleFormatError):
    """A tar member after the end-of-archive marker, hidden from readers that stop there."""


class ExtendedHeaderError(BundleFormatError):
    """A pax extended or global header, or a GNU long-name header: they rewrite the next
    member's name or size, so a bundle uses plain USTAR headers only."""


class UnsafeMemberError(BundleError):
    """A member name that could escape the bundle directory."""


class LinkMemberError(BundleError):
    """A symlink or hardlink member."""


class SpecialMemberError(BundleError):
    """A device, fifo, directory or any other non-regular member."""


class SparseMemberError(SpecialMemberError):
    """A GNU sparse member (its holes are described by a map, not stored as bytes)."""


class SizeLimitError(BundleError):
    """A size or count beyond the configured limit (a tar bomb, say)."""


class DuplicateMemberError(BundleError):
    """Two members with the same name."""


class MissingMemberError(BundleError):
    """A member that must be present is absent."""


class ExtraMemberError(BundleError):
    """A member the manifest does not list."""


class DigestMismatchError(BundleError):
    """A member's sha256 differs from the manifest."""


class SizeMismatchError(BundleError):
    """A member's size differs from the manifest."""


class ManifestError(BundleError):
    """The signed manifest does not follow its schema (or is not canonical)."""


class SignatureError(BundleError):
    """The signature envelope does not satisfy the trust policy."""


class BadSignatureError(SignatureError):
    """A signature from a trusted key that does not verify over the manifest."""


class UntrustedSignerError(SignatureError):
    """No signature comes from a key in the trust store."""


class ThresholdError(SignatureError):
    """Fewer valid trusted signatures (or required roles) than the policy asks."""


class DowngradeError(BundleError):
    """The bundle's version is lower than the installed one and no downgrade was asked."""


class ReferenceMismatchError(EdgefleetError):
    """Two profiles (or a profile and a summary) over different reference bins."""


class InputError(EdgefleetError):
    """Prediction input refused; ``feature`` names the feature at fault."""

    def __init__(self, message: str, *, feature: str | None = None, row: int | None = None):
        super().__init__(message)
        self.feature = feature
        self.row = row
