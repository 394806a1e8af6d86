"""A small HTTP client of the fleet server's REST API (what the ``fleet`` CLI uses).

Every non-2xx answer becomes a :class:`ClientError` carrying the server's own error type
and message (``{"error": {"type", "message"}}``), so the CLI can print it as one line;
network failures become a :class:`ClientError` naming the server URL. The token goes in
``Authorization: Bearer`` and is never logged or shown.

This module knows the API's paths only through the calls the CLI makes; it has no
retry logic (a human or a script decides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from fleet_server.errors import ClientError

__all__ = ["ClientError", "FleetClient"]


class FleetClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"User-Agent": "edgefleet-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Raises: ClientError: unreachable, or a non-2xx answer (the server's message)."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.base_url}: {exc}") from exc
        if response.is_success:
            return response
        raise self._refusal(response)

    def _refusal(self, response: httpx.Response) -> ClientError:
        kind, message = "HTTPError", response.text[:500] or response.reason_phrase
        try:
            body = response.json()
            kind, message = body["error"]["type"], body["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        if response.status_code == 401:  # say where a token comes from
            message += " (pass --token or set FLEET_TOKEN; `fleet token create` makes one)"
        return ClientError(f"{message} ({kind}, HTTP {response.status_code})",
                           status=response.status_code, kind=kind)

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body).json()

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def upload(self, path: Path) -> tuple[int, Any]:
        """Upload a bundle file; returns (status, bundle)."""
        with path.open("rb") as fh:
            response = self.request("POST", "/api/v1/bundles", content=fh.read(),
                                    headers={"Content-Type": "application/octet-stream"})
        return response.status_code, response.json()

    def upload_outcomes(self, path: Path, content_type: str) -> Any:
        """Stream an outcomes file (CSV, JSON lines or JSON) to ``POST /api/v1/outcomes``;
        returns what was queued."""
        with path.open("rb") as fh:
            # the answer comes after the whole upload is checked and queued: a large one
            # may take longer than an ordinary call
            return self.request("POST", "/api/v1/outcomes", content=_chunks(fh),
                                headers={"Content-Type": content_type},
                                timeout=httpx.Timeout(self._http.timeout.connect,
                                                      read=600.0, write=60.0, pool=30.0)
                                ).json()


    def download_lines(self, path: str, out: Any, **params: Any) -> int:
        """Stream a JSON-lines answer into the binary file ``out``; returns the lines.

        Raises: ClientError: unreachable, or a non-2xx answer (the server's message)."""
        clean = {k: v for k, v in params.items() if v is not None}
        lines = 0
        try:
            with self._http.stream("GET", path, params=clean,
                                   timeout=httpx.Timeout(self._http.timeout.connect,
                                                         read=600.0)) as response:
                if not response.is_success:
                    response.read()
                    raise self._refusal(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    lines += chunk.count(b"\n")
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.base_url}: {exc}") from exc
        return lines


def _chunks(fh: Any, size: int = 256 * 1024) -> Any:
    """A file as an iterator of chunks: httpx streams it (chunked), never reading it whole."""
    while chunk := fh.read(size):
        yield chunk
