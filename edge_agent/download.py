"""Fetch a bundle over HTTP(S) into a file, bounded in size and checked against its sha256.

The agent downloads only what its desired state names, from its fleet server, with its
device token. The body is streamed to a temporary file while its sha256 is computed; it
is refused (and the file removed) as soon as it passes the size limit, and at the end if
its length or digest differs from the desired state's. Only then does the caller verify
its signatures, which happens on the bytes, before anything inside is parsed.

Errors:

    EdgefleetError
    └── DownloadError               the download did not produce the bundle it should
        ├── TransferError           network, TLS or HTTP status; ``retryable`` says whether
        │                           trying again later can help (timeouts, 5xx: yes; 404: no)
        ├── DownloadTooLargeError   larger than the limit or than the size announced
        └── DownloadDigestError     the bytes are not the bundle the desired state named

Only ``http`` and ``https`` URLs are fetched, and redirects are not followed (a device
token must go to the fleet server and nowhere else). The token is never logged.

This module does not verify signatures, install or retry: the daemon decides that.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import (
    DownloadDigestError,
    DownloadError,
    DownloadTooLargeError,
    TransferError,
)

__all__ = ["DownloadDigestError", "DownloadError", "DownloadTooLargeError", "Downloader",
           "TransferError"]

_CHUNK = 64 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a 3xx then surfaces as an HTTPError: refused below


@dataclass(frozen=True)
class Downloader:
    """Downloads from ``base_url`` with ``token`` as a bearer token."""

    base_url: str
    token: str = field(repr=False)
    max_bytes: int = 256 * 1024 * 1024
    timeout_s: float = 60.0
    ca_file: Path | None = None

    def resolve(self, url: str) -> str:
        """An absolute URL: relative ones are resolved against ``base_url``.

        Raises:
            TransferError: not http(s), or relative with no ``base_url`` configured.
        """
        if url.startswith(("http://", "https://")):
            full = url
        elif not self.base_url:
            raise TransferError(f"{url!r} is relative and no server.url is configured",
                                retryable=False)
        else:
            full = urllib.parse.urljoin(self.base_url + "/", url.lstrip("/"))
        if urllib.parse.urlsplit(full).scheme not in ("http", "https"):
            raise TransferError(f"{full!r}: only http and https are fetched", retryable=False)
        return full

    def fetch(self, url: str, fd: int, *, sha256: str, size: int = 0) -> int:
        """Stream ``url`` into the open file ``fd`` (which it closes); return the length.

        Raises:
            TransferError: the request failed (``retryable`` tells whether to try later).
            DownloadTooLargeError: past ``max_bytes`` or the announced ``size``.
            DownloadDigestError: the sha256 or the length differs from the desired state's.
        """
        full = self.resolve(url)
        limit = min(self.max_bytes, size) if size else self.max_bytes
        request = urllib.request.Request(full, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/octet-stream",
            "User-Agent": "edge-agent"})
        handlers: list = [_NoRedirect()]
        if full.startswith("https://"):
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        opener = urllib.request.build_opener(*handlers)
        digest = hashlib.sha256()
        total = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with opener.open(request, timeout=self.timeout_s) as response:
                    announced = response.headers.get("Content-Length")
                    if announced and announced.isdigit() and int(announced) > limit:
                        raise DownloadTooLargeError(
                            f"{full}: {int(announced)} bytes announced; the limit is {limit}")
                    while True:
                        chunk = response.read(_CHUNK)
                        if not chunk:
                            break
                        total += len(chunk)
                        if total > limit:
                            raise DownloadTooLargeError(
                                f"{full}: more than {limit} bytes; download stopped")
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                code = exc.code
                raise TransferError(f"{full}: HTTP {code} {exc.reason}",
                                    retryable=code >= 500 or code in (408, 429)) from exc
            except urllib.error.URLError as exc:
                raise TransferError(f"{full}: {exc.reason}", retryable=True) from exc
            except (http.client.HTTPException, OSError) as exc:  # timeouts, resets, TLS
                raise TransferError(f"{full}: {type(exc).__name__}: {exc}",
                                    retryable=True) from exc
            out.flush()
            os.fsync(out.fileno())
        if size and total != size:
            raise DownloadDigestError(f"{full}: {total} bytes, the desired state says {size}")
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise DownloadDigestError(f"{full}: sha256 {got[:16]}… is not the desired "
                                      f"{sha256[:16]}… (altered or the wrong file)")
        return total
