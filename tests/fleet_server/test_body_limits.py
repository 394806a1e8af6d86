"""Request bodies are bounded before they are read: a real ``fleet serve`` process, raw
HTTP/1.1 over a socket (so a test can declare 1 GiB and send nothing, send chunks, or
hang up half way), and the server's own RSS from /proc.

The guard's table (:func:`fleet_server.api.guard.body_limit`) is checked as a pure
function too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fleet_server.api.guard import DEFAULT_BODY_LIMIT, BodyLimit, body_limit
from fleet_server.registry.auth import Auth
from fleet_server.store import Store
from tests.broker import free_port
from tests.fleet_server.conftest import wait_until

GIB = 1024 ** 3
MIB = 1024 ** 2
JSON_LIMIT = MIB  # ServerConfig.max_request_bytes, the default
UPLOAD_LIMIT = MIB  # --max-upload-mb 1 below
FORM_LIMIT = 4096  # fleet_server.dashboard.MAX_FORM_BYTES


# --------------------------------------------------------------------------- the table

TABLE = (BodyLimit("/api/v1/bundles", 100, frozenset({"POST"})), BodyLimit("/api/", 10),
         BodyLimit("/login", 5))


@pytest.mark.parametrize(("method", "path", "want"), [
    ("POST", "/api/v1/bundles", 100),
    ("PUT", "/api/v1/bundles", 10),  # the upload rule is POST only
    ("POST", "/api/v1/bundles/x/1.0.0", 10),  # exact, not a prefix
    ("POST", "/api/v1/groups", 10),
    ("DELETE", "/api/v1/devices/d", 10),
    ("POST", "/login", 5),
    ("POST", "/login/x", DEFAULT_BODY_LIMIT),
    ("POST", "/logout", DEFAULT_BODY_LIMIT),
    ("POST", "/apix", DEFAULT_BODY_LIMIT),
], ids=lambda v: str(v))
def test_body_limit_table(method, path, want):
    assert body_limit(method, path, TABLE) == want


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError, match="limit"):
        BodyLimit("/api/", -1)


# --------------------------------------------------------------------------- a real server


@dataclass
class Served:
    port: int
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """One server for the module (each test reads only the log lines after its start)."""
    tmp_path = tmp_path_factory.mktemp("serve")
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        token = Auth(store).create_token("op", "operator", "test", time.time()).secret
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet_server.cli", "serve", "--db", str(db), "--port",
             str(port), "--max-upload-mb", "1"], stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=os.environ.copy(),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    served = Served(port, token, proc, log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "fleet serve to answer")
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and the raw rest of one response (read until the server closes)."""
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12]), data


CASES = [
    ("groups-no-token", "/api/v1/groups", {}, (401,)),
    ("devices-no-token", "/api/v1/devices", {}, (401,)),
    ("devices-bad-token", "/api/v1/devices", {"Authorization": "Bearer efo_nope"}, (401,)),
    ("bundles-no-token", "/api/v1/bundles", {}, (401,)),
    ("login", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, (413,)),
    ("groups-operator", "/api/v1/groups", "operator", (413,)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "path", "headers", "statuses"), CASES,
                         ids=[c[0] for c in CASES])
def test_a_declared_gigabyte_is_answered_at_once_unread(served, case, path, headers,
                                                        statuses):
    """The head alone, no body byte sent: the answer comes anyway, so nothing waited for
    (or read) the body."""
    if headers == "operator":  # a known operator: past the credential, still bounded
        headers = {"Authorization": f"Bearer {served.token}"}
    with served.connect() as sock:
        sock.sendall(head("POST", path, {**headers, "Content-Length": str(GIB)}))
        status, raw = read_response(sock)
    assert status in statuses, raw[:500]
    assert b"connection: close" in raw.lower()
    assert b'"error"' in raw or status == 413  # the API's JSON error body


@pytest.mark.slow
def test_strangers_flooding_bodies_leave_the_server_rss_flat(served):
    """Each stranger sends up to 256 MiB behind its declared 1 GiB, as fast as the server
    takes it: the server answers and closes, and its memory does not grow."""
    before = served.rss()
    chunk = bytes(MIB)
    sent_total = 0
    for _, path, headers, _ in CASES:
        if headers == "operator":
            continue  # strangers only
        with served.connect() as sock:
            sock.sendall(head("POST", path, {**headers, "Content-Length": str(GIB)}))
            sent = 0
            try:
                while sent < 256 * MIB:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            sent_total += sent
            assert sent < 64 * MIB, f"{path}: the server took {sent >> 20} MiB of the body"
    after = served.rss()
    grew = (after - before) / MIB
    print(f"server RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB "
          f"({sent_total / MIB:.0f} MiB pushed by strangers)")
    assert grew < 20, f"server RSS grew {grew:.1f} MiB"


def _chunked(total: int, size: int = 64 * 1024) -> bytes:
    out, left = [], total
    while left > 0:
        n = min(size, left)
        out.append(b"%x\r\n" % n + b"{" * n + b"\r\n")
        left -= n
    return b"".join(out) + b"0\r\n\r\n"


@pytest.mark.slow
@pytest.mark.parametrize(("path", "limit", "content_type"), [
    ("/api/v1/groups", JSON_LIMIT, "application/json"),
    ("/api/v1/bundles", UPLOAD_LIMIT, "application/octet-stream"),
    ("/login", FORM_LIMIT, "application/x-www-form-urlencoded"),
], ids=["json", "upload", "login-form"])
def test_a_chunked_body_past_the_limit_is_cut_with_413(served, path, limit, content_type):
    headers = {"Authorization": f"Bearer {served.token}", "Content-Type": content_type,
               "Transfer-Encoding": "chunked"}
    with served.connect() as sock:
        sock.sendall(head("POST", path, headers) + _chunked(limit + 64 * 1024))
        status, raw = read_response(sock)
    assert status == 413, raw[:500]
    assert b'"PayloadTooLargeError"' in raw and str(limit).encode() in raw
    # the control: a chunked body within the limit is read and judged on its merits
    with served.connect() as sock:
        body = b'{"name": "g-%d", "selector": {"site": "a"}}' % (limit + len(path))
        sock.sendall(head("POST", "/api/v1/groups", {**headers, "Connection": "close",
                                                     "Content-Type": "application/json"})
                     + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        status, raw = read_response(sock)
    assert status == 201, raw[:500]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "declared", "content_type"), [
    ("/api/v1/groups", 512 * 1024, "application/json"),
    ("/api/v1/bundles", 900 * 1024, "application/octet-stream"),
    ("/login", 3000, "application/x-www-form-urlencoded"),
], ids=["json", "upload", "login-form"])
def test_a_client_hanging_up_mid_body_leaves_one_log_line(served, path, declared,
                                                          content_type):
    start = len(served.lines())
    with served.connect() as sock:
        sock.sendall(head("POST", path, {"Authorization": f"Bearer {served.token}",
                                         "Content-Type": content_type,
                                         "Content-Length": str(declared)}))
        sock.sendall(b"{" * min(100 * 1024, declared // 2))
    # gone; the server notices on its next read

    def logged() -> list[str]:
        return [line for line in served.lines()[start:] if "disconnected" in line]

    wait_until(lambda: len(logged()) >= 1, 30, "the disconnect to be logged")
    # a barrier: a later request answered means the first one is finished with
    assert httpx.get(f"http://127.0.0.1:{served.port}/health", timeout=10).status_code == 200
    new = served.lines()[start:]
    assert len(new) == 1, "\n".join(new)
    assert f"POST {path}" in new[0] and f"of {declared} body bytes" in new[0]
    assert "Traceback" not in served.log.read_text()
