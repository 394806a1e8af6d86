"""The fleet's alert webhook, received by ``edgepack retrain --watch --listen HOST:PORT``.

The fleet server POSTs each new alert as JSON ``{"type": "edgefleet.alert", "alert":
{...}, "sent": ...}`` with ``X-Edgefleet-Signature: sha256=<hex HMAC-SHA256 of the body>``
under the secret both sides share (``fleet serve --webhook-secret-file``;
:mod:`fleet_server.monitoring.webhook`). This module is the receiving end:

- :func:`read_alert` (pure, over bytes): checks the signature over the raw body **before**
  parsing anything (constant-time compare), then the body's shape; every refusal has its
  own type (:class:`HookSignatureError`, :class:`HookBodyError`) naming the header or
  field at fault.
- :class:`AlertInbox`: the alerts waiting for the watcher, de-duplicated by alert id (the
  server retries a delivery it thinks failed, and several servers may send one alert),
  bounded (``max_pending``, ``max_seen``), filtered by the recipe (kind, bundle, group) at
  arrival so an unrelated alert is answered ``ignored`` and never queued.
- :class:`HookServer`: a small threaded HTTP server (stdlib) on the given address: a body
  larger than ``max_body`` is refused by its ``Content-Length`` before it is read (413), a
  body without one is refused (411), a bad or missing signature is a 401, a malformed body
  a 400, each with a JSON body ``{"error": {"kind": ..., "message": ...}}``; a queued alert
  is a 202, a duplicate or an ignored one a 200.

What it deliberately does not do: start runs. The watcher (:mod:`packager.watch`) takes
alerts from the inbox on its next tick, under the same guardrails as the alerts it polls
(cooldown, ``max_per_day``, ``min_new_rows``, one run at a time), and asks the server
whether a run answered the alert already. No TLS here: bind it to loopback or put it
behind a proxy that terminates TLS; the HMAC is what authenticates the sender.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from packager.errors import PackagerError

__all__ = ["SIGNATURE_HEADER", "AlertInbox", "HookBodyError", "HookError", "HookServer",
           "HookSignatureError", "parse_listen", "read_alert"]

SIGNATURE_HEADER = "X-Edgefleet-Signature"
BODY_TYPE = "edgefleet.alert"
MAX_BODY = 64 * 1024  # an alert with its details is a few KiB
MAX_PENDING = 100  # alerts waiting for a run
MAX_SEEN = 10_000  # alert ids remembered for de-duplication


class HookError(PackagerError):
    """A webhook delivery refused (``status``: the HTTP answer)."""

    status = 400
    kind = "webhook"


class HookSignatureError(HookError):
    """The signature header is missing, malformed or does not match the body."""

    status = 401
    kind = "signature"


class HookBodyError(HookError):
    """A signed body that is not an alert (names the field)."""

    status = 400
    kind = "body"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def read_alert(body: bytes, signature: str | None, secret: bytes) -> dict[str, Any]:
    """The alert in a webhook body, once its signature is checked.

    Raises:
        HookSignatureError: no ``sha256=<hex>`` signature, or not the body's under ``secret``.
        HookBodyError: not JSON, not an ``edgefleet.alert``, or an alert without its fields.
    """
    if not signature:
        raise HookSignatureError(f"{SIGNATURE_HEADER}: missing (the fleet signs its "
                                 "webhook with --webhook-secret-file)")
    scheme, _, digest = signature.strip().partition("=")
    if scheme != "sha256" or len(digest) != 64:
        raise HookSignatureError(f"{SIGNATURE_HEADER}: not sha256=<64 hex digits>")
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, digest.lower()):
        raise HookSignatureError(f"{SIGNATURE_HEADER}: does not match the body (another "
                                 "secret, or the body was changed)")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HookBodyError(f"not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("type") != BODY_TYPE:
        raise HookBodyError(f"type: not {BODY_TYPE!r}", field="type")
    alert = doc.get("alert")
    if not isinstance(alert, dict):
        raise HookBodyError("alert: missing, or not an object", field="alert")
    if isinstance(alert.get("id"), bool) or not isinstance(alert.get("id"), int):
        raise HookBodyError("alert.id: missing, or not a whole number", field="alert.id")
    for key in ("kind", "bundle", "group"):
        if not isinstance(alert.get(key), str):
            raise HookBodyError(f"alert.{key}: missing, or not a text", field=f"alert.{key}")
    return alert


class AlertInbox:
    """Alerts received and not yet run, oldest first; thread-safe.

    ``accepts(alert)`` returns why an alert is not for this watcher (or None): such an
    alert is remembered as seen but never queued.
    """

    def __init__(self, accepts: Callable[[dict[str, Any]], str | None] = lambda _: None,
                 *, max_pending: int = MAX_PENDING, max_seen: int = MAX_SEEN) -> None:
        self.accepts = accepts
        self.max_pending, self.max_seen = max_pending, max_seen
        self._pending: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.arrived = threading.Event()  # set on each queued alert: wakes the watcher

    def offer(self, alert: dict[str, Any]) -> tuple[str, str]:
        """``(outcome, why)``: ``queued``, ``duplicate``, ``ignored`` or ``full``."""
        alert_id = int(alert["id"])
        with self._lock:
            if alert_id in self._seen:
                return "duplicate", f"alert {alert_id} was received already"
            if len(self._pending) >= self.max_pending:
                return "full", f"{self.max_pending} alerts wait for a run already"
            self._seen[alert_id] = None
            while len(self._seen) > self.max_seen:
                self._seen.popitem(last=False)
            why = self.accepts(alert)
            if why is not None:
                return "ignored", why
            self._pending[alert_id] = alert
        self.arrived.set()
        return "queued", f"alert {alert_id} waits for the watcher's next tick"

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._pending.values())

    def done(self, alert_id: int) -> None:
        """The alert has its run (or needs none): it leaves the inbox, stays seen."""
        with self._lock:
            self._pending.pop(alert_id, None)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a bind address.

    Raises:
        HookError: no port, or a port out of range.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HookError(f"--listen {text!r}: HOST:PORT (e.g. 127.0.0.1:9100)")
    return host, int(port)


class HookServer:
    """The HTTP end (see the module docstring); :meth:`start` binds, :meth:`stop` closes.
    ``port`` is the bound one (useful with port 0)."""

    def __init__(self, address: tuple[str, int], secret: bytes, inbox: AlertInbox, *,
                 max_body: int = MAX_BODY, say: Callable[[str], None] = lambda _: None
                 ) -> None:
        if not secret:
            raise HookError("the webhook receiver needs the fleet's webhook secret: an "
                            "unsigned trigger would let anyone start runs")
        outer = self
        self.inbox, self.say = inbox, say

        class Handler(BaseHTTPRequestHandler):
            server_version = "edgepack-watch"
            sys_version = ""

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                raw = json.dumps(doc, sort_keys=True).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _refuse(self, status: int, kind: str, message: str) -> None:
                outer.say(f"webhook refused ({status}): {message}")
                self.close_connection = True
                self._answer(status, {"error": {"kind": kind, "message": message}})

            def do_POST(self) -> None:
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._refuse(411, "length", "Content-Length: required")
                    return
                if int(length) > max_body:
                    self._refuse(413, "size", f"body of {length} bytes: more than "
                                              f"{max_body}")
                    return
                body = self.rfile.read(int(length))
                try:
                    alert = read_alert(body, self.headers.get(SIGNATURE_HEADER), secret)
                except HookError as exc:
                    self._refuse(exc.status, exc.kind, str(exc))
                    return
                outcome, why = outer.inbox.offer(alert)
                if outcome == "full":
                    self._refuse(503, "full", why)
                    return
                outer.say(f"webhook: alert {alert['id']} ({alert['kind']}): {outcome}")
                self._answer(202 if outcome == "queued" else 200,
                             {"status": outcome, "alert": alert["id"], "why": why})

            def do_GET(self) -> None:
                self._refuse(405, "method", "POST the fleet's alert webhook here")

        self._httpd = ThreadingHTTPServer(address, Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edgepack-hook",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
