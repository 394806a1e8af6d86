"""A whole fleet in one process for the end-to-end tests: a real Mosquitto (per-device
accounts), a real :class:`~fleet_server.server.FleetServer` over HTTP, a webhook receiver and
real :class:`~edge_agent.daemon.AgentDaemon`\\ s that download, verify and serve bundles,
with a ledger of every labelled prediction to compare the server's numbers with.

Shared by the ground-truth test (issue 14) and the retraining loop's (issue 15): each
module builds its own :class:`Fleet` (``versions`` to upload, ``server`` overrides of the
server's config, ``agent`` overrides of every agent's config, e.g. data capture) and stops
it with :meth:`Fleet.close`, which stops every process it started.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from fleet_server.cli.main import main as fleet_cli
from fleet_server.config import WebhookConfig
from fleet_server.server import FleetServer
from fleet_server.services import build_services
from tests.broker import SERVER_USER, Mosquitto, free_port
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import wait_until, write_config
from tests.fleet_server.conftest import SERVER_PASSWORD, make_config
from tests.fleet_server.test_evaluation import Receiver

__all__ = ["DEVICES", "VERSIONS", "Fleet", "assert_equals_sklearn", "inputs"]

DEVICES = ("dev0", "dev1", "dev2")
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


class Fleet:
    """The server, broker, webhook receiver and agents, and the ledger of labelled rows:
    ``(version, device) -> ([true labels], [predicted labels])``."""

    def __init__(self, tmp: Path, keys, bundles, *, versions=VERSIONS,
                 server: dict[str, Any] | None = None,
                 agent: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.keys = keys
        self.agent_overrides = dict(agent or {})
        self.hook = Receiver([])
        overrides = {"webhook": WebhookConfig(url=self.hook.url, backoff_s=0.01,
                                              backoff_max_s=0.05), **(server or {})}
        config = make_config(tmp, keys, **overrides)
        s = build_services(config)
        now = time.time()
        self.secrets = {d: s.registry.add_device(d, {"site": "test"}, "test", now)[1].secret
                        for d in DEVICES}
        for version in versions:
            s.bundles.upload(bundles.build(version).read_bytes(), "test", now)
        s.registry.create_group("all", {"site": "test"}, "test", now)
        self.operator = s.auth.create_token("ops", "operator", "test", now).secret
        self.viewer = s.auth.create_token("eve", "viewer", "test", now).secret
        users = s.store.mosquitto_users()
        s.close()
        self.agents: dict[str, AgentDaemon] = {}
        self.broker = Mosquitto()
        self.server: FleetServer | None = None
        try:
            self.broker.add_user(SERVER_USER, SERVER_PASSWORD)
            for device, hashed in users:
                self.broker.add_hashed_user(device, hashed)
            self.broker.start()
            self.server = FleetServer(make_config(tmp, keys, broker=self.broker, **overrides))
            self.server.start()
            self.url = self.server.start_http()
            wait_until(lambda: self.server.link.connected, 10, "the server to connect")
            self.ledger: dict[tuple[str, str], tuple[list[int], list[int]]] = defaultdict(
                lambda: ([], []))
            self.uploads = 0
            for d in DEVICES:
                self.start_agent(d)
        except BaseException:
            self.close()
            raise

    @property
    def services(self):
        return self.server.services

    def start_agent(self, device: str) -> AgentDaemon:
        path = write_config(self.tmp / device, device=device, broker=self.broker,
                            password=self.secrets[device], trust=self.keys.trust_specs(),
                            server_url=self.url, seconds=0.5, heartbeat_seconds=1,
                            http_port=free_port())
        daemon = AgentDaemon(replace(load_config(path), **self.agent_overrides))
        daemon.start()
        self.agents[device] = daemon
        return daemon

    def stop_agent(self, device: str) -> None:
        self.agents.pop(device).stop(flush_timeout=2.0)

    def deploy(self, version: str, devices=DEVICES) -> None:
        for d in devices:
            self.services.desired.assign(d, f"sensor@{version}", actor="operator:ops")
        self.wait_running(version, devices)

    def wait_running(self, version: str, devices=DEVICES, timeout: float = 30) -> None:
        wait_until(lambda: all(self.running(d) == version for d in devices), timeout,
                   f"{', '.join(devices)} to run sensor@{version}")

    def running(self, device: str) -> str | None:
        model = self.agents[device].agent.model
        return None if model is None else model.ref.version

    def label(self, version: str, device: str, truth, predicted) -> None:
        t, p = self.ledger[(version, device)]
        t.extend(int(v) for v in truth)
        p.extend(int(v) for v in predicted)

    def rows(self, version: str, devices=DEVICES) -> tuple[np.ndarray, np.ndarray]:
        """The ledger's labelled rows of ``version`` on ``devices``: (truth, predicted)."""
        t = [v for d in devices for v in self.ledger[(version, d)][0]]
        p = [v for d in devices for v in self.ledger[(version, d)][1]]
        return np.asarray(t), np.asarray(p)

    # -- the routes --------------------------------------------------------------------

    def http(self, device: str, path: str, body: dict) -> dict:
        daemon = self.agents[device]
        assert daemon.http is not None
        r = httpx.post(f"http://127.0.0.1:{daemon.http.port}{path}", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def upload(self, outcomes: list[tuple[str, str, int]]) -> None:
        """``fleet outcomes upload`` of ``(device, id, label)`` rows, through the CLI."""
        self.uploads += 1
        path = self.tmp / f"outcomes-{self.uploads}.csv"
        path.write_text("device,id,label\n" + "".join(f"{d},{i},{y}\n" for d, i, y in outcomes))
        done = CliRunner().invoke(fleet_cli, ["outcomes", "upload", str(path), "--server",
                                              self.url, "--token", self.operator])
        assert done.exit_code == 0, done.output
        assert f"{len(outcomes)} outcome(s) queued" in done.output

    def receipted(self, device: str) -> int:
        rows = self.services.outcomes.status(device)
        return rows[0].receipted if rows else 0

    # -- what the server reports -------------------------------------------------------

    def performance(self, version: str, device: str | None = None) -> dict:
        params = {"bundle": f"sensor@{version}", "since": "1h"}
        if device is not None:
            params["device"] = device
        r = httpx.get(f"{self.url}/api/v1/performance", params=params, timeout=30,
                      headers={"Authorization": f"Bearer {self.viewer}"})
        assert r.status_code == 200, r.text
        return r.json()

    def reported(self, version: str, n: int, device: str | None = None) -> dict:
        """The report once ``n`` labelled rows are in it (more would be a double count)."""
        deadline = time.monotonic() + 60
        while (found := self.performance(version, device))["total"]["labelled"] < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"sensor@{version} {'on ' + device if device else 'in the fleet'}: "
                    f"{found['total']['labelled']} labelled rows after 60 s, expected {n}")
            time.sleep(0.05)
        assert found["total"]["labelled"] == n, "labelled rows counted more than once"
        return found

    def close(self) -> None:
        for daemon in self.agents.values():
            daemon.stop(flush_timeout=0.5)
        if self.server is not None:
            self.server.stop()
        self.broker.cleanup()
        self.hook.close()


def assert_equals_sklearn(report: dict, truth: np.ndarray, predicted: np.ndarray) -> None:
    r = report["total"]["realized"]
    assert r["accuracy"]["value"] == accuracy_score(truth, predicted)
    assert r["accuracy"]["n"] == len(truth)
    for c in (0, 1):
        assert r[f"precision[{c}]"]["value"] == pytest.approx(
            precision_score(truth, predicted, pos_label=c, zero_division=0), abs=1e-12)
        assert r[f"recall[{c}]"]["value"] == pytest.approx(
            recall_score(truth, predicted, pos_label=c, zero_division=0), abs=1e-12)
    assert r["f1_macro"]["value"] == pytest.approx(
        f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12)
    assert report["confusion"] == {
        "classes": ["0", "1"], "counts": confusion_matrix(truth, predicted,
                                                          labels=[0, 1]).tolist()}


def inputs(n: int, seed: int):
    frame = sensor_data(n, seed=seed)
    return frame[list(FEATURES)].to_dict("records"), frame["fault"].to_numpy(), frame
