"""The agent's local HTTP endpoint, for apps on the device that do not embed the library.

Standard library only (``http.server``): a device should not carry a web framework for two
routes. It listens on 127.0.0.1 by default; it is not an internet-facing server.

    POST /predict   {"rows": [{feature: value, ...}, ...], "ids"?: [id, ...]}
                    or  {"row": {...}, "id"?: id}
                    (rows may also be lists in schema order; ids are the caller's own
                    prediction ids, one per row, else the agent makes them)
                    → 200 {"bundle": "name@version", "predictions": [{"id": ..,
                       "label": .., "probabilities": {class: p, ..}} | {"id": ..,
                       "value": ..}, ...]}; a row with a category training never saw
                       is served and its answer says so: "unseen": [feature, ...]
                    (for "row": {"bundle": .., "prediction": {...}})
    POST /explain   {"row": {...}} → 200 {"bundle", "method", "why", "baseline", "score",
                       "value", "baseline_value", "prediction", "contributions": [
                       {"feature", "value", "baseline", "contribution"}, ...]}
                    (:mod:`edge_agent.explain`; the same errors as /predict)
    POST /outcomes  {"outcomes": [{"id": prediction id, "label": true label}, ...]}
                    (at most MAX_OUTCOMES_PER_CALL; all applied or none)
                    → 200 {"counts": {"joined": n, "unknown": n, "expired": n,
                       "duplicate": n, "bad_label": 0}}
    GET  /health    → 200 (serving) or 503 (no model yet) with the agent's health

Errors are JSON ``{"error": {"type", "message", "feature"?, "row"?, "field"?, "id"?}}``
with 400 for a refused input (naming the feature), bad prediction ids (``field`` "ids" and
the ``row``), a malformed outcome (``field``) or a label outside the bundle's classes
(type ``OutcomeLabelError``, naming the ``id``; nothing of the call is applied) or a body
that is not JSON (type ``NotJson``), 413 for a body over the limit, 404/405 for other paths
and methods, 503 when no model is installed (or no prediction store keeps predictions for
outcomes) and 500 when the model fails at run time. A request can never take the agent
down: every handler error becomes a 500 and is logged.

This module does not validate rows itself (the agent does) and never serves outside the
host and port it is given.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.agent import Agent, NoModelError
from edge_agent.errors import (
    OutcomeError,
    OutcomeLabelError,
    PredictionIdError,
    PredictionStoreError,
)
from edge_agent.model import PredictError
from edgefleet.contract.errors import InputError, SchemaError
from edgefleet.contract.messages import Outcome

__all__ = ["MAX_OUTCOMES_PER_CALL", "LocalServer"]

log = logging.getLogger(__name__)

MAX_OUTCOMES_PER_CALL = 10_000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: local apps call in a loop
    server_version = "edge-agent"
    timeout = 30  # an idle or stuck connection is closed, not kept forever

    server: _Server  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serving_error(self, exc: InputError | NoModelError | PredictError) -> None:
        """What ``/predict`` and ``/explain`` answer when serving refused: a bad row (400),
        nothing installed (503), the runtime failed (500)."""
        if isinstance(exc, InputError):
            self._error(400, "InputError", str(exc), feature=exc.feature, row=exc.row)
        elif isinstance(exc, NoModelError):
            self._error(503, "NoModel", str(exc))
        else:
            self._error(500, "PredictError", str(exc))

    def _error(self, status: int, kind: str, message: str, **extra: Any) -> None:
        self._send(status, {"error": {"type": kind, "message": message, **extra}})

    def do_GET(self) -> None:
        try:
            if self.path.split("?")[0] != "/health":
                self._error(404, "NotFound", f"no route {self.path[:100]!r}")
                return
            health = self.server.health()
            self._send(200 if health.get("bundle") else 503, health)
        except Exception:
            log.exception("GET %s failed", self.path[:100])
            self._error(500, "InternalError", "the agent failed to answer; see its log")

    def do_POST(self) -> None:
        try:
            self._post()
        except Exception:
            log.exception("POST %s failed", self.path[:100])
            self._error(500, "InternalError", "the agent failed to answer; see its log")

    def _post(self) -> None:
        route = self.path.split("?")[0]
        if route not in ("/predict", "/explain", "/outcomes"):
            self._drain()
            self._error(404, "NotFound", f"no route {self.path[:100]!r}")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "LengthRequired", "send the body with a Content-Length")
            self.close_connection = True
            return
        size = int(length)
        if size > self.server.max_body:
            self._error(413, "PayloadTooLarge",
                        f"body of {size} bytes; the limit is {self.server.max_body}")
            self.close_connection = True  # the body is not read: the connection is spent
            return
        raw = self.rfile.read(size)
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            self._error(400, "NotJson", f"the body is not JSON: {exc}")
            return
        if route == "/explain":
            self._explain(doc)
        elif route == "/outcomes":
            self._outcomes(doc)
        else:
            self._predict(doc)

    def _predict(self, doc: Any) -> None:
        single = isinstance(doc, dict) and "row" in doc and "rows" not in doc
        rows = [doc["row"]] if single else doc.get("rows") if isinstance(doc, dict) else None
        if rows is None:
            self._error(400, "InputError", 'expected {"rows": [...]} or {"row": {...}}')
            return
        ids = doc.get("ids")
        if single and "id" in doc:
            ids = [doc["id"]]
        agent = self.server.agent
        try:
            result = agent.predict(rows, ids)
        except PredictionIdError as exc:
            self._error(400, "PredictionIdError", str(exc), field="id" if single else "ids",
                        row=exc.row)
            return
        except (InputError, NoModelError, PredictError) as exc:
            self._serving_error(exc)
            return
        model = agent.model
        answers = result.rows(model.classes if model is not None else ())
        if model is not None:
            _flag_unseen(answers, rows, model.manifest.inputs)
        if single:
            self._send(200, {"bundle": result.bundle, "prediction": answers[0]})
        else:
            self._send(200, {"bundle": result.bundle, "predictions": answers})

    def _explain(self, doc: Any) -> None:
        if not isinstance(doc, dict) or "row" not in doc:
            self._error(400, "InputError", 'expected {"row": {...}}')
            return
        try:
            answer = self.server.agent.explain(doc["row"])
        except (InputError, NoModelError, PredictError) as exc:
            self._serving_error(exc)
            return
        self._send(200, answer.to_dict())

    def _outcomes(self, doc: Any) -> None:
        items = doc.get("outcomes") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            self._error(400, "SchemaError", 'expected {"outcomes": [{"id": .., "label": ..}]}',
                        field="outcomes")
            return
        if len(items) > MAX_OUTCOMES_PER_CALL:
            self._error(400, "SchemaError", f"{len(items)} outcomes; at most "
                        f"{MAX_OUTCOMES_PER_CALL} per call", field="outcomes")
            return
        try:
            outcomes = [Outcome.from_dict(o, f"outcomes[{i}]") for i, o in enumerate(items)]
        except SchemaError as exc:
            self._error(400, "SchemaError", str(exc), field=exc.field)
            return
        try:
            counts = self.server.agent.record_outcomes(outcomes)
        except OutcomeLabelError as exc:
            self._error(400, "OutcomeLabelError", str(exc), id=exc.id)
            return
        except OutcomeError as exc:
            status = 400 if exc.id is not None else 503
            self._error(status, "OutcomeError", str(exc), id=exc.id)
            return
        except PredictionStoreError as exc:
            log.error("outcomes not recorded: %s", exc)
            self._error(500, "PredictionStoreError", "the prediction store failed; see the "
                        "agent's log")
            return
        self._send(200, {"counts": counts.to_dict()})

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.server.max_body:
            self.rfile.read(int(length))
        else:
            self.close_connection = True


@lru_cache(maxsize=8)
def _vocabularies(inputs: tuple[Any, ...]) -> tuple[tuple[int, str, frozenset[str]], ...]:
    """(position, name, training categories) of each categorical input."""
    return tuple((i, f.name, frozenset(f.categories)) for i, f in enumerate(inputs)
                 if f.kind == "categorical" and f.categories)


def _flag_unseen(answers: list[dict[str, Any]], rows: list[Any], inputs: tuple[Any, ...]
                 ) -> None:
    """Add ``"unseen": [feature, ...]`` to the answer of a row with a category training
    never saw: it is served (and counted in the window's profile), and the caller is told
    the answer rests on a value the model has not learnt from."""
    vocab = _vocabularies(tuple(inputs))
    if not vocab:
        return
    for answer, row in zip(answers, rows, strict=False):
        unseen = []
        for i, name, known in vocab:
            value = row.get(name) if isinstance(row, dict) else \
                row[i] if isinstance(row, list) and i < len(row) else None
            if value is not None and str(value) not in known:
                unseen.append(name)
        if unseen:
            answer["unseen"] = unseen


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], agent: Agent,
                 health: Callable[[], dict[str, Any]], max_body: int) -> None:
        super().__init__(address, _Handler)
        self.agent = agent
        self.health = health
        self.max_body = max_body


class LocalServer:
    """The endpoint on ``host:port`` (port 0: a free one, see :attr:`port`)."""

    def __init__(self, agent: Agent, health: Callable[[], dict[str, Any]], *,
                 host: str = "127.0.0.1", port: int = 8750, max_body: int = 1 << 20) -> None:
        self._server = _Server((host, port), agent, health, max_body)
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="agent-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
