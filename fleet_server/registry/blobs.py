"""Bundle files on disk, content-addressed: ``<root>/<sha256>.edgebundle``.

Bundles can be hundreds of megabytes, so they are files beside the database rather than
BLOBs in it: a download streams from the file, and a larger deployment can move this
directory to object storage without touching the store. A file is written to a temporary
name, fsynced, and renamed into place, so a reader never sees a partial bundle; the same
bytes uploaded twice are one file.

An upload is streamed to a temporary file here (:meth:`BlobStore.temp_file`), verified
from that file, and moved into place (:meth:`BlobStore.put_file`) only once it passed: no
byte that was not verified is ever stored, and no upload is held in memory.

This module does not verify bundles (:mod:`fleet_server.registry.bundles` does, before calling
:meth:`BlobStore.put_file`) and does not know names or versions.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from fleet_server.errors import NotFoundError, StoreError

__all__ = ["BlobStore"]

_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot create the bundle directory "
                             f"({exc.strerror})") from exc
        # what a crash left behind: half-received uploads and half-verified members
        for stale in self.root.glob(".upload-*.part"):
            stale.unlink(missing_ok=True)
        for stale in self.root.glob(".verify-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @property
    def work_dir(self) -> Path:
        """Where uploads are verified into (one directory each, removed after)."""
        return self.root

    def temp_file(self) -> tuple[int, Path]:
        """A new temporary file (fd, path) beside the blobs, for an upload in progress.

        Raises:
            StoreError: the directory refused (full, permissions).
        """
        try:
            fd, name = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".part")
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot create a file ({exc.strerror})") from exc
        return fd, Path(name)

    def put_file(self, path: Path, sha256: str) -> str:
        """Move a finished file (from :meth:`temp_file`) into place as blob ``sha256``.

        The caller computed ``sha256`` while verifying the file; the file is consumed.
        Idempotent: if the blob exists, the file is removed.

        Raises:
            StoreError: the file cannot be moved (disk full, permissions).
        """
        if not _SHA_RE.match(sha256):
            raise StoreError(f"{sha256[:80]!r} is not a sha256")
        final = self.root / f"{sha256}.edgebundle"
        try:
            if final.is_file():
                path.unlink(missing_ok=True)
                return sha256
            with path.open("rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(path, 0o644)
            os.replace(path, final)
        except OSError as exc:
            raise StoreError(f"{final}: cannot store bundle ({exc.strerror})") from exc
        return sha256

    def path(self, sha256: str) -> Path:
        """The file of a stored blob.

        Raises:
            NotFoundError: no such blob (or not a sha256).
        """
        if not _SHA_RE.match(sha256):
            raise NotFoundError("bundle file", sha256)
        path = self.root / f"{sha256}.edgebundle"
        if not path.is_file():
            raise NotFoundError("bundle file", sha256)
        return path
