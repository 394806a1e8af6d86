"""Bundle downloads over real HTTP: bounded, digest-checked, token-carrying, no redirects."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_agent.download import (
    DownloadDigestError,
    Downloader,
    DownloadTooLargeError,
    TransferError,
)
from edgefleet.contract.wire import sha256_hex

BODY = os.urandom(100_000)
TOKEN = "efd_secret-token-123"


@pytest.fixture(scope="module")
def server():
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(401)
            elif self.path == "/ok":
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)
            elif self.path == "/no-length":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(BODY)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://example.com/steal")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/boom":
                self.send_error(503)
            else:
                self.send_error(404)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def fetch(downloader: Downloader, path: str, tmp_path, **kwargs) -> bytes:
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    downloader.fetch(path, fd, **kwargs)
    return target.read_bytes()


def test_a_good_download(server, tmp_path):
    got = fetch(Downloader(server, TOKEN), "/ok", tmp_path, sha256=sha256_hex(BODY),
                size=len(BODY))
    assert got == BODY


@pytest.mark.parametrize(("path", "kwargs", "error", "retryable"), [
    pytest.param("/ok", {"sha256": "0" * 64}, DownloadDigestError, False, id="wrong-digest"),
    pytest.param("/ok", {"sha256": sha256_hex(BODY), "size": len(BODY) + 1},
                 DownloadDigestError, False, id="shorter-than-announced"),
    pytest.param("/ok", {"sha256": sha256_hex(BODY), "size": len(BODY) - 1},
                 DownloadTooLargeError, False, id="content-length-past-the-size"),
    pytest.param("/no-length", {"sha256": sha256_hex(BODY), "size": 1000},
                 DownloadTooLargeError, False, id="streams-past-the-size"),
    pytest.param("/missing", {"sha256": ""}, TransferError, False, id="404"),
    pytest.param("/boom", {"sha256": ""}, TransferError, True, id="503-is-retryable"),
    pytest.param("/redirect", {"sha256": ""}, TransferError, False, id="redirect-not-followed"),
])
def test_refused_downloads(server, tmp_path, path, kwargs, error, retryable):
    with pytest.raises(error) as info:
        fetch(Downloader(server, TOKEN), path, tmp_path, **kwargs)
    assert info.value.retryable == retryable
    assert TOKEN not in str(info.value)


def test_the_limit_bounds_a_download_without_a_size(server, tmp_path):
    with pytest.raises(DownloadTooLargeError):
        fetch(Downloader(server, TOKEN, max_bytes=10_000), "/no-length", tmp_path, sha256="")


def test_wrong_token_is_not_retryable(server, tmp_path):
    with pytest.raises(TransferError, match="401") as info:
        fetch(Downloader(server, "wrong"), "/ok", tmp_path, sha256="")
    assert not info.value.retryable


def test_nobody_listening_is_retryable(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferError) as info:
        fetch(Downloader(f"http://127.0.0.1:{port}", TOKEN, timeout_s=2), "/ok", tmp_path,
              sha256="")
    assert info.value.retryable


@pytest.mark.parametrize(("base", "url", "want"), [
    ("http://h:1", "/api/v1/x", "http://h:1/api/v1/x"),
    ("http://h:1/fleet", "/api/v1/x", "http://h:1/fleet/api/v1/x"),
    ("", "https://other/x", "https://other/x"),
])
def test_urls_resolve_against_the_server(base, url, want):
    assert Downloader(base, TOKEN).resolve(url) == want


@pytest.mark.parametrize(("base", "url"), [("", "/relative"), ("http://h", "file:///etc/passwd"),
                                           ("http://h", "ftp://h/x")])
def test_bad_urls(base, url):
    with pytest.raises(TransferError):
        Downloader(base, TOKEN).resolve(url)


def test_the_token_is_not_in_repr():
    assert TOKEN not in repr(Downloader("http://h", TOKEN))
