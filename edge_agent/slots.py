"""Installed bundles on the device's disk, and which one is live: crash-safe by construction.

Layout under the data directory::

    bundles/<sha256>.edgebundle   verified bundle files, named by their content
    state.json                    {"active", "previous", "shadow", "revision", "failed"}
    .verify-*/members/            a bundle's members while it is verified and loaded
                                  (see :attr:`Slots.work_dir`; removed after, and at start)

A bundle file is written to a temporary name, fsynced, then renamed; ``state.json`` is
replaced the same way (write, fsync, rename, fsync the directory). Switching models is
the one rename of ``state.json``, so a crash at any point leaves either the old state or
the new one, never half of each: a crash mid-install leaves the old model active after
restart, and the half-written download is a temporary file that the next start removes.

Files are kept for the active, the previous and the shadow bundle (the previous one is
what makes a rollback instant and download-free); everything else is removed after a
switch. Every bundle is verified again when it is loaded (see the daemon): the disk is
not trusted.

This module knows files and names only: it does not verify, load or download bundles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_agent.errors import SlotError
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.wire import Fields, canonical_json, parse_json

__all__ = ["SlotError", "Slots", "State"]

log = logging.getLogger(__name__)

STATE_SCHEMA = 1
_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
MAX_FAILED = 32  # remembered failed installs (by sha256), oldest forgotten first


@dataclass(frozen=True)
class State:
    """What is installed. ``revision`` is the last desired-state revision acted upon."""

    active: BundleRef | None = None
    previous: BundleRef | None = None
    shadow: BundleRef | None = None
    revision: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # sha256 -> reason

    def to_dict(self) -> dict[str, Any]:
        def ref(r: BundleRef | None) -> dict[str, Any] | None:
            return None if r is None else {"name": r.name, "version": r.version,
                                           "sha256": r.sha256, "size": r.size}

        return {"schema": STATE_SCHEMA, "active": ref(self.active),
                "previous": ref(self.previous), "shadow": ref(self.shadow),
                "revision": self.revision, "failed": dict(self.failed)}

    @classmethod
    def from_dict(cls, obj: Any) -> State:
        f = Fields(obj, "state.json")
        if f.int("schema") != STATE_SCHEMA:
            raise f.bad("schema", f"unsupported state schema (expected {STATE_SCHEMA})")

        def ref(key: str) -> BundleRef | None:
            raw = f.raw(key)
            if raw is None:
                return None
            out = BundleRef.from_dict({**raw, "url": ""} if isinstance(raw, dict) else raw,
                                      f"state.json.{key}")
            if not _SHA_RE.match(out.sha256):
                raise f.bad(key, "needs the bundle's sha256")
            return out

        failed = f.mapping("failed")
        if not all(_SHA_RE.match(k) and isinstance(v, str) for k, v in failed.items()):
            raise f.bad("failed", "maps sha256 to a reason")
        out = cls(ref("active"), ref("previous"), ref("shadow"), f.int("revision"), failed)
        f.done()
        return out

    def with_failure(self, sha256: str, reason: str) -> State:
        failed = {k: v for k, v in self.failed.items() if k != sha256}
        failed[sha256] = reason[:500]
        while len(failed) > MAX_FAILED:
            del failed[next(iter(failed))]
        return replace(self, failed=failed)


class Slots:
    """The bundle files and ``state.json`` in ``root``.

    Raises:
        SlotError: ``root`` cannot be created or ``state.json`` is unreadable or corrupt
            (a corrupt state is moved aside as ``state.json.corrupt`` and reported, so the
            agent can start from nothing rather than not at all).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        try:
            self.bundles.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise SlotError(f"{self.root}: cannot use as data directory ({exc.strerror})") \
                from exc
        self.state_path = self.root / "state.json"
        self.recovered: str | None = None  # why a corrupt state was set aside, if it was
        for stale in self.bundles.glob(".tmp-*"):  # a download cut short by a crash
            stale.unlink(missing_ok=True)
        for stale in self.root.glob(".verify-*"):  # members of a load cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        self.state = self._read_state()

    def _read_state(self) -> State:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise SlotError(f"{self.state_path}: cannot read ({exc.strerror})") from exc
        try:
            return State.from_dict(parse_json(raw, what="state.json", max_bytes=1 << 20))
        except SchemaError as exc:
            aside = self.state_path.with_suffix(".json.corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.state_path, aside)
            self.recovered = f"{self.state_path} was corrupt ({exc}); moved to {aside}"
            log.error("%s", self.recovered)
            return State()

    # -- bundle files ------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise SlotError(f"{sha256[:80]!r} is not a sha256")
        return self.bundles / f"{sha256}.edgebundle"

    def has(self, sha256: str) -> bool:
        return bool(sha256) and _SHA_RE.match(sha256) is not None and self.path(sha256).is_file()

    @property
    def work_dir(self) -> Path:
        """Where bundles are verified into (a directory per load): the device's own disk,
        not a tmpfs that would hold a large model in memory."""
        return self.root

    def file(self, sha256: str) -> Path:
        """The file of a kept bundle.

        Raises:
            SlotError: not a sha256, or no such file.
        """
        path = self.path(sha256)
        if not path.is_file():
            raise SlotError(f"{path}: no such bundle file")
        return path

    def read(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except OSError as exc:
            raise SlotError(f"{self.path(sha256)}: cannot read ({exc.strerror})") from exc

    def temp_file(self) -> tuple[int, Path]:
        """A new temporary file in the bundles directory (fd, path) for a download."""
        try:
            fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.bundles)
        except OSError as exc:
            raise SlotError(f"{self.bundles}: cannot create a file ({exc.strerror})") from exc
        return fd, Path(name)

    def store(self, sha256: str, data: bytes | None = None, *, temp: Path | None = None) -> Path:
        """Keep a bundle under its sha256: from bytes, or by renaming a finished temp file.

        Raises:
            SlotError: the disk refused (full, read-only).
        """
        target = self.path(sha256)
        try:
            if temp is None:
                fd, temp = self.temp_file()
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data or b"")
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(temp, target)
            _fsync_dir(self.bundles)
        except OSError as exc:
            if temp is not None:
                temp.unlink(missing_ok=True)
            raise SlotError(f"{target}: cannot store the bundle ({exc.strerror})") from exc
        return target

    # -- state -----------------------------------------------------------------------

    def commit(self, state: State) -> None:
        """Replace ``state.json`` atomically and durably, then drop unreferenced bundles.

        Raises:
            SlotError: the state could not be written (the old state stays in force).
        """
        data = canonical_json(state.to_dict())
        try:
            fd, name = tempfile.mkstemp(prefix=".state-", dir=self.root)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(name, self.state_path)
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
            _fsync_dir(self.root)
        except OSError as exc:
            raise SlotError(f"{self.state_path}: cannot write ({exc.strerror})") from exc
        self.state = state
        self._collect(r.sha256 for r in (state.active, state.previous, state.shadow)
                      if r is not None)

    def _collect(self, keep: Iterable[str]) -> None:
        wanted = {f"{sha}.edgebundle" for sha in keep}
        for path in self.bundles.glob("*.edgebundle"):
            if path.name not in wanted:
                with contextlib.suppress(OSError):
                    path.unlink()

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.bundles.glob("*.edgebundle"))


def _fsync_dir(path: Path) -> None:
    # the rename is durable only once the directory entry is on disk
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
