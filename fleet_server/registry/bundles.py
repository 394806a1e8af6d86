"""Bundles on the server: verify an upload, keep it, describe it, hand out its reference.

An upload is a file (the route streams the body into one): it is verified with
:func:`edgefleet.contract.bundle.unpack_verified` against the server's trust store and policy,
exactly as a device will verify it, streaming (memory stays flat), and the file is moved
into the blob store only after it passed, so only verified bytes are ever stored. A
refusal propagates as the contract's own :class:`~edgefleet.contract.errors.BundleError`
subclass, naming the member. On top of that the server needs the bundle's
``reference.json`` (the bins every summary of this bundle is packed into and the training
profile drift is judged against): it must parse and its hash must be the manifest's
``reference_hash``, or the upload is refused with
:class:`~fleet_server.errors.BundleReferenceError`.

``name@version`` is immutable once stored: the same bytes again are accepted (nothing
changes), other bytes under the same name and version are a conflict, except the same
manifest signed again with new approval statements: those (checked against the trust store,
with the name and role it gives each key) are recorded beside the bundle, which is how an
approver's renewed review date reaches the fleet (:mod:`fleet_server.registry.governance`).

This module does not speak HTTP (the upload size bound is applied while the route
streams the body to its file), does not fold summaries (the callback given does) and
never loads the model.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.contract.approval import CheckedApproval, check_approvals
from edgefleet.contract.bundle import Limits, VerifiedBundle, unpack_verified
from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.manifest import NAME_RE, Manifest, parse_version
from edgefleet.contract.performance import PerformanceSpec
from edgefleet.contract.profile import Profile, ProfileSpec, parse_reference
from edgefleet.contract.signing import Policy, TrustStore
from fleet_server.errors import (
    BundleReferenceError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from fleet_server.models import BundleRecord
from fleet_server.profiles.performance import Expected, expectations, main_metric
from fleet_server.profiles.rollups import Layout, layout_for
from fleet_server.registry.blobs import BlobStore
from fleet_server.store import Store

__all__ = ["BundlePerformance", "Bundles", "Reference", "importances_of", "parse_label"]

log = logging.getLogger(__name__)
_CACHE_SIZE = 256


def parse_label(label: str, field: str = "bundle") -> tuple[str, str]:
    """``name@version`` → ``(name, version)``.

    Raises:
        InvalidRequestError: not ``name@version`` with a valid name and semantic version.
    """
    name, sep, version = label.partition("@")
    if not sep or not NAME_RE.match(name):
        raise InvalidRequestError(f"{field} {label!r}: expected name@version, e.g. "
                                  "sensor@1.2.0", field=field)
    try:
        parse_version(version)
    except SchemaError as exc:
        raise InvalidRequestError(f"{field} {label!r}: {exc}", field=field) from exc
    return name, version


def importances_of(manifest: dict[str, Any]) -> dict[str, float] | None:
    """Each input's permutation importance (mean) from the signed model card, or None for
    a bundle built without importances (or before cards): drift then counts features."""
    try:
        card = Manifest.from_dict(manifest).card
    except SchemaError:  # verified at upload; a record written otherwise has none to give
        log.warning("a stored manifest does not parse; its importances are not used")
        return None
    if card is None or card.importances is None:
        return None
    return {i.feature: i.mean for i in card.importances.features}


@dataclass(frozen=True)
class Reference:
    """What drift needs of a bundle: its bins (spec), rollup layout and training profile,
    and the inputs' permutation importances from its card (None: none recorded)."""

    bundle: BundleRecord
    spec: ProfileSpec
    base: Profile
    layout: Layout
    importances: dict[str, float] | None = None


@dataclass(frozen=True)
class BundlePerformance:
    """What performance needs of a bundle: the spec its blocks are read with, the metric it
    is watched on, and what its card measured at packaging."""

    bundle: BundleRecord
    spec: PerformanceSpec
    task: str  # classification | regression
    metric: str  # accuracy | mae
    expected: dict[str, Expected]


