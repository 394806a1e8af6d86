"""Approvals: signed statements of who approved a bundle, when, in what role and why.

An approval is a small document (:class:`Approval`) naming the exact manifest it approves
(the sha256 of the canonical ``manifest.json`` bytes), the approving key's id, the role the
approver claims, a comment and, optionally, a new review date. The approver signs
``PAE(APPROVAL_TYPE, canonical statement)`` with the same Ed25519 key that adds its
signature to the envelope; the signed statements travel in ``signatures.json`` beside the
manifest signatures (:class:`~edgefleet.contract.signing.Envelope`), so approving a bundle
never changes its manifest or the build signature.

The statement carries no name: a name written by the signer proves nothing. Names come from
the verifier's own trust store (:func:`check_approvals`), and the role only counts when the
trust store gives that key the same role.

This module does not read bundles and does not decide policy (which roles a group needs).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.card import parse_date
from edgefleet.contract.errors import BadSignatureError, SchemaError
from edgefleet.contract.wire import Fields, canonical_json, sha256_hex

__all__ = [
    "APPROVAL_TYPE",
    "MAX_APPROVALS",
    "Approval",
    "CheckedApproval",
    "SignedApproval",
    "check_approvals",
    "next_review",
    "sign_approval",
]

APPROVAL_TYPE = "application/vnd.edgefleet.approval+json; version=1"
APPROVAL_SCHEMA = 1
MAX_APPROVALS = 16
MAX_COMMENT = 1024
ROLE_MAX = 32


@dataclass(frozen=True)
class Approval:
    """What an approver signs."""

    manifest_sha256: str
    keyid: str
    role: str
    comment: str
    signed_at: str  # RFC 3339, UTC
    review_by: str | None = None  # YYYY-MM-DD: the next review, renewing the card's date

    def to_dict(self) -> dict[str, Any]:
        return {"schema": APPROVAL_SCHEMA, "manifest_sha256": self.manifest_sha256,
                "keyid": self.keyid, "role": self.role, "comment": self.comment,
                "signed_at": self.signed_at, "review_by": self.review_by}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Approval:
        """Raises:
            SchemaError: naming the field at fault.
        """
        f = Fields(obj, where)
        if f.int("schema") != APPROVAL_SCHEMA:
            raise f.bad("schema", f"unsupported approval schema (expected {APPROVAL_SCHEMA})")
        review_by = f.raw("review_by")
        if review_by is not None:
            if not isinstance(review_by, str):
                raise f.bad("review_by", "expected a date or null")
            try:
                parse_date(review_by, f"{where}.review_by")
            except ValueError as exc:
                raise f.bad("review_by", str(exc)) from exc
        out = cls(f.str("manifest_sha256", max_len=64), f.str("keyid", max_len=64),
                  f.str("role", max_len=ROLE_MAX), f.str("comment", max_len=MAX_COMMENT),
                  f.str("signed_at", max_len=64), review_by)
        f.done()
        return out


@dataclass(frozen=True)
class SignedApproval:
    statement: Approval
    sig: bytes = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.statement.to_dict(),
                "sig": base64.b64encode(self.sig).decode("ascii")}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> SignedApproval:
        f = Fields(obj, where)
        statement = Approval.from_dict(f.raw("statement"), f"{where}.statement")
        try:
            sig = base64.b64decode(f.str("sig", max_len=128), validate=True)
        except binascii.Error as exc:
            raise f.bad("sig", "not base64") from exc
        f.done()
        return cls(statement, sig)


@dataclass(frozen=True)
class CheckedApproval:
    """An approval whose signature verified, with what the verifier's trust store says."""

    statement: Approval
    trusted: bool  # the key is in the trust store
    name: str  # from the trust store ("" when unknown)
    trusted_role: str | None  # the role the trust store gives the key

    @property
    def role_confirmed(self) -> bool:
        return self.trusted and self.trusted_role == self.statement.role

    def to_dict(self) -> dict[str, Any]:
        return {**self.statement.to_dict(), "trusted": self.trusted, "name": self.name,
                "trusted_role": self.trusted_role, "role_confirmed": self.role_confirmed}


def _pae(payload: bytes) -> bytes:
    from edgefleet.contract.signing import pae  # signing imports this module

    return pae(APPROVAL_TYPE, payload)


def sign_approval(private_key: Ed25519PrivateKey, manifest: bytes, *, role: str, comment: str,
                  signed_at: str, review_by: str | None = None) -> SignedApproval:
    """Sign an approval of the manifest bytes ``manifest``.

    Raises:
        SchemaError: the role, comment or review date is refused (names which).
    """
    from edgefleet.contract.signing import key_id

    if not role or len(role) > ROLE_MAX:
        raise SchemaError(f"approval role {role!r}: 1-{ROLE_MAX} characters", field="role")
    if len(comment) > MAX_COMMENT:
        raise SchemaError(f"approval comment: longer than {MAX_COMMENT} characters",
                          field="comment")
    if review_by is not None:
        try:
            parse_date(review_by, "--review-by")
        except ValueError as exc:
            raise SchemaError(str(exc), field="review_by") from exc
    statement = Approval(sha256_hex(manifest), key_id(private_key.public_key()), role, comment,
                         signed_at, review_by)
    return SignedApproval(statement, private_key.sign(_pae(statement.to_bytes())))


def check_approvals(approvals: tuple[SignedApproval, ...], manifest: bytes,
                    trust: Any) -> tuple[CheckedApproval, ...]:
    """Verify each approval by a key in ``trust`` (a ``TrustStore``) over ``manifest``.

    An approval by a key the trust store does not hold cannot be checked and is returned
    with ``trusted=False``, as the envelope ignores unknown signers.

    Raises:
        BadSignatureError: a trusted key's approval does not verify, or approves another
            manifest (copied from another bundle).
    """
    digest = sha256_hex(manifest)
    out = []
    for i, signed in enumerate(approvals):
        st = signed.statement
        known = trust.get(st.keyid)
        if known is None:
            out.append(CheckedApproval(st, False, "", None))
            continue
        where = (f"signatures.json: approval {i} by key {st.keyid[:16]}… "
                 f"({known.name or known.role})")
        if st.manifest_sha256 != digest:
            raise BadSignatureError(f"{where} approves another manifest",
                                    member="signatures.json")
        try:
            known.public_key.verify(signed.sig, _pae(st.to_bytes()))
        except InvalidSignature as exc:
            raise BadSignatureError(f"{where} does not verify: the approval was altered",
                                    member="signatures.json") from exc
        out.append(CheckedApproval(st, True, known.name, known.role))
    return tuple(out)


def next_review(card_review_by: str | None, approvals: tuple[CheckedApproval, ...],
                role: str = "approver") -> str | None:
    """The review date in force: the one in the latest confirmed ``role`` approval that
    names a date (an approver re-approving with a new date renews it), else the card's."""
    dated = [a.statement for a in approvals
             if a.role_confirmed and a.statement.role == role and a.statement.review_by]
    if dated:
        return max(dated, key=lambda s: s.signed_at).review_by
    return card_review_by
