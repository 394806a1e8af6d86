"""Shared pieces for the agent tests: a bundle file server over real HTTP, configs, waits.

:class:`BundleServer` is the fleet server's download endpoint as the agent sees it:
``GET /api/v1/bundles/{name}/{version}/download`` with a bearer token, over real HTTP on a
free loopback port. It serves real bundle files; a test can make it serve altered bytes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgefleet.contract.messages import BundleRef
from edgefleet.contract.wire import sha256_hex

__all__ = ["BundleServer", "wait_until", "write_config"]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class BundleServer:
    """Serves bundle files by name@version to requests carrying ``token``."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.stall = threading.Event()  # set: send half a body, then wait for release
        self.release = threading.Event()
        self.files: dict[tuple[str, str], bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                parts = self.path.strip("/").split("/")
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self.send_error(401)
                    return
                if len(parts) != 6 or parts[:3] != ["api", "v1", "bundles"]:
                    self.send_error(404)
                    return
                body = outer.files.get((parts[3], parts[4]))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.stall.is_set():
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    outer.release.wait(30)
                    return
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def add(self, path: Path, *, body: bytes | None = None) -> BundleRef:
        """Serve the bundle at ``path`` (or ``body`` instead); the ref a desired state names.

        The ref carries the sha256 and size of the *real* file, so serving altered ``body``
        bytes is a tampered download.
        """
        from edgefleet.contract.bundle import read_unverified

        data = path.read_bytes()
        manifest = read_unverified(data).manifest
        self.files[(manifest.name, manifest.version)] = data if body is None else body
        return BundleRef(manifest.name, manifest.version, sha256_hex(data),
                         f"/api/v1/bundles/{manifest.name}/{manifest.version}/download",
                         len(data))

    def add_bytes(self, name: str, version: str, data: bytes) -> BundleRef:
        """Serve ``data`` as ``name@version`` as it is (a hostile bundle no reader parses
        here); the ref carries its true sha256 and size, so the download itself passes."""
        self.files[(name, version)] = data
        return BundleRef(name, version, sha256_hex(data),
                         f"/api/v1/bundles/{name}/{version}/download", len(data))

    def downloads(self) -> int:
        return sum(1 for r in self.requests if r.endswith("/download"))

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def write_config(directory: Path, *, device: str, broker, password: str, trust: list[str],
                 server_url: str = "", **agent: object) -> Path:
    """An agent.toml for ``device`` against ``broker`` (a tests.broker.Mosquitto)."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "secret"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    window = {k: agent.pop(k) for k in ("seconds", "rows", "checkpoint_seconds") if k in agent}
    lines = [
        "[device]", f'id = "{device}"', 'labels = { site = "test", line = "1" }', "",
        "[broker]", f'host = "{broker.host}"', f"port = {broker.port}",
        f'password_file = "{secret}"', "reconnect_max_delay = 0.5", "",
        "[trust]", "keys = [" + ", ".join(f'"{t}"' for t in trust) + "]", "",
    ]
    if server_url:
        lines += ["[server]", f'url = "{server_url}"', ""]
    lines += ["[window]", *(f"{k} = {v}" for k, v in window.items()), ""]
    lines += ["[agent]", f'data_dir = "{directory / "data"}"']
    for key, value in agent.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Recorder:
    """The fleet side of the broker in agent tests: a paho client as the ``server`` account
    that records every decoded device message and publishes retained desired states, and
    (``acks=True``) acknowledges summaries and reports as the fleet server's ingest does:
    the highest sequence up to which every one was received or lies below a floor."""

    def __init__(self, broker, password: str, user: str = "server", acks: bool = True) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.acks = acks
        self._seqs: dict[tuple[str, str], set[int]] = {}
        self._acked: dict[str, dict[str, int]] = {}
        self.messages: list = []
        self.raw: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"recorder-{id(self)}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.on_connect = lambda c, u, f, r, p: (
            None if r.is_failure else c.subscribe("edgefleet/v1/+/#", qos=1))
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "recorder did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        from edgefleet.contract.errors import SchemaError
        from edgefleet.contract.messages import decode

        with self._lock:
            self.raw.append((message.topic, bytes(message.payload)))
            with contextlib.suppress(SchemaError):
                decoded = decode(message.topic, bytes(message.payload))
                self.messages.append(decoded)
                if self.acks:
                    self._ack(decoded)

    def _ack(self, msg) -> None:
        from edgefleet.contract.messages import Ack, Report, Summary, encode, topic

        if not isinstance(msg, (Summary, Report)):
            return
        seqs = self._seqs.setdefault((msg.device, msg.kind), set())
        seqs.add(msg.seq)
        acked = self._acked.setdefault(msg.device, {})
        upto = max(acked.get(msg.kind, 0), msg.floor - 1)
        while upto + 1 in seqs:
            upto += 1
        acked[msg.kind] = upto
        # from paho's own thread: publish() only queues the packet
        self.client.publish(topic(msg.device, "ack"), encode(Ack(msg.device, dict(acked))),
                            qos=1, retain=True)

    def of(self, kind: type) -> list:
        with self._lock:
            return [m for m in self.messages if isinstance(m, kind)]

    def desire(self, device: str, revision: int, bundle=None, shadow=None,
               allow_downgrade: bool = False) -> None:
        from edgefleet.contract.messages import DesiredState, encode, topic

        message = DesiredState(device, revision, bundle, shadow, allow_downgrade)
        info = self.client.publish(topic(device, "desired"), encode(message), qos=1, retain=True)
        info.wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