class Bundles:
    """The bundle service.

    Args:
        store: the database.
        blobs: where bundle files go.
        trust: the keys whose signatures count.
        policy: how many (and which roles of) signatures an upload needs.
        limits: size bounds applied while reading a bundle.
        on_uploaded: called with each newly stored bundle (the ingest service folds the
            summaries that were waiting for it); its errors are logged, not raised.
    """

    def __init__(self, store: Store, blobs: BlobStore, trust: TrustStore,
                 policy: Policy = Policy(), limits: Limits = Limits(),
                 on_uploaded: Callable[[BundleRecord], None] | None = None) -> None:
        self.store = store
        self.blobs = blobs
        self.trust = trust
        self.policy = policy
        self.limits = limits
        self.on_uploaded = on_uploaded
        self._refs: OrderedDict[int, Reference] = OrderedDict()
        self._perf: OrderedDict[int, BundlePerformance] = OrderedDict()
        self._lock = threading.Lock()

    def upload(self, data: bytes, actor: str, now: float) -> tuple[BundleRecord, bool]:
        """:meth:`upload_file` for bytes already in memory (tools, tests).

        Raises:
            the errors of :meth:`upload_file`; StoreError: the temporary file failed.
        """
        fd, temp = self.blobs.temp_file()
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return self.upload_file(temp, actor, now)
        finally:
            temp.unlink(missing_ok=True)

    def upload_file(self, path: Path, actor: str, now: float) -> tuple[BundleRecord, bool]:
        """Verify the bundle file at ``path`` and store it; return it and whether it is new.

        ``path`` should be a :meth:`BlobStore.temp_file`: it is moved into the blob store
        if it passes (the caller removes what is left otherwise).

        Raises:
            BundleError: the contract's refusal (signature, digest, member, size, ...).
            BundleReferenceError: ``reference.json`` is unusable or not the manifest's.
            ConflictError: ``name@version`` is stored with other bytes.
        """
        with unpack_verified(path, self.trust, self.policy, work_dir=self.blobs.work_dir,
                             limits=self.limits) as verified:
            return self._store(path, verified, actor, now)

    def _store(self, path: Path, verified: VerifiedBundle, actor: str,
               now: float) -> tuple[BundleRecord, bool]:
        manifest = verified.manifest
        label = f"{manifest.name}@{manifest.version}"
        if "reference.json" not in verified.members:
            raise BundleReferenceError(f"{label}: reference.json is missing; the server needs "
                                       "it to judge drift", field="reference.json")
        raw_ref = verified.member("reference.json")
        try:
            spec, _base = parse_reference(raw_ref)
        except (SchemaError, ReferenceMismatchError) as exc:
            raise BundleReferenceError(f"{label}: {exc}", field="reference.json") from exc
        if spec.reference_hash != manifest.reference_hash:
            raise BundleReferenceError(
                f"{label}: reference.json has reference_hash {spec.reference_hash[:12]}…, "
                f"the manifest says {manifest.reference_hash[:12]}…", field="reference.json")
        # checked again for what the trust store says of each approver (verification
        # already refused an altered one)
        approvals = check_approvals(verified.envelope.approvals,
                                    verified.member("manifest.json"), self.trust)
        existing = self.store.get_bundle(manifest.name, manifest.version)
        if existing is not None:
            if existing.sha256 == verified.sha256:
                # (a bundle stored before approvals were kept gets its statements now)
                if approvals and self.store.add_approvals(existing.id, approvals, now):
                    self.store.audit(actor, "bundle.approve", f"bundle:{label}",
                                     {"approvals": len(approvals), "backfill": True}, now)
                return existing, False
            if existing.manifest == manifest.to_dict():
                return self._reapproved(existing, approvals, actor, now), False
            raise ConflictError(f"bundle {label} exists with other bytes (sha256 "
                                f"{existing.sha256[:12]}…); publish a new version instead")
        self.blobs.put_file(path, verified.sha256)
        signers = [{"keyid": k.keyid, "role": k.role, "name": k.name} for k in verified.signers]
        with self.store.transaction():
            record = self.store.add_bundle(
                name=manifest.name, version=manifest.version, sha256=verified.sha256,
                size=verified.size, reference_hash=spec.reference_hash,
                manifest=manifest.to_dict(), reference=raw_ref, signers=signers,
                uploaded=now, uploaded_by=actor)
            self.store.add_approvals(record.id, approvals, now)
            self.store.audit(actor, "bundle.upload", f"bundle:{label}",
                             {"sha256": verified.sha256, "size": verified.size,
                              "signers": [s["keyid"][:16] for s in signers],
                              "approvals": len(approvals)}, now)
        log.info("stored bundle %s (%d bytes) from %s", label, verified.size, actor)
        if self.on_uploaded is not None:
            try:
                self.on_uploaded(record)
            except Exception:
                log.exception("after uploading %s: folding pending summaries failed", label)
        return record, True

    def _reapproved(self, record: BundleRecord, approvals: tuple[CheckedApproval, ...],
                    actor: str, now: float) -> BundleRecord:
        """The same manifest signed again (say an approver renewed the review date): its
        new approval statements are recorded; the stored file stays the first one, so
        devices and desired states keep the sha256 they know.

        Raises:
            ConflictError: it carries no approval statement the server lacks.
        """
        with self.store.transaction():
            added = self.store.add_approvals(record.id, approvals, now)
            if not added:
                raise ConflictError(
                    f"bundle {record.label} exists with other bytes (sha256 "
                    f"{record.sha256[:12]}…): the same manifest, but no approval statement "
                    "the server does not hold already; publish a new version, or approve it "
                    "(edgepack sign --role approver)")
            self.store.audit(actor, "bundle.approve", f"bundle:{record.label}",
                             {"approvals": added, "review_by": [
                                 a.statement.review_by for a in approvals[-added:]]}, now)
        log.info("bundle %s: %d new approval(s) from %s", record.label, added, actor)
        return record

    def approvals(self, record: BundleRecord) -> list[CheckedApproval]:
        """The bundle's approval statements as checked at upload (trusted or not)."""
        return self.store.list_approvals(record.id)

    def get(self, name: str, version: str) -> BundleRecord:
        """Raises: NotFoundError: no such bundle."""
        found = self.store.get_bundle(name, version)
        if found is None:
            raise NotFoundError("bundle", f"{name}@{version}")
        return found

    def by_label(self, label: str) -> BundleRecord:
        """Raises: InvalidRequestError (not name@version), NotFoundError."""
        return self.get(*parse_label(label))

    def list(self, name: str | None = None) -> list[BundleRecord]:
        return self.store.list_bundles(name)

    def file(self, record: BundleRecord) -> Path:
        """Raises: NotFoundError: the file is gone from the bundle directory."""
        return self.blobs.path(record.sha256)

    def reference(self, bundle_id: int) -> Reference:
        """The parsed reference of a stored bundle (cached; bundles are immutable).

        Raises:
            NotFoundError: no such bundle.
        """
        with self._lock:
            found = self._refs.get(bundle_id)
            if found is not None:
                self._refs.move_to_end(bundle_id)
                return found
        record = self.store.get_bundle_by_id(bundle_id)
        if record is None:
            raise NotFoundError("bundle", str(bundle_id))
        spec, base = parse_reference(self.store.bundle_reference(bundle_id))
        ref = Reference(record, spec, base, layout_for(spec),
                        importances_of(record.manifest))
        with self._lock:
            self._refs[bundle_id] = ref
            while len(self._refs) > _CACHE_SIZE:
                self._refs.popitem(last=False)
        return ref

    def performance(self, bundle_id: int) -> BundlePerformance:
        """The performance spec and packaged metrics of a stored bundle (cached).

        Raises:
            NotFoundError: no such bundle.
        """
        with self._lock:
            found = self._perf.get(bundle_id)
            if found is not None:
                self._perf.move_to_end(bundle_id)
                return found
        record = self.store.get_bundle_by_id(bundle_id)
        if record is None:
            raise NotFoundError("bundle", str(bundle_id))
        # verified at upload: parsing it again cannot fail for a stored bundle
        manifest = Manifest.from_dict(record.manifest)
        spec = PerformanceSpec.from_manifest(manifest)
        task = manifest.task
        perf = BundlePerformance(record, spec, task, main_metric(task),
                                 expectations(record.manifest))
        with self._lock:
            self._perf[bundle_id] = perf
            while len(self._perf) > _CACHE_SIZE:
                self._perf.popitem(last=False)
        return perf
