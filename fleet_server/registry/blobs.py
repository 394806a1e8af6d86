"""Bundle files on disk, content-addressed: ``<root>/<sha256>.edgebundle``.

Bundles can be hundreds of megabytes, so they are files beside the database rather than
BLOBs in it: a download streams from the file, and a larger deployment can move this
directory to object storage without touching the store. A file is written to a temporary
name, fsynced, and renamed into place, so a reader never sees a partial bundle; the same
bytes uploaded twice are one file.

This module does not verify bundles (:mod:`fleet_server.registry.bundles` does, before calling
:meth:`BlobStore.put`) and does not know names or versions.
"""

from __future__ import annotations

import hashlib
import os
import re
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

    def put(self, data: bytes) -> str:
        """Store bytes; return their sha256. Idempotent.

        Raises:
            StoreError: the file cannot be written (disk full, permissions).
        """
        sha = hashlib.sha256(data).hexdigest()
        final = self.root / f"{sha}.edgebundle"
        if final.is_file() and final.stat().st_size == len(data):
            return sha
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"{final}: cannot write bundle ({exc.strerror})") from exc
        return sha
